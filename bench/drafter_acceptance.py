"""Why a drafter's fit and its runs disagree: first-draft accuracy, teacher-forced along the full model's greedy
continuations, on the fit's own held-out prompts (as the shipped drafters' provenance records them) and on each
task's first test prompts (as runs read them, 64 greedy tokens). Drafts go through the method's own generator, as
the fit drafts (harness/train/drafters.fit_chains): prefill, one draft, one verified token, crop, catch up. A
diagnostic, not a calibration: nothing here feeds a recommendation.

    .venv/bin/python bench/drafter_acceptance.py --method eagle --prompts 10
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.cli import run_main  # noqa: E402
from harness.config import GenerationConfig, UsageError  # noqa: E402
from harness.generators import StopCondition, build_generator  # noqa: E402
from harness.generators.proposers import ModelProposer, Proposal  # noqa: E402

TASKS = ("cnn_dm_summarization", "xsum_summarization", "gsm8k")


@torch.inference_mode()
def first_draft_hits(m, method: str, seqs: list[tuple[list[int], int]]) -> list[tuple[int, int]]:
    """Per sequence (prompt + continuation ids, prompt length): (first drafts equal to the next token, positions)."""
    gen = build_generator(m, GenerationConfig(generation_strategy=method, num_speculations=1, draft_threshold=1e-9))
    (prop,) = [p for p in gen.proposers if isinstance(p, ModelProposer)]
    out = []
    for seq, n in seqs:
        cache, _, _, _ = gen.prefill(seq[:n], keep=gen.keep_layer)
        prop.start(seq[:n], seq[n], gen.prefill_states)
        hits = 0
        for t in range(n, len(seq) - 1):
            p = prop.propose(seq[t], t, 1, cache, set())
            hits += int(p.tokens[0] == seq[t + 1])
            one = Proposal([], depth=p.depth, source=p.source, states=p.states[:1])
            gen.score(one, seq[t], t, cache)
            m.crop(cache, t + 1)
            prop.accepted(one, 0, seq[t + 1], t, gen.scored)
        out.append((hits, len(seq) - 1 - n))
    return out


def fit_sequences(m, method: str) -> list[tuple[list[int], int]]:
    """The fit's held-out greedy continuations, rebuilt from the artifact's recorded options (as drafter_refit)."""
    from harness.train.common import TrainConfig
    from harness.train.drafters import DrafterOptions
    from harness.train.exit_adapters import greedy_continuations

    prov = (m.exits.provenance if m.exits is not None else {}).get(method)
    if not prov:
        raise UsageError(f"the shipped artifact holds no {method} provenance")
    fields = {f.name for f in dataclasses.fields(DrafterOptions)}
    opts = DrafterOptions(**{k: v for k, v in (prov.get("options") or {}).items() if k in fields})
    made = prov.get("config") or {}
    cfg = dataclasses.replace(TrainConfig(), **{k: made[k] for k in ("data", "holdout_docs", "max_docs", "seq_len")
                                                if k in made})
    like = SimpleNamespace(adapters_fit_prompts=opts.drafter_fit_prompts, adapters_fit_tokens=opts.drafter_fit_tokens,
                           adapters_fit_prompt_tokens=cfg.seq_len)
    return greedy_continuations(m, cfg, like)[0]


def line(name: str, per_seq: list[tuple[int, int]]) -> str:
    hits, total = sum(h for h, _ in per_seq), sum(n for _, n in per_seq)
    rates = sorted(h / n for h, n in per_seq if n)
    return (f"{name}: {hits / total:.3f} over {total} positions of {len(per_seq)} sequences (per sequence: median "
            f"{rates[len(rates) // 2]:.2f}, min {rates[0]:.2f}, max {rates[-1]:.2f})")


def main() -> None:
    from harness.model import load_model
    from harness.tasks import load_examples

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="eagle", choices=("eagle", "kangaroo"))
    ap.add_argument("--prompts", type=int, default=10, help="test prompts per task")
    ap.add_argument("--tokens", type=int, default=64, help="greedy tokens per test prompt")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--exits", default="auto", help="exit artifact (its drafters sibling is read with it); default: "
                                                     "the shipped one")
    args = ap.parse_args()
    m = load_model(None, "cpu", args.dtype, exits=args.exits)
    print(line("the fit's held-out prompts", first_draft_hits(m, args.method, fit_sequences(m, args.method))), flush=True)
    ar = build_generator(m, GenerationConfig())
    for task in TASKS:
        seqs = []
        for e in load_examples(task, args.prompts):
            ids = m.encode(e.prompt)[-1000:]
            seqs.append((ids + ar.generate(ids, StopCondition(m, args.tokens, eos_ids=set())).tokens, len(ids)))
        print(line(f"{task} test prompts", first_draft_hits(m, args.method, seqs)), flush=True)


if __name__ == "__main__":
    run_main(main)
