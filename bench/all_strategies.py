"""Every registered method on the same prompts, in one process, against autoregressive.

For each dataset: the same examples go through each configuration below (defaults unless stated;
thresholds are NOT tuned on the evaluated data). Each generator is warmed up once; timers synchronize
the device. Prints per configuration: median end-to-end tokens/s, speedup = that median over the
autoregressive median, average exit layer, acceptance (speculative), layer forwards and exit-head
MFLOPs per decoded token, and quality (ROUGE-L or exact match, mean over the examples).

    .venv/bin/python bench/all_strategies.py [--datasets cnn_dm_summarization,gsm8k] [--num_samples 3]
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.config import GenerationConfig  # noqa: E402
from harness.generators import StopCondition, build_generator  # noqa: E402
from harness.metrics import METRICS  # noqa: E402
from harness.model import load_model  # noqa: E402
from harness.runner import cut_at_stop  # noqa: E402
from harness.tasks import get_task, load_examples  # noqa: E402

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
    p.add_argument("--num_samples", type=int, default=3, help="examples per dataset (default: %(default)s)")
    p.add_argument("--max_steps", type=int, default=48, help="new tokens at most (default: %(default)s)")
    p.add_argument("--only", default=None, help="comma-separated substrings selecting configurations")
    p.add_argument("--device", default="auto", help="(default: %(default)s)")
    p.add_argument("--dtype", default="auto", help="(default: %(default)s)")
    a = p.parse_args()
    model = load_model(a.model, a.device, a.dtype)
    configs = [c for c in CONFIGS if c[0] == "autoregressive" or not a.only
               or any(s in c[0] for s in a.only.split(","))]
    for dataset in a.datasets.split(","):
        task = get_task(dataset)
        examples = load_examples(dataset, a.num_samples, n_shot=0)
        prompts = [model.encode(e.prompt) for e in examples]
        print(f"\n## {dataset}: {len(examples)} examples, max_steps {a.max_steps}, {model.name} on {model.device}")
        print("| method | tok/s (median) | speedup | avg exit | acceptance | layers/token | head MFLOP/token "
              "| quality |")
        print("|---|---|---|---|---|---|---|---|")
        base = None
        for label, kw in configs:
            gen = build_generator(model, GenerationConfig(**kw))
            gen.generate(prompts[0], StopCondition(model, 8, task.stop))  # warm-up
            tps, exits, drafted, accepted, layers, flops, decoded, quality = [], [], 0, 0, 0, 0.0, 0, []
            for ex, ids in zip(examples, prompts):
                r = gen.generate(ids, StopCondition(model, a.max_steps, task.stop))
                tps.append(len(r.tokens) / (r.prefill_seconds + r.decode_seconds))
                exits += r.exit_layers
                drafted += r.drafted or 0
                accepted += r.accepted or 0
                layers += r.layer_forwards
                flops += r.exit_head_flops
                decoded += max(len(r.tokens) - 1, 0)
                scores = METRICS[task.metric](cut_at_stop(model.decode(r.tokens), task.stop), ex)
                quality.append(scores.get("rougeL", scores.get("exact_match", scores.get("pass_at_1"))))
            med = statistics.median(tps)
            base = base or med
            acc = f"{accepted / drafted:.3f}" if drafted else "-"
            print(f"| {label} | {med:.2f} | {med / base:.2f}x | {statistics.fmean(exits):.1f} | {acc} | "
                  f"{layers / max(decoded, 1):.1f} | {flops / max(decoded, 1) / 1e6:.1f} | "
                  f"{statistics.fmean(quality):.3f} |", flush=True)


if __name__ == "__main__":
    main()
