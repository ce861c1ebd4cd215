"""Evaluate an early-exit generator with lm-evaluation-harness (the `early_exit` lm-eval model).

    python eval.py --tasks gsm8k --limit 10 --model_args generation_strategy=self_speculative,exit_layer=8
    python eval.py --tasks cnn_dailymail,xsum --limit 5 --model_args criteria=entropy_based
    python eval.py --tasks humaneval --limit 5 --confirm_run_unsafe_code
    python eval.py --model PATH --tasks gsm8k --limit 10 --generation_strategy self_speculative \\
        --exit_layer 8 --num_speculations 6 --output_dir ./logs                     # LayerSkip's spelling

Bundled, offline task definitions (harness/lm_eval_tasks, taking precedence over lm-eval's own):
gsm8k (lm-eval's format and filters), humaneval (pass@1, executes code: needs
--confirm_run_unsafe_code), cnn_dailymail and xsum (LayerSkip's prompt, ROUGE). Other lm-eval tasks
work when the hub is reachable. Writes lm-eval's results and the generator's speed statistics
(speed.json: tokens/s, average exit layer, acceptance) under --output_path. Loglikelihood tasks run the
full model (or loglikelihood_exit_layer=E): early-exit generation gives them no speedup.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
from datetime import datetime, timezone
from pathlib import Path

from harness.cli import Parser, at_least, require_single_process, run_main, writable_folder
from harness.config import GenerationConfig, add_dataclass_args
from harness.tasks import LM_EVAL_TASKS

TASK_DIR = Path(__file__).resolve().parent / "harness" / "lm_eval_tasks"
BUNDLED = LM_EVAL_TASKS  # the task registry's offline lm-eval tasks (harness/lm_eval_tasks)


def build_parser() -> Parser:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names (bundled: %s)" % ", ".join(BUNDLED))
    p.add_argument("--model_args", default="", help="comma-separated key=value: model (or pretrained), device, dtype, "
                   "loglikelihood_exit_layer and any generation knob of benchmark.py, e.g. "
                   "generation_strategy=self_speculative,exit_layer=8,num_speculations=6 (default: embedded model, "
                   "autoregressive)")
    p.add_argument("--limit", type=limit_value, default=None,
                   help="examples per task: a whole number >= 1, or a fraction in (0, 1) of each task (default: all)")
    p.add_argument("--num_fewshot", type=at_least(0), default=None,
                   help="few-shot exemplars, >= 0 (default: the task's own)")
    p.add_argument("--model", default=None, help="as benchmark.py --model; same as model= in --model_args "
                   "(default: embedded model)")
    p.add_argument("--output_path", "--output_dir", dest="output_path", default="results/lm_eval",
                   help="results go to a new folder under this (--output_dir: LayerSkip's spelling) "
                   "(default: %(default)s)")
    p.add_argument("--log_samples", action="store_true", help="also write per-sample outputs (default: off)")
    p.add_argument("--confirm_run_unsafe_code", action="store_true",
                   help="allow tasks that execute generated code (humaneval) (default: off)")
    p.add_argument("--seed", type=int, default=0, help="lm-eval's random seeds (default: %(default)s)")
    p.add_argument("--baseline", action="store_true",
                   help="also run the autoregressive baseline and an A/A control on every request (rotated order) and "
                        "write comparison.json: paired decode speedup and each metric's delta from the baseline "
                        "(same as baseline=true in --model_args) (default: off)")
    add_dataclass_args(p, GenerationConfig, "generation flags (as benchmark.py; merged into --model_args)",
                       skip=("seed",))
    return p


def limit_value(text: str) -> float:
    """--limit: lm-eval reads a value < 1 as a fraction of the task and anything else as a count."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v) or v <= 0 or (v >= 1 and v != int(v)):
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1 or a fraction in (0, 1), got {text}")
    return v


def new_results_dir(root: Path, tasks: list[str]) -> Path:
    """A new folder under root named by time and tasks (suffixed when two runs start in the same second)."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S") + "_" + "_".join(tasks)
    for k in range(1000):
        out = root / (stamp + (f"_{k}" if k else ""))
        try:
            out.mkdir()
            return out
        except FileExistsError:
            continue
    raise FileExistsError(f"no free results folder name under {root}")


class _QuietOverrides(logging.Filter):
    """Our bundled tasks replace lm-eval's of the same name on purpose: its "overrides existing task" warnings
    (four on every run) would bury the line that matters, so they are dropped; other lm-eval warnings pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not ("overrides existing task" in str(record.msg) and str(TASK_DIR) in str(record.args))


def model_args_from(args: argparse.Namespace) -> dict:
    """--model_args merged with the generation flags given directly (LayerSkip's eval.py spelling)."""
    from lm_eval.utils import simple_parse_args_string

    from harness.config import UsageError

    merged = simple_parse_args_string(args.model_args)
    typed = getattr(args, "_explicit", frozenset())  # flags the user typed, even at their default value
    direct = {f.name: getattr(args, f.name) for f in dataclasses.fields(GenerationConfig)
              if f.name != "seed" and not f.metadata.get("internal")
              and (f.name in typed or getattr(args, f.name) != f.default)}
    if args.model is not None:
        direct["model"] = args.model
    if args.baseline:
        direct["baseline"] = True
    for k, v in direct.items():
        if k in merged and str(merged[k]) != str(v):
            raise UsageError(f"{k} given twice with different values: --{k} {v} and --model_args {k}={merged[k]}")
        merged[k] = v
    return merged


def metric_deltas(method: dict, base: dict) -> dict:
    """Per task and metric: method, baseline and method - baseline (stderr entries skipped)."""
    out = {}
    for task, vals in method.items():
        for k, v in vals.items():
            b = base.get(task, {}).get(k)
            if "stderr" in k or not isinstance(v, (int, float)) or not isinstance(b, (int, float)) \
                    or isinstance(v, bool):
                continue
            out.setdefault(task, {})[k] = {"method": v, "baseline": b, "delta": v - b}
    return out


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def main() -> int:
    args = build_parser().parse_args()
    require_single_process()
    from harness.config import UsageError

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise UsageError("--tasks is empty")
    root = writable_folder(args.output_path, "--output_path")
    model_args = model_args_from(args)
    import lm_eval
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import make_table

    from harness.lm_eval_model import EarlyExitLM, check_model_args
    from harness.model import hub_reachable

    check_model_args(model_args)  # every key known and every value of its type, before the model loads
    logging.getLogger("lm_eval.tasks._index").addFilter(_QuietOverrides())
    manager = TaskManager(include_path=str(TASK_DIR))
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UsageError(f"unknown lm-eval task(s): {', '.join(unknown)}")
    remote = [t for t in tasks if t not in BUNDLED]
    if remote and not hub_reachable():
        raise UsageError(f"task(s) {', '.join(remote)} need the Hugging Face hub, which is unreachable; "
                         f"bundled offline tasks: {', '.join(BUNDLED)}")
    if "humaneval" in tasks and not args.confirm_run_unsafe_code:
        raise UsageError("humaneval executes generated code; pass --confirm_run_unsafe_code to allow it")
    lm = EarlyExitLM(**model_args)

    def evaluate(model):
        return lm_eval.simple_evaluate(model=model, tasks=tasks, limit=args.limit, num_fewshot=args.num_fewshot,
                                       task_manager=manager, log_samples=args.log_samples,
                                       confirm_run_unsafe_code=args.confirm_run_unsafe_code,
                                       random_seed=args.seed, numpy_random_seed=args.seed,
                                       torch_random_seed=args.seed, fewshot_random_seed=args.seed)

    results = evaluate(lm)
    out = new_results_dir(root, tasks)
    samples = results.pop("samples", None)
    (out / "results.json").write_text(json.dumps(_jsonable(results), indent=2) + "\n")
    if samples is not None:
        (out / "samples.json").write_text(json.dumps(_jsonable(samples), indent=2) + "\n")
    speed = lm.speed_summary()
    (out / "speed.json").write_text(json.dumps(speed, indent=2) + "\n")
    if lm.baseline:  # lm-eval scores the baseline's outputs (recorded on the same requests, replayed)
        from harness.lm_eval_model import BaselineReplay

        base = evaluate(BaselineReplay(lm))
        base.pop("samples", None)
        (out / "results_baseline.json").write_text(json.dumps(_jsonable(base), indent=2) + "\n")
        comparison = {"speed": {k: speed.get(k) for k in ("decode_speedup", "decode_speedup_iqr",
                                                          "control_decode_speedup", "control_decode_speedup_iqr",
                                                          "paired_requests", "speedup_definition")},
                      "deltas": metric_deltas(results["results"], base["results"])}
        (out / "comparison.json").write_text(json.dumps(_jsonable(comparison), indent=2) + "\n")
        print(f"vs autoregressive baseline: {json.dumps(comparison)}")
    print(make_table(results))
    print(f"speed: {json.dumps({k: speed[k] for k in ('strategy', 'tokens_per_second_median', 'avg_exit_layer', 'acceptance_rate')})}")
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
