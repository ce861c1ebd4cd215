"""Every registered method on the same prompts, in one process, against autoregressive.

For each dataset the configurations below (defaults unless stated; thresholds NOT tuned on the evaluated
data) run through the harness's measurement protocol (harness.runner.run_many): every example by every
configuration back to back in a rotated order, after an untimed full-model warm-up on that prompt,
with the A/A control, exactly --max_steps tokens each (--fixed_length; quality is still scored on the
text up to the first stop). Prints the report: decode time per token, decode speedup (median of
per-example ratios), spread, exit depth, acceptance, layer forwards and FLOPs per token, quality.

    .venv/bin/python bench/all_strategies.py [--datasets cnn_dm_summarization,gsm8k] [--num_samples 10]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.config import GenerationConfig, RunConfig  # noqa: E402
from harness.model import load_model  # noqa: E402
from harness.report import markdown, write_report  # noqa: E402
from harness.runner import run_many  # noqa: E402

CONFIGS = [
    ("autoregressive", {}),
    ("static exit E=15", dict(exit_layer=15)),
    ("self_speculative E=8 k=6", dict(generation_strategy="self_speculative", exit_layer=8, num_speculations=6)),
    ("self_speculative E=20 k=4", dict(generation_strategy="self_speculative", exit_layer=20, num_speculations=4)),
    ("calm softmax", dict(generation_strategy="calm")),
    ("calm softmax +vocab fixed", dict(generation_strategy="calm", vocab_reduction="fixed")),
    ("calm hidden_state", dict(generation_strategy="calm", confidence="hidden_state")),
    ("calm contrastive +vocab adaptive", dict(generation_strategy="calm", confidence="contrastive",
                                              vocab_reduction="adaptive")),
    ("free", dict(generation_strategy="free")),
    ("free adaptive", dict(generation_strategy="free", adaptive_threshold=True)),
    ("dynamic cosine_similarity", dict(criteria="cosine_similarity")),
    ("dynamic token_repeat", dict(criteria="token_repeat")),
    ("dynamic entropy_based", dict(criteria="entropy_based")),
    ("dynamic max_probability", dict(criteria="max_probability")),
    ("dynamic convergence", dict(criteria="convergence")),
    ("dynamic max_probability +vocab decaying", dict(criteria="max_probability", vocab_reduction="decaying")),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="as benchmark.py --model (default: embedded SmolLM2)")
    p.add_argument("--datasets", default="cnn_dm_summarization,gsm8k", help="(default: %(default)s)")
    p.add_argument("--num_samples", type=int, default=10, help="examples per dataset (default: %(default)s)")
    p.add_argument("--max_steps", type=int, default=48, help="new tokens per generation (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=1, help="timed repeats per cell (default: %(default)s)")
    p.add_argument("--only", default=None, help="comma-separated substrings selecting configurations")
    p.add_argument("--device", default="auto", help="(default: %(default)s)")
    p.add_argument("--dtype", default="auto", help="(default: %(default)s)")
    p.add_argument("--output_dir", default="results/all_strategies", help="(default: %(default)s)")
    a = p.parse_args()
    model = load_model(a.model, a.device, a.dtype)
    chosen = [kw for label, kw in CONFIGS if label == "autoregressive" or not a.only
              or any(x in label for x in a.only.split(","))]
    for dataset in a.datasets.split(","):
        run = RunConfig(model=a.model, dataset=dataset, num_samples=a.num_samples, output_dir=a.output_dir,
                        device=a.device, dtype=a.dtype, repeats=a.repeats, fixed_length=True)
        configs = [GenerationConfig(max_steps=a.max_steps, **kw) for kw in chosen]
        parent, _ = run_many(run, configs, model=model)
        df, _files = write_report([str(parent)], str(parent / "report"))
        print(markdown(df), flush=True)
        print(f"runs and report: {parent}")


if __name__ == "__main__":
    main()
