"""Can this machine's speed figures be trusted? One command, on CPU or GPU, that prints a verdict.

1. Order effect: bench/autoregressive_vs_hf.py's comparison (ours vs transformers.generate, with the
   per-prompt warm-up) run twice, once with ours first on every prompt and once with transformers first.
   Without an order effect both give the same ratio.
2. The protocol end to end: `benchmark.py --strategies all --fixed_length` on the same prompts (the
   Latin-square rotation, per-example warm-up and the A/A control), and its report.

Verdict (each line PASS or FAIL):
- order effect: the two orders' median ratios agree within 5%;
- A/A control: the control's decode speedup is within 5% of 1.0;
- free: with its default threshold, FREE runs nearly every token through all layers, so its decode
  speedup must not lie above the control's noise band (it cannot be faster than the baseline).

    .venv/bin/python bench/measurement_check.py                                 # this CPU
    python bench/measurement_check.py --device cuda --dtype bfloat16            # a GPU

Writes measurement_check.json and the benchmark's run folder (with its report) under --output_dir.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from autoregressive_vs_hf import compare, prompts_for  # noqa: E402

from harness.config import GenerationConfig, RunConfig  # noqa: E402
from harness.model import load_model  # noqa: E402
from harness.plan import expand_strategies  # noqa: E402
from harness.report import CONTROL_BAND, markdown, write_report  # noqa: E402
from harness.runner import run_many  # noqa: E402

ORDER_TOLERANCE = 0.05


def verdicts(order: dict, df) -> list[tuple[bool, str]]:
    """(passed, line) for each check, from the two orders' comparisons and the report table."""
    out = []
    a, b = order["ours_first"]["ratio_median"], order["hf_first"]["ratio_median"]
    gap = abs(a / b - 1)
    out.append((gap <= ORDER_TOLERANCE, f"order effect: transformers/ours ratio {a:.3f} with ours first, {b:.3f} "
                                         f"with transformers first: {100 * gap:.1f}% apart (tolerance "
                                         f"{100 * ORDER_TOLERANCE:.0f}%)"))
    ctl = df[df["control"]]
    if ctl.empty or ctl["decode_speedup"].isna().all():
        out.append((False, "A/A control: missing from the report"))
        dev = float("nan")
    else:
        c = ctl.iloc[0]
        dev = abs(c["decode_speedup"] - 1.0)
        out.append((dev <= CONTROL_BAND, f"A/A control: decode speedup {c['decode_speedup']:.3f}x "
                                         f"[IQR {c['decode_speedup_q25']:.3f}-{c['decode_speedup_q75']:.3f}], "
                                         f"n={c['n_paired']} ({100 * dev:.1f}% from 1.0, tolerance "
                                         f"{100 * CONTROL_BAND:.0f}%)"))
    free = df[(df["strategy"] == "free") & ~df["control"]]
    if free.empty:
        out.append((False, "free: missing from the report"))
    else:
        f = free.iloc[0]
        band = max(dev, 0.0) if dev == dev else CONTROL_BAND
        ok = f["decode_speedup"] <= 1.0 + max(band, 0.01)
        out.append((bool(ok), f"free (default threshold): decode speedup {f['decode_speedup']:.3f}x with "
                              f"{f['layer_forwards_per_token']:.1f} layer forwards per token (baseline 30); must not "
                              f"exceed the control band's top {1.0 + max(band, 0.01):.3f}x"))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="as benchmark.py --model (default: embedded SmolLM2)")
    p.add_argument("--dataset", default="cnn_dm_summarization", help="(default: %(default)s)")
    p.add_argument("--num_samples", type=int, default=10, help="prompts, for both parts (default: %(default)s)")
    p.add_argument("--max_steps", type=int, default=32, help="new tokens per generation (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=1, help="timed repeats per (example, configuration) "
                                                          "(default: %(default)s)")
    p.add_argument("--device", default="auto", help="(default: %(default)s)")
    p.add_argument("--dtype", default="auto", help="(default: %(default)s)")
    p.add_argument("--output_dir", default="results/measurement_check", help="(default: %(default)s)")
    a = p.parse_args()
    model = load_model(a.model, a.device, a.dtype)
    print(f"# measurement check: {model.name} on {model.device} ({model.dtype}), {a.num_samples} x {a.dataset}, "
          f"{a.max_steps} tokens", flush=True)
    prompts = prompts_for(model, a.dataset, a.num_samples)
    order = {}
    for o in ("ours_first", "hf_first"):
        print(f"\n## ours vs transformers.generate, {o}", flush=True)
        order[o] = compare(model, prompts, a.max_steps, o, warmup=True, log=lambda s: print(s, flush=True))
    print("\n## benchmark.py --strategies all --fixed_length (with the A/A control)", flush=True)
    run = RunConfig(model=a.model, dataset=a.dataset, num_samples=a.num_samples, output_dir=a.output_dir,
                    device=a.device, dtype=a.dtype, repeats=a.repeats, fixed_length=True)
    base = GenerationConfig(max_steps=a.max_steps)
    parent, _ = run_many(run, expand_strategies("all", base, model.num_layers), model=model)
    df, _files = write_report([str(parent)], str(parent / "report"))
    print(markdown(df))
    checks = verdicts(order, df)
    print("\n## verdict")
    for ok, line in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {line}")
    passed = all(ok for ok, _ in checks)
    print("measurement check: " + ("PASS" if passed else "FAIL"))
    out = Path(a.output_dir) / "measurement_check.json"
    out.write_text(json.dumps({"device": str(model.device), "dtype": str(model.dtype), "model": model.name,
                               "order": order, "runs": str(parent),
                               "verdict": [{"passed": bool(ok), "check": line} for ok, line in checks]},
                              indent=2, default=str))
    print(f"wrote {out} and {parent}/report")
    return 0 if passed else 1


if __name__ == "__main__":
    from harness.cli import run_main

    run_main(main)
