"""The native bf16 decode kernels (harness/csrc/native_bf16.c): linear products and attention for passes of up to
`ROWS` positions, built once per machine and loaded through ctypes.

Why hand-written kernels (measured on the team's 2-core AVX512-BF16 CPU, the 30 layers' products of SmolLM2-135M):
- batch invariance: each output element is summed in the same order whatever the number of rows, so a verification
  pass over k positions yields the logits of k one-position steps, bit for bit; bf16 speculative decoding becomes
  token-identical to bf16 autoregressive decoding. oneDNN's kernel depends on M and moved ~1% of greedy tokens at
  near-ties (docs/model_core.md). SDPA is not invariant either (with its mask, a 4-query pass differs from
  4 one-query calls by ~2e-3 from layer 5 on), so attention over the cache is native too;
- speed: on AMX (Sapphire Rapids and later) a tile's multiply costs the same for 1 and 16 rows, so the layers'
  products take 10.9 ms at one position and 12.8 ms at 16 (oneDNN's packed kernel: 16.2 and 16.8); on AVX512-BF16
  alone (AMD Zen 4) one position is as fast (10.9 ms) but each extra row adds compute (16 ms at 8 rows, 30 at 16);
  there, up to 4 positions run one per pass over a weight block, every pass prefetching the stream ahead, and
  2-8 positions cost 1.03-1.21x one position instead of 1.22-1.69x (an AMD EPYC, bench/product_rows.py).
  Attention scores run on tiles too (16 keys against up to 8 query heads per multiply), and the prepared weights
  live in 2 MiB pages (rehome, harness.hugepages): with both, a one-position pass after 400 cached positions fell
  from 23.7 to 17.6 ms, and 8 positions from 29.0 to 20.4 (medians of 6 runs interleaved with the earlier kernels).
  Above `ROWS` positions (prefill) oneDNN runs.
- fp32 decode passes (1..ROWS positions, linear_f32): MKL's small-M path ran 8 rows of the layers' products at
  2.0x one row (40.7 against 20.8 ms, weights in huge pages); this kernel at 1.26x (26.2 ms). One-position steps
  run it too: on an AMD EPYC (AVX512-BF16, no AMX) MKL's one-row product was 2.4-3.2x slower than this kernel
  (the 49k-row head 7.1 against 2.9 ms, medians of 30 interleaved repetitions), so an fp32 autoregressive
  baseline on MKL made every verification pass look cheap (0.55x a step). Greedy fp32 tokens did not move: 40 of
  40 real prompts (CNN/DM, XSum, GSM8K, HumanEval; 64 tokens; bench/f32_step_kernel.py) gave the same tokens on
  either kernel. Prefill keeps MKL: the lean core's fp32 prefill logits are transformers', bit for bit.
It builds only where it can: Linux on x86-64 with AVX512-BF16, a C compiler (`$CC`, else `cc`) and torch's OpenMP
runtime already in the process (the kernel's threads are then torch's). Elsewhere `status()` says why and the lean
core keeps oneDNN.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import torch

from . import hugepages

SOURCE = Path(__file__).parent / "csrc" / "native_bf16.c"
FLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mamx-tile", "-mamx-bf16", "-fopenmp",
         "-shared", "-fPIC")
LIBS = ("-lm",)
ROWS = 16  # the most rows (positions) a product runs natively: every verification pass of <= 15 drafts

_lib: Optional[ctypes.CDLL] = None
_why: Optional[str] = None  # why the kernel is not available (None: available, or not tried yet)
_tried = False
_amx = False  # whether the products run on AMX tiles (the CPU has them and Linux granted the tile state)


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {f for line in text.splitlines() if line.startswith("flags") for f in line.split(":", 1)[1].split()}


def _cpu_has_bf16() -> bool:
    return "avx512_bf16" in _cpu_flags()


def _openmp_mapped() -> bool:
    """Whether torch's OpenMP runtime (libgomp) is in the process, so the kernel's -fopenmp binds to it."""
    try:
        return any("libgomp" in line for line in Path("/proc/self/maps").read_text().splitlines())
    except OSError:
        return False


def _build(target: Path) -> Optional[str]:
    """Compile SOURCE into `target` (atomically); the compiler's complaint on failure, else None."""
    cc = shutil.which(os.environ.get("CC", "cc"))
    if cc is None:
        return f"no C compiler ({os.environ.get('CC', 'cc')}) on PATH"
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", tmp, *LIBS], capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            lines = done.stderr.strip().splitlines() or ["?"]
            first = next((ln for ln in lines if "error" in ln), lines[-1])
            return f"{Path(cc).name} failed: {first.strip()[:200]}"
        os.replace(tmp, target)  # concurrent builders (test workers) each write a whole file
        return None
    except (OSError, subprocess.SubprocessError) as e:
        return f"{Path(cc).name} could not run: {e}"
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load() -> tuple[Optional[ctypes.CDLL], Optional[str]]:
    if os.environ.get("EE_HARNESS_NATIVE", "1") == "0":
        return None, "EE_HARNESS_NATIVE=0"
    if not sys.platform.startswith("linux") or platform.machine() not in ("x86_64", "AMD64"):
        return None, f"not Linux on x86-64 ({sys.platform}, {platform.machine()})"
    if not _cpu_has_bf16():
        return None, "the CPU has no AVX512-BF16"
    if "OpenMP" not in torch.__config__.parallel_info() or not _openmp_mapped():
        return None, "torch's OpenMP runtime (libgomp) is not in the process"
    from .model import cache_root

    tag = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode() + " ".join(LIBS).encode()).hexdigest()[:16]
    target = cache_root() / "kernels" / f"native_bf16-{tag}.so"
    if not target.exists():
        why = _build(target)
        if why is not None:
            return None, why
    try:
        lib = ctypes.CDLL(str(target))
    except OSError as e:
        return None, f"could not load {target.name}: {e}"
    product = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3  # x, weight, bias, y, M, N, K
    signatures = {
        "ee_linear_bf16": product, "ee_linear_bf16_amx": product, "ee_linear_f32": product,
        "ee_layer_bf16": [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_float,
                          ctypes.c_void_p, ctypes.c_float] + [ctypes.POINTER(_WeightStruct)] * 4
        + [ctypes.c_int64] * 4 + [ctypes.c_void_p] * 4 + [ctypes.c_int64, ctypes.c_int64, ctypes.c_float, ctypes.c_int64],
        "ee_attention_bf16": [ctypes.c_void_p] * 3 + [ctypes.c_int64, ctypes.c_void_p] + [ctypes.c_int64] * 5
        + [ctypes.c_float, ctypes.c_int64]}
    for name, argtypes in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, None
    return lib, None


def library() -> Optional[ctypes.CDLL]:
    """The loaded kernel, built on first call; None where it cannot be (see status())."""
    global _lib, _why, _tried, _amx
    if not _tried:
        _tried = True
        _lib, _why = _load()
        _amx = _lib is not None and {"amx_tile", "amx_bf16"} <= _cpu_flags() \
            and os.environ.get("EE_HARNESS_AMX", "1") != "0" and _lib.ee_amx_init() == 1
    return _lib


_warned = False


def warn_unavailable() -> None:
    """One stderr line per process where the default core wanted the native kernels and cannot have them."""
    global _warned
    why = status().get("why")
    if _warned or why == "EE_HARNESS_NATIVE=0":  # asked for: nothing to say
        return
    _warned = True
    print(f"native bf16 kernels unavailable ({why}): the core runs the library kernels (oneDNN, SDPA), so bf16 "
          "speculative output can part from autoregressive output at near-ties (run.json model.core)",
          file=sys.stderr)


def status() -> dict:
    """{"available": bool, "why": reason when not} for run.json."""
    lib = library()
    if lib is None:
        return {"available": False, "why": _why}
    return {"available": True, "rows": ROWS, "products": "amx" if _amx else "avx512-bf16"}


class _WeightStruct(ctypes.Structure):
    """ee_weight in native_bf16.c."""

    _fields_ = [("data", ctypes.c_void_p), ("bias", ctypes.c_void_p), ("amx", ctypes.c_int64), ("out", ctypes.c_int64)]


class Weight:
    """A linear layer's weight made ready for the native product: AMX tiles where they run and the shape allows
    (out % 16 == 0, in % 32 == 0), else the AVX512-BF16 kernel on the row-major weight."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor]):
        n, k = weight.shape
        self.out = n
        self.bias = bias.detach().float().contiguous() if bias is not None else None
        self.amx = _amx and n % 16 == 0 and k % 32 == 0
        if self.amx:  # [n/16, k/32, 16 pair-rows, 16 outputs, 2]: one 1 KiB B tile per (16 outputs, 32 inputs)
            self.data = weight.detach().reshape(n // 16, 16, k // 32, 16, 2).permute(0, 2, 3, 1, 4).contiguous()
        else:
            self.data = weight.detach().contiguous()
        self.struct = _WeightStruct(self.data.data_ptr(), self.bias.data_ptr() if self.bias is not None else None,
                                    int(self.amx), n)

    @property
    def kind(self) -> str:
        return "amx" if self.amx else "avx512-bf16"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (rows <= ROWS, K) contiguous bf16 -> (rows, out) bf16."""
        rows, k = x.shape
        y = torch.empty((rows, self.out), dtype=torch.bfloat16)
        fn = _lib.ee_linear_bf16_amx if self.amx else _lib.ee_linear_bf16
        fn(x.data_ptr(), self.data.data_ptr(), self.bias.data_ptr() if self.bias is not None else None,
           y.data_ptr(), rows, self.out, k)
        return y


def rehome(weights: Sequence[Weight]) -> None:
    """Moves the weights' prepared data into one arena of 2 MiB pages (harness.hugepages): a decode step streams
    every byte of it, and on 4 KiB pages that stream runs at about half the speed here."""
    for w, data in zip(weights, hugepages.copies([w.data for w in weights])):
        w.data = data
        w.struct.data = data.data_ptr()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x (rows <= ROWS, K) @ weight (N, K).T (+ bias), bf16 in and out, CPU (the weight prepared on each call)."""
    return Weight(weight, bias)(x.contiguous())


def linear_f32(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """fp32 x (1..ROWS rows, K) @ weight (N, K).T (+ bias) for decode passes: the weight streamed once, each
    row's result independent of the number of rows (ee_linear_f32). weight and bias contiguous fp32 on CPU."""
    rows, k = x.shape
    x = x.contiguous()
    y = torch.empty((rows, weight.shape[0]), dtype=torch.float32)
    _lib.ee_linear_f32(x.data_ptr(), weight.data_ptr(), bias.data_ptr() if bias is not None else None, y.data_ptr(),
                       rows, weight.shape[0], k)
    return y


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, end: int, scale: float) -> torch.Tensor:
    """Causal attention of the last Q of `end` cached positions, one sequence: q (1, H, Q, D); k, v the layer's
    whole buffers (1, KVH, capacity, D), contiguous. Returns (1, Q, H*D), as o_proj reads it."""
    _, heads, rows, dim = q.shape
    q = q.contiguous()
    out = torch.empty((1, rows, heads * dim), dtype=torch.bfloat16)
    _lib.ee_attention_bf16(q.data_ptr(), k.data_ptr(), v.data_ptr(), k.shape[2] * dim, out.data_ptr(),
                           heads, k.shape[1], rows, dim, end, scale, int(_amx))
    return out


def layer(h: torch.Tensor, lean, kv, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """One lean decoder layer (harness.lean_layers.LeanLayer `lean`) over h (1, Q <= ROWS, d) in one native call;
    appends the Q positions' K/V to `kv` (a LayerKV) and returns the new hidden states."""
    _, rows, d = h.shape
    out = h.contiguous().clone()
    past = kv.length
    kv.reserve(1, lean.kv_dim // lean.head_dim, lean.head_dim, h.dtype, h.device, past + rows)
    cos, sin = cos.to(torch.bfloat16).contiguous(), sin.to(torch.bfloat16).contiguous()  # read as bf16 bits
    _lib.ee_layer_bf16(out.data_ptr(), rows, d, lean.in_w.data_ptr(), lean.in_eps, lean.post_w.data_ptr(),
                       lean.post_eps, ctypes.byref(lean.qkv.native.struct), ctypes.byref(lean.o.native.struct),
                       ctypes.byref(lean.gate_up.native.struct), ctypes.byref(lean.down.native.struct),
                       lean.q_dim // lean.head_dim, lean.kv_dim // lean.head_dim, lean.head_dim, lean.inter,
                       cos.data_ptr(), sin.data_ptr(), kv.k.data_ptr(), kv.v.data_ptr(), kv.k.shape[2], past,
                       lean.scaling, int(_amx))
    kv.length = past + rows
    return out
