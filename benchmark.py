"""Benchmark a decoding method on a task: speed, exit depth and quality, logged per example.

    torchrun benchmark.py --dataset cnn_dm_summarization --num_samples 10 \\
        --generation_strategy autoregressive --exit_layer 8

Writes a new run directory under --output_dir (run.json, examples.jsonl, summary.json; see README)
and prints a summary table.
"""
from __future__ import annotations

import sys

from harness.cli import make_parser, require_single_process, run_main
from harness.config import GenerationConfig, RunConfig, from_args


def format_summary(s) -> str:
    """A small Markdown table of one run's summary."""
    scores = ", ".join(f"{k} {v:.4f}" for k, v in s.metrics.items() if v is not None) or "-"
    rows = [("strategy", s.strategy), ("dataset", s.dataset), ("model", s.model),
            ("examples", f"{s.num_examples} ({s.status})"),
            ("tokens/s (median)", f"{s.tokens_per_second_median:.2f}" if s.tokens_per_second_median else "-"),
            ("time/token s (median)", f"{s.time_per_token_median:.4f}" if s.time_per_token_median else "-"),
            ("prefill s (median)", f"{s.prefill_seconds_median:.3f}" if s.prefill_seconds_median is not None else "-"),
            ("avg exit layer", f"{s.avg_exit_layer:.2f}" if s.avg_exit_layer is not None else "-"),
            ("acceptance rate", f"{s.acceptance_rate:.3f}" if s.acceptance_rate is not None else "-"),
            ("quality", scores)]
    width = max(len(k) for k, _ in rows)
    return "\n".join([f"| {'field':{width}s} | value |", f"|{'-' * (width + 2)}|-------|"]
                     + [f"| {k:{width}s} | {v} |" for k, v in rows])


def main() -> int:
    args = make_parser(__doc__).parse_args()
    require_single_process()
    from harness.runner import Benchmark

    bench = Benchmark(from_args(RunConfig, args), from_args(GenerationConfig, args))
    path, summary = bench.execute()
    print(format_summary(summary))
    print(f"run log: {path}")
    return 0 if summary.status == "complete" else 1


if __name__ == "__main__":
    sys.exit(run_main(main))
