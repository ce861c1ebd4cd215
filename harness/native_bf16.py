"""The native bf16 decode kernels (harness/csrc/native_bf16.c): linear products and attention for passes of up to
`ROWS` positions, built once per machine and loaded through ctypes.

Why hand-written kernels (measured on the team's 2-core AVX512-BF16 CPU, the 30 layers' products of SmolLM2-135M):
- batch invariance: each output element is summed in the same order whatever the number of rows, so a verification
  pass over k positions yields the logits of k one-position steps, bit for bit; bf16 speculative decoding becomes
  token-identical to bf16 autoregressive decoding. oneDNN's kernel depends on M and moved ~1% of greedy tokens at
  near-ties (docs/model_core.md). SDPA is not invariant either (with its mask, a 4-query pass differs from
  4 one-query calls by ~2e-3 from layer 5 on), so attention over the cache is native too;
- speed at one position: 8.8 ms against oneDNN's 12.2 ms for the layers' products (1.4x), the stream of weights
  being the bound; 10.5 ms at 4 rows, 15 ms at 8, 25 ms at 16 (oneDNN's packed kernel is flat at 12), so above
  `ROWS` positions (prefill) oneDNN runs.
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
from typing import Optional

import torch

SOURCE = Path(__file__).parent / "csrc" / "native_bf16.c"
FLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-fopenmp", "-shared", "-fPIC")
LIBS = ("-lm",)
ROWS = 16  # the most rows (positions) a product runs natively: every verification pass of <= 15 drafts

_lib: Optional[ctypes.CDLL] = None
_why: Optional[str] = None  # why the kernel is not available (None: available, or not tried yet)
_tried = False


def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags


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
            return f"{Path(cc).name} failed: {(done.stderr.strip().splitlines() or ['?'])[-1][:200]}"
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
    fn = lib.ee_linear_bf16
    fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3
    fn.restype = None
    fn = lib.ee_attention_bf16
    fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64, ctypes.c_void_p] + [ctypes.c_int64] * 5 + [ctypes.c_float]
    fn.restype = None
    return lib, None


def library() -> Optional[ctypes.CDLL]:
    """The loaded kernel, built on first call; None where it cannot be (see status())."""
    global _lib, _why, _tried
    if not _tried:
        _tried = True
        _lib, _why = _load()
    return _lib


def status() -> dict:
    """{"available": bool, "why": reason when not} for run.json."""
    lib = library()
    return {"available": True, "rows": ROWS} if lib is not None else {"available": False, "why": _why}


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x (rows, K) @ weight (N, K).T (+ bias, fp32), bf16 in and out; x and weight contiguous CPU bf16."""
    rows, k = x.shape
    y = torch.empty((rows, weight.shape[0]), dtype=torch.bfloat16)
    _lib.ee_linear_bf16(x.data_ptr(), weight.data_ptr(), bias.data_ptr() if bias is not None else None,
                        y.data_ptr(), rows, weight.shape[0], k)
    return y


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, end: int, scale: float) -> torch.Tensor:
    """Causal attention of the last Q of `end` cached positions, one sequence: q (1, H, Q, D); k, v the layer's
    whole buffers (1, KVH, capacity, D), contiguous. Returns (1, Q, H*D), as o_proj reads it."""
    _, heads, rows, dim = q.shape
    q = q.contiguous()
    out = torch.empty((1, rows, heads * dim), dtype=torch.bfloat16)
    _lib.ee_attention_bf16(q.data_ptr(), k.data_ptr(), v.data_ptr(), k.shape[2] * dim, out.data_ptr(),
                           heads, k.shape[1], rows, dim, end, scale)
    return out
