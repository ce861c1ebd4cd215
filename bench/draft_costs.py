"""Where a model drafter's decode time goes, per pass: each method's draft pass (its drafter's work for one draft),
verification pass (the full model over the drafts + 1) and accept step (verifier, cache crop, the draft module's
catch-up), from the component timer (`--breakdown`'s sections, synchronized), on real prompts, interleaved
generation by generation, beside autoregressive decoding's ms per token. Explicit knobs, so that a run measures the
drafters' costs, not the artifact's current verdict. Run it alone (it times).

    .venv/bin/python bench/draft_costs.py --json results/core_speed/draft_costs.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.cli import run_main  # noqa: E402
from harness.config import GenerationConfig  # noqa: E402
from harness.generators.base import StopCondition, build_generator  # noqa: E402
from harness.model import load_model  # noqa: E402
from harness.provenance import git_commit  # noqa: E402
from harness.tasks import load_examples  # noqa: E402

METHODS = {
    "autoregressive": dict(),
    "self_speculative E6 k2 t0.3": dict(generation_strategy="self_speculative", exit_layer=6, num_speculations=2,
                                        draft_vocab=8192, draft_threshold=0.3),
    "kangaroo k6 t0.6": dict(generation_strategy="kangaroo", num_speculations=6, draft_threshold=0.6),
    "eagle k2 t0.8": dict(generation_strategy="eagle", num_speculations=2, draft_threshold=0.8),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--dataset", default="xsum_summarization")
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--reps", type=int, default=2, help="passes over the prompts")
    ap.add_argument("--json", help="write the table here")
    args = ap.parse_args()
    m = load_model(None, device="cpu", dtype=args.dtype, exits="auto")
    prompts = [m.encode(e.prompt, chat=True) for e in load_examples(args.dataset, args.prompts)]
    with torch.inference_mode():
        gens = {name: build_generator(m, GenerationConfig(**kw)) for name, kw in METHODS.items()}
        for g in gens.values():
            g.timer.enabled = True
            g.generate(prompts[0], StopCondition(m, 8, eos_ids=set()))  # warm-up
        got = {name: [] for name in gens}
        for _ in range(args.reps):
            for ids in prompts:
                for name, g in gens.items():
                    got[name].append(g.generate(ids, StopCondition(m, args.tokens, eos_ids=set())))
    rows = []
    for name, results in got.items():
        tokens = sum(len(r.tokens) for r in results)
        draft_passes = sum(r.draft_passes or 0 for r in results)
        verify_passes = sum(r.verify_passes or 0 for r in results)
        seconds: dict = {}
        for r in results:
            for k, v in ((r.breakdown or {}).get("components") or {}).items():
                seconds[k] = seconds.get(k, 0.0) + v
        per = lambda k, n: round(1e3 * seconds[k] / n, 3) if k in seconds and n else None  # noqa: E731
        rows.append({"method": name, "ms_per_token": round(1e3 * sum(r.decode_seconds for r in results) / tokens, 3),
                     "tokens": tokens, "draft_passes": draft_passes, "verify_passes": verify_passes,
                     "draft_ms_per_pass": per("draft", draft_passes), "verify_ms_per_pass": per("verify", verify_passes),
                     "accept_ms_per_pass": per("accept", verify_passes)})
    print("| method | ms/token | draft ms/pass | verify ms/pass | accept ms/pass | draft passes | verify passes |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['ms_per_token']} | {r['draft_ms_per_pass']} | {r['verify_ms_per_pass']} | "
              f"{r['accept_ms_per_pass']} | {r['draft_passes']} | {r['verify_passes']} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"commit": git_commit(), "dtype": args.dtype, "dataset": args.dataset,
                                               "prompts": args.prompts, "tokens": args.tokens, "reps": args.reps,
                                               "core": m.core_summary(), "rows": rows}, indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    run_main(main)
