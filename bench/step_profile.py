"""Where a decode step's time goes: one position through every layer and the head after `--context` cached
positions, profiled with torch.profiler and grouped by what the operators do (matrix products, attention, norms,
rotary, cache writes, other tensor ops), against the wall-clock time of the same step. The gap between the wall
clock and the operators' own time is the Python and dispatch cost of issuing them.

    .venv/bin/python bench/step_profile.py --dtype bfloat16 --context 600          # run it alone
    .venv/bin/python bench/step_profile.py --dtype float32 --core transformers      # before/after
    python bench/step_profile.py --device cuda --dtype bfloat16                     # a GPU (CUDA time per group)
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.cli import run_main  # noqa: E402
from harness.model import load_model  # noqa: E402
from harness.speedup_model import median_time  # noqa: E402

# operator name fragments -> group (first match wins; everything else is "other tensor ops")
GROUPS = (("native layer", ("native_bf16 layer",)),  # harness/native_bf16.py: a whole decoder layer in one call
          ("matrix products", ("linear", "addmm", "mm", "matmul", "mkldnn", "bmm")),
          ("attention", ("scaled_dot_product", "attention", "softmax", "repeat_interleave")),
          ("norms", ("rsqrt", "pow", "mean", "rms_norm")),
          ("rotary", ("cat", "neg", "chunk")),
          ("cache writes", ("copy_", "index_put", "slice_scatter")),
          ("activation", ("silu",)))


def group_of(name: str) -> str:
    low = name.lower()
    for group, keys in GROUPS:
        if any(k in low for k in keys):
            return group
    return "other tensor ops"


def label_native_kernels() -> None:
    """The native bf16 kernels are ctypes calls the profiler cannot see: name them (inside the timed step too, at
    ~1 us a call) so that their time counts as products and attention, not as Python."""
    from harness import native_bf16

    def labelled(name, fn):
        def run(*args, **kwargs):
            with torch.profiler.record_function(name):
                return fn(*args, **kwargs)
        return run

    native_bf16.Weight.__call__ = labelled("native_bf16 linear", native_bf16.Weight.__call__)
    native_bf16.attention = labelled("native_bf16 attention", native_bf16.attention)
    native_bf16.layer = labelled("native_bf16 layer", native_bf16.layer)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="as benchmark.py --model (default: the embedded model)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--core", default="lean", choices=["lean", "lean-library", "transformers"])
    p.add_argument("--context", type=int, default=600, help="cached positions before the step")
    p.add_argument("--steps", type=int, default=20, help="profiled steps")
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args()
    m = load_model(args.model, args.device, args.dtype, exits="none", core=args.core)
    label_native_kernels()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, m.vocab_size, (1, args.context), generator=gen).to(m.device)
    cache = m.new_cache()
    with torch.inference_mode():
        m.run_layers(m.embed(ids), 0, m.num_layers, cache, 0)
        x = torch.randint(0, m.vocab_size, (1, 1), generator=gen).to(m.device)

        def step():
            h = m.embed(x)
            m.exit_logits(m.run_layers(h, 0, m.num_layers, cache, args.context))
            m.crop(cache, args.context)

        wall = median_time(step, m.synchronize, reps=max(7, args.steps))
        acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                        if m.device.type == "cuda" else [])
        with torch.profiler.profile(activities=acts) as prof:
            for _ in range(args.steps):
                step()
            m.synchronize()
    per = defaultdict(lambda: [0.0, 0])  # group -> [self seconds per step, calls per step]
    cuda = m.device.type == "cuda"
    for e in prof.key_averages():
        t = (e.self_device_time_total if cuda else e.self_cpu_time_total) / 1e6 / args.steps
        g = group_of(e.key)
        per[g][0] += t
        per[g][1] += e.count / args.steps
    ops = sum(v[0] for v in per.values())
    weights = sum(q.numel() * q.element_size() for q in m.hf.parameters())
    print(f"# decode step: {m.name} on {m.device}, {args.dtype}, {args.core} core, {args.context} cached positions")
    print(f"wall clock {1e3 * wall:.1f} ms (median of {max(7, args.steps)}); operators' own "
          f"{'GPU' if cuda else 'CPU'} time {1e3 * ops:.1f} ms; weights {weights / 1e6:.0f} MB")
    print("| group | ms per step | share of wall | operator calls per step |\n|---|---|---|---|")
    rows = sorted(per.items(), key=lambda kv: -kv[1][0])
    for g, (t, n) in rows:
        print(f"| {g} | {1e3 * t:.1f} | {100 * t / wall:.0f}% | {n:.0f} |")
    gap = wall - ops
    print(f"| Python and dispatch (wall - operators) | {1e3 * gap:.1f} | {100 * gap / wall:.0f}% | - |")
    if args.json:
        Path(args.json).write_text(json.dumps({"wall_ms": 1e3 * wall, "operators_ms": 1e3 * ops, "device": str(m.device),
                                               "dtype": args.dtype, "core": args.core, "context": args.context,
                                               "groups": {g: {"ms": 1e3 * t, "calls": n} for g, (t, n) in rows}},
                                              indent=1) + "\n")
    return 0


if __name__ == "__main__":
    run_main(main)
