"""The native product's cost per number of positions (bf16, or `--dtype float32` for the fp32 one): the 30 layers' products of SmolLM2-135M's shape (random
weights in huge pages, as the core prepares them) at 1..16 positions, repetitions interleaved in random order,
medians, and each as a ratio to one position. `--lib` times another build of the kernel (an earlier commit's, to
compare), loaded in place of this checkout's. Run it alone (it times); alternate two builds in separate processes.

    .venv/bin/python bench/product_rows.py
    git show REV:harness/csrc/native_bf16.c > /tmp/old.c
    cc -O3 -mavx512f -mavx512bw -mavx512vl -mavx512bf16 -mamx-tile -mamx-bf16 -fopenmp -shared -fPIC /tmp/old.c \\
        -o /tmp/old.so -lm && .venv/bin/python bench/product_rows.py --lib /tmp/old.so
"""
from __future__ import annotations

import argparse
import ctypes
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import native_bf16  # noqa: E402
from harness.cli import run_main  # noqa: E402
from harness.config import UsageError  # noqa: E402

SHAPES = ((960, 576), (576, 576), (3072, 576), (576, 1536))  # one layer: fused qkv, o, fused gate/up, down
POSITIONS = (1, 2, 3, 4, 5, 6, 7, 8, 12, 16)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lib", help="a build of harness/csrc/native_bf16.c to time instead of this checkout's")
    ap.add_argument("--reps", type=int, default=25)
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                    help="float32: the fp32 product of fp32 decode passes (ee_linear_f32), weights as the core keeps them")
    args = ap.parse_args()
    if native_bf16.library() is None:
        raise UsageError(f"the native kernels do not build here: {native_bf16.status().get('why')}")
    if args.lib:
        new = ctypes.CDLL(args.lib)
        for name in ("ee_linear_bf16", "ee_linear_bf16_amx", "ee_linear_f32"):
            fn, ref = getattr(new, name), getattr(native_bf16._lib, name)
            fn.argtypes, fn.restype = ref.argtypes, ref.restype
        native_bf16._lib = new
    g = torch.Generator().manual_seed(0)
    x = {k: torch.randn(16, k, generator=g) for _, k in SHAPES}
    ins = [x[k] for _ in range(30) for _, k in SHAPES]
    if args.dtype == "float32":
        from harness import hugepages

        # in huge pages, as load_model keeps a CPU model's parameters (hugepages.rehome_parameters)
        weights = hugepages.copies([torch.randn(n, k, generator=g) * 0.05 for _ in range(30) for n, k in SHAPES])

        def step(q: int) -> None:
            for w, xi in zip(weights, ins):
                native_bf16.linear_f32(xi[:q], w, None)
    else:
        weights = [native_bf16.Weight((torch.randn(n, k, generator=g) * 0.05).bfloat16(), None)
                   for _ in range(30) for n, k in SHAPES]
        native_bf16.rehome(weights)
        ins = [xi.bfloat16() for xi in ins]

        def step(q: int) -> None:
            for w, xi in zip(weights, ins):
                w(xi[:q])

    times: dict = {q: [] for q in POSITIONS}
    for q in POSITIONS:
        step(q)
    for _ in range(args.reps):
        order = list(POSITIONS)
        random.shuffle(order)
        for q in order:
            t = time.perf_counter()
            step(q)
            times[q].append(time.perf_counter() - t)
    med = {q: sorted(ts)[len(ts) // 2] for q, ts in times.items()}
    kind = "fp32" if args.dtype == "float32" else "amx" if native_bf16._amx else "avx512-bf16"
    print(f"{args.lib or 'this checkout'} ({kind}), ms and ratio to 1:")
    print(" ".join(f"{q}: {1e3 * med[q]:.2f} ({med[q] / med[1]:.2f})" for q in POSITIONS))


if __name__ == "__main__":
    run_main(main)
