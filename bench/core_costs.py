"""The model core's cost curve per dtype: one pass over k = 1..16 new positions (layers, head, full pass), the
memory-bandwidth floor measured on this machine, and their ratio. Prints a table per dtype and writes JSON.

    .venv/bin/python bench/core_costs.py                                   # this CPU, fp32 and bf16 (make costs)
    .venv/bin/python bench/core_costs.py --cores transformers lean          # before/after: transformers' layers vs ours
    python bench/core_costs.py --device cuda --dtypes bfloat16 float16    # a GPU

Run it alone: another torch process on the same cores distorts every figure.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.cli import run_main  # noqa: E402
from harness.cost_curve import measure  # noqa: E402
from harness.model import load_model  # noqa: E402


def table(curve, core: str) -> str:
    rows = [f"### {curve.device} {curve.dtype}, {core} core, after {curve.context} cached positions (ms, median)",
            "| k | layers | head | full pass | pass / one-position pass |", "|---|---|---|---|---|"]
    for p in curve.points:
        rows.append(f"| {p.k} | {1e3 * p.layers:.1f} | {1e3 * p.head:.1f} | {1e3 * p.total:.1f} | "
                    f"{curve.ratio(p.k):.2f} |")
    rows.append(f"\nweights {curve.weight_bytes / 1e6:.0f} MB; bandwidth {curve.bandwidth / 1e9:.1f} GB/s (copy "
                f"{curve.copy_bandwidth / 1e9:.1f}, read {curve.read_bandwidth / 1e9:.1f}); "
                f"floor {1e3 * curve.floor:.1f} ms per step; a one-position pass is "
                f"{curve.points[0].total / curve.floor:.1f}x the floor")
    return "\n".join(rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="as benchmark.py --model (default: the embedded model)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--context", type=int, default=400, help="cached positions before the pass")
    p.add_argument("--max_k", type=int, default=16)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--cores", nargs="+", default=["lean"], choices=["lean", "lean-library", "lean-graphs", "transformers"],
                   help="which layer core(s) to time (benchmark.py --core)")
    p.add_argument("--out", default="results/core_costs.json")
    args = p.parse_args()
    curves = []
    for dt in args.dtypes:
        model = load_model(args.model, args.device, dt, exits="none")
        for core in args.cores:
            model.use_core(core)
            curve = measure(model, args.context, args.max_k, args.reps)
            print(table(curve, core), flush=True)
            curves.append(dict(curve.as_dict(), core=core))
        del model
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"curves": curves}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    run_main(main)
