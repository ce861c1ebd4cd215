"""Benchmark a decoding method on a task: speed, exit depth and quality, logged per example.

    torchrun benchmark.py --dataset cnn_dm_summarization --num_samples 10 \\
        --generation_strategy self_speculative --exit_layer 8 --num_speculations 6

Writes a new run directory under --output_dir (run.json, examples.jsonl, summary.json; see README)
and prints a summary table. Under torchrun --nproc_per_node N, the N processes share the examples
(every N-th each) and rank 0 merges their records.

Compare configurations in ONE invocation (--strategies or --sweep): every example is then run by every
configuration back to back, in an order rotated per example (a Latin square), after an untimed
full-model warm-up on that prompt, with the baseline run twice (the second copy is the A/A control
that shows the noise floor). Each configuration gets its own run directory inside one folder, followed
by the report (report.csv, report.md, PNG plots; see harness/report/). Speed is decode time per
token (prefill excluded); use --fixed_length for pure speed comparisons:

    benchmark.py --strategies all --num_samples 10 --fixed_length --max_steps 48
    benchmark.py --strategies autoregressive:exit_layer=15,self_speculative:exit_layer=8:num_speculations=6
    benchmark.py --generation_strategy self_speculative --sweep exit_layer=4,6,8 num_speculations=2,4,6
"""
from __future__ import annotations

import dataclasses
import sys

from harness.cli import make_parser, run_main
from harness.config import GenerationConfig, RunConfig, from_args


def format_summary(s) -> str:
    """A small Markdown table of one run's summary."""
    scores = ", ".join(f"{k} {v:.4f}" for k, v in s.metrics.items() if v is not None) or "-"
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    rows = [("strategy", s.strategy), ("dataset", s.dataset), ("model", s.model),
            ("examples", f"{s.num_examples} ({s.status})"),
            ("decode ms/token (median)", fmt(s.decode_time_per_token_median and 1e3 * s.decode_time_per_token_median,
                                             ".2f")),
            ("prefill s (median)", fmt(s.prefill_seconds_median, ".3f")),
            ("end-to-end tokens/s (median)", fmt(s.e2e_tokens_per_second_median, ".2f")),
            ("avg exit layer (decoded tokens)", fmt(s.avg_exit_layer, ".2f")),
            ("acceptance rate", fmt(s.acceptance_rate, ".3f")),
            ("quality", scores)] + ([("error", s.error)] if s.error else [])
    width = max(len(k) for k, _ in rows)
    return "\n".join([f"| {'field':{width}s} | value |", f"|{'-' * (width + 2)}|-------|"]
                     + [f"| {k:{width}s} | {v} |" for k, v in rows])


def main() -> int:
    from harness.plan import all_members

    parser = make_parser(__doc__)
    multi = parser.add_argument_group("several configurations in one invocation")
    multi.add_argument("--strategies", default=None,
                       help="comma-separated strategies, each optionally with :knob=value overrides, or 'all' "
                            f"({all_members()}); shared flags reach the strategies they apply to "
                            "(default: %(default)s)")
    multi.add_argument("--sweep", nargs="+", default=None, metavar="KNOB=V1,V2",
                       help="grid over knobs of --generation_strategy, e.g. exit_layer=4,6,8 "
                            "num_speculations=2,4,6 (default: %(default)s)")
    multi.add_argument("--no_control", dest="control", action="store_false",
                       help="with --strategies/--sweep: skip the A/A control (a second copy of the baseline in the "
                            "rotation, whose speedup is the noise floor); on by default")
    multi.add_argument("--resume", default=None, metavar="RUN_DIR",
                       help="finish an interrupted run directory, or a multi-configuration folder: recorded "
                            "examples are kept and skipped, configurations come from the run.json files; a flag "
                            "given with it that differs from the run's is refused (default: %(default)s)")
    args = parser.parse_args()
    from harness import distributed

    if args.resume:
        from harness.resume import refuse_flags_with_resume, resume

        refuse_flags_with_resume(args.resume, args, args._explicit - {"resume"})
        dist = distributed.init()  # torchrun: each rank resumes from its own shard file
        try:
            results = resume(args.resume, dist=dist, device=distributed.device_for(args.device, dist)
                             if dist.active else None)
        finally:
            distributed.finish(dist)
        if dist.rank == 0:
            print_runs(results)
            if len(results) > 1:
                report(results[0][0].parent)
        return 0 if all(s.status == "complete" for _, s in results) else 1
    run_cfg, gen_cfg = from_args(RunConfig, args), from_args(GenerationConfig, args)
    from harness.provenance import git_commit

    git_commit()  # the commit of the code loaded now, before any edit to the tree during a long run
    dist = distributed.init()  # torchrun with N processes: each takes every N-th example
    run_cfg = dataclasses.replace(run_cfg, device=distributed.device_for(run_cfg.device, dist))
    try:
        return run(run_cfg, gen_cfg, task_list(run_cfg.dataset), args.strategies, args.sweep, dist, args.control)
    finally:
        distributed.finish(dist)


def task_list(spec: str) -> list[str]:
    """--dataset a,b,... or all -> task names (validated)."""
    from harness.config import UsageError
    from harness.tasks import ALL_TASKS, get_task  # the task registry says which tasks `all` runs

    names = list(ALL_TASKS) if spec.strip() == "all" else [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise UsageError("--dataset is empty")
    for n in names:
        get_task(n)
    return names


def run(run_cfg: RunConfig, gen_cfg: GenerationConfig, datasets: list[str], strategies, sweep, dist,
        control=True) -> int:
    """Every configuration on every task, one loaded model.

    One task and one configuration: one run directory under --output_dir and its summary. Otherwise each task
    gets a `<task>_multi` folder with one run directory per configuration, every configuration on the same
    examples, interleaved (runner.run_many); several tasks put their folders under one `tasks` folder; then one
    report over all. Each task keeps its own prompts, stop strings, metric and default max_steps; several tasks
    without --strategies / --sweep run --generation_strategy beside the baseline.
    """
    from pathlib import Path

    from harness.config import UsageError
    from harness.distributed import broadcast
    from harness.generators import baseline_name
    from harness.logs import new_run_dir
    from harness.model import load_model
    from harness.plan import configurations
    from harness.runner import Benchmark, run_many

    several_tasks = len(datasets) > 1
    if several_tasks and run_cfg.data_path:
        raise UsageError("--data_path names one file: use it with a single --dataset")
    if strategies and sweep:
        raise UsageError("use either --strategies or --sweep, not both")
    if sweep and not several_tasks and gen_cfg.generation_strategy == baseline_name():
        raise UsageError("--sweep needs --generation_strategy (the method whose knobs are swept)")
    if not several_tasks and not (strategies or sweep):
        path, summary = Benchmark(dataclasses.replace(run_cfg, dataset=datasets[0]), gen_cfg).execute(dist=dist)
        if dist.rank == 0:
            print_runs([(path, summary)])
        return 0 if summary.status == "complete" else 1
    model = load_model(run_cfg.model, run_cfg.device, run_cfg.dtype, run_cfg.device_map, run_cfg.exits, run_cfg.core)
    configs = configurations(gen_cfg, strategies, sweep, model.num_layers, model.exits)
    # several tasks with the baseline alone run it once per task, without an A/A control
    control = control and (len(configs) > 1 or not several_tasks)
    tasks = None
    if several_tasks:
        tasks = Path(broadcast(str(new_run_dir(run_cfg.output_dir, "tasks")) if dist.rank == 0 else None, dist))
    ok = True
    for name in datasets:
        task_cfg = dataclasses.replace(run_cfg, dataset=name, output_dir=str(tasks) if tasks else run_cfg.output_dir)
        folder, summaries = run_many(task_cfg, configs, model=model, dist=dist, control=control)
        ok = ok and all(s.status == "complete" for s in summaries)
    if dist.rank == 0:
        report(tasks or folder)
    return 0 if ok else 1


def print_runs(results) -> None:
    """Each run's summary table and where its log is."""
    for path, summary in results:
        print(format_summary(summary))
        print(f"run log: {path}")


def report(parent) -> None:
    from harness.report import markdown, write_report

    df, files = write_report([str(parent)], str(parent / "report"))
    print(markdown(df))  # includes the A/A control's noise floor and its warning, if any
    print(f"runs: {parent}\nreport: {', '.join(str(f) for f in files)}")


if __name__ == "__main__":
    sys.exit(run_main(main))
