"""Model identity is the content of the weights; the core uses no deprecated transformers API."""
from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from harness.identity import checkpoint_fingerprint, file_sha256, library_versions
from harness.model import resolve_checkpoint


@pytest.fixture(scope="module")
def weights():
    _, where, _ = resolve_checkpoint(None)
    from pathlib import Path

    return Path(where), load_file(str(Path(where) / "model.safetensors"))


def _write(folder, shards: list[dict], config_version: str):
    folder.mkdir()
    for i, part in enumerate(shards):
        save_file(part, str(folder / f"model-{i:05d}-of-{len(shards):05d}.safetensors"))
    (folder / "config.json").write_text(json.dumps({"transformers_version": config_version}, indent=1))
    return folder


def test_same_weights_match_across_versions_and_shard_layouts(weights, tmp_path):
    where, sd = weights
    reference = checkpoint_fingerprint(where)
    names = sorted(sd)
    half = len(names) // 2
    a = _write(tmp_path / "a", [sd], "5.23.0")
    b = _write(tmp_path / "b", [{k: sd[k] for k in names[half:]}, {k: sd[k] for k in names[:half]}], "5.99.0")
    assert checkpoint_fingerprint(a) == checkpoint_fingerprint(b) == reference


@pytest.mark.parametrize("which", ["first", "middle", "last"])
def test_one_changed_value_in_any_tensor_does_not_match(weights, tmp_path, which):
    where, sd = weights
    names = sorted(sd)
    name = {"first": names[0], "middle": names[len(names) // 2], "last": names[-1]}[which]
    changed = dict(sd)
    t = sd[name].clone()
    flat = t.view(-1)
    flat[flat.numel() // 2] += 1.0  # one value, in the middle of the tensor (not in a file's first or last MiB)
    changed[name] = t
    d = _write(tmp_path / "c", [changed], "5.24.0")
    assert checkpoint_fingerprint(d) != checkpoint_fingerprint(where)


def test_dtype_and_shape_are_part_of_the_identity(tmp_path):
    x = torch.arange(8, dtype=torch.float32)
    one = _write(tmp_path / "one", [{"w": x}], "5")
    two = _write(tmp_path / "two", [{"w": x.view(2, 4)}], "5")
    three = _write(tmp_path / "three", [{"w": x.view(torch.int32)}], "5")  # same bytes, another dtype
    assert len({checkpoint_fingerprint(one), checkpoint_fingerprint(two), checkpoint_fingerprint(three)}) == 3


def test_fingerprint_is_cached_and_the_cache_follows_the_file(tmp_path):
    cache = tmp_path / "cache"
    d = _write(tmp_path / "m", [{"w": torch.ones(4)}], "5")
    first = checkpoint_fingerprint(d, cache)
    assert len(list(cache.glob("*.json"))) == 1 and checkpoint_fingerprint(d, cache) == first
    shutil.rmtree(d)
    _write(tmp_path / "m", [{"w": torch.full((4,), 2.0)}], "5")  # new content under the same path
    assert checkpoint_fingerprint(d, cache) != first


def test_versions_and_file_hash(tmp_path):
    v = library_versions()
    assert v["torch"] == torch.__version__.split("+")[0] or v["torch"].startswith(torch.__version__.split("+")[0])
    for name in ("transformers", "accelerate", "peft", "lm-eval"):
        assert v[name], name
    f = tmp_path / "f"
    f.write_bytes(b"abc")
    assert file_sha256(f) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"  # sha256("abc")


@torch.inference_mode()
def test_a_decode_through_the_core_emits_no_transformers_deprecation_warning(model, real_prompts):
    from harness.config import GenerationConfig
    from harness.generators import StopCondition, build_generator

    ids = model.encode(real_prompts[0])[:64]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for cfg in (GenerationConfig(), GenerationConfig(generation_strategy="self_speculative", exit_layer=8),
                    GenerationConfig(generation_strategy="calm", threshold=0.5)):  # layers, verify chunks, fill_kv
            build_generator(model, cfg).generate(ids, StopCondition(model, 6, eos_ids=set()))
    bad = [w for w in caught if issubclass(w.category, (DeprecationWarning, FutureWarning))
           and "transformers" in (w.filename + str(w.message))]
    assert not bad, [f"{w.filename}:{w.lineno}: {w.message}" for w in bad]


def test_exits_auto_attaches_the_shipped_artifact_by_content(model):
    from harness.trained_exits import attach

    try:
        art = attach(model, "auto")
        assert art is not None and art.model["fingerprint"] == model.checkpoint
        described = model.describe()["exits"]
        assert described["sha256"] == file_sha256(art.path) and described["path"].endswith(".safetensors")
    finally:
        model.set_exits(None)


def test_exits_auto_says_why_a_same_named_artifact_does_not_match(model, capsys):
    from harness.trained_exits import attach

    real = model.checkpoint
    try:
        model.checkpoint = "0123456789abcdef"  # same name, other weights
        assert attach(model, "auto") is None and model.exits is None
    finally:
        model.checkpoint = real
        model.set_exits(None)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "other weights" in err[0] and "fingerprint" in err[0], err
