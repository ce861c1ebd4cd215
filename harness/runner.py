"""The benchmark loop: load, warm up, generate, score, log — one record at a time."""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from .config import GenerationConfig, RunConfig, UsageError, for_strategy, parse_value
from .generators import Generator, GenerationResult, StopCondition, build_generator
from .distributed import Dist, barrier, broadcast
from .logs import SCHEMA_VERSION, ExampleRecord, RunInfo, RunWriter, Summary, merge_shards, new_run_dir, summarize
from .metrics import METRICS
from .model import LayeredModel, load_model
from .tasks import DATA_DIR, Example, Task, get_task, load_examples

SINGLE = Dist(0, 1, 0)
PACKAGES = ("torch", "transformers", "tokenizers", "lm-eval", "datasets", "rouge-score", "pandas", "gguf")


def git_commit() -> Optional[str]:
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if sha.returncode != 0:
        return None
    return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def environment(device: torch.device) -> dict:
    versions = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    env = {"python": sys.version.split()[0], "platform": platform.platform(), "cpu_count": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "packages": versions, "git_commit": git_commit(),
           "device": str(device), "device_name": platform.processor() or platform.machine(),
           "world_size": int(os.environ.get("WORLD_SIZE", 1))}
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
    return env


def resume_configs(path: str) -> tuple[Path, RunConfig, GenerationConfig]:
    """The run and generation configs recorded in an existing run directory (for --resume)."""
    run_dir = Path(path)
    try:
        info = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
        return run_dir, RunConfig(**info["run"]), GenerationConfig(**info["generation"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise UsageError(f"--resume {path}: not a readable run directory ({e})") from None


def load_run_examples(run: RunConfig, seed: int) -> list[Example]:
    if run.num_samples is not None and run.num_samples < 0:
        raise UsageError(f"--num_samples must be >= 0, got {run.num_samples}")
    examples = load_examples(run.dataset, run.num_samples, run.n_shot, seed, run.data_path, run.data_source)
    if not examples:
        raise UsageError(f"no examples to evaluate in {run.data_path or get_task(run.dataset).eval_file}")
    return examples


def cut_at_stop(text: str, stops: tuple) -> str:
    """The continuation up to (not including) the first stop string."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=len(text))
    return text[:cut]


def _per(total: float, n: int) -> Optional[float]:
    return total / n if n > 0 else None


def make_record(index: int, ex: Example, prompt_ids: list, truncated: bool, res: GenerationResult,
                prediction: str, metrics: dict) -> ExampleRecord:
    n = len(res.tokens)
    total = res.prefill_seconds + res.decode_seconds
    return ExampleRecord(
        id=ex.id, index=index, prompt=ex.prompt, prediction=prediction, reference=ex.reference, metrics=metrics,
        prompt_tokens=len(prompt_ids), prompt_truncated=truncated, new_tokens=n, token_ids=res.tokens,
        stop_reason=res.stop_reason, prefill_seconds=res.prefill_seconds, decode_seconds=res.decode_seconds,
        total_seconds=total, tokens_per_second=_per(n, total) if total > 0 else None,
        decode_tokens_per_second=(n - 1) / res.decode_seconds if n > 1 and res.decode_seconds > 0 else None,
        time_per_token=_per(total, n), exit_layers=res.exit_layers,
        avg_exit_layer=_per(sum(res.exit_layers), len(res.exit_layers)), layer_forwards=res.layer_forwards,
        layer_forwards_per_token=_per(res.layer_forwards, n - 1), exit_head_flops=res.exit_head_flops,
        exit_head_flops_per_token=_per(res.exit_head_flops, n - 1), confidence_flops=res.confidence_flops,
        confidence_flops_per_token=_per(res.confidence_flops, n - 1), drafted=res.drafted, accepted=res.accepted,
        acceptance_rate=res.accepted / res.drafted if res.drafted else None)


class Benchmark:
    """A model + generator + task, ready to run over examples and log each one."""

    def __init__(self, run: RunConfig, gen: GenerationConfig, model: Optional[LayeredModel] = None,
                 examples: Optional[list[Example]] = None):
        self.run, self.gen = run, gen
        self.task: Task = get_task(run.dataset)
        self.examples = examples if examples is not None else load_run_examples(run, gen.seed)
        self.model = model or load_model(run.model, run.device, run.dtype)
        self.max_steps = gen.max_steps or self.task.max_steps
        self.generator: Generator = build_generator(self.model, dataclasses.replace(gen, max_steps=self.max_steps))
        context = getattr(self.model.config, "max_position_embeddings", 4096)
        self.max_prompt = run.max_prompt_tokens or max(context - self.max_steps, 1)

    def prompt_ids(self, ex: Example) -> tuple[list[int], bool]:
        ids = self.model.encode(ex.prompt, chat=self.run.chat_template)
        if len(ids) > self.max_prompt:
            return ids[-self.max_prompt:], True
        return ids, False

    def stop(self) -> StopCondition:
        return StopCondition(self.model, self.max_steps, self.task.stop)

    def info(self, run_id: str) -> RunInfo:
        task = {"name": self.task.name, "metric": self.task.metric, "stop": list(self.task.stop),
                "max_steps": self.max_steps, "n_shot": self.run.n_shot, "num_examples": len(self.examples),
                "data": self.run.data_path or (f"hf:{self.task.hf[0]}" if self.run.data_source == "hf"
                                               else str(Path(DATA_DIR.name) / self.task.eval_file))}
        model = dict(self.model.describe(), load_seconds=self.model.load_seconds, source=self.run.model)
        return RunInfo(schema_version=SCHEMA_VERSION, run_id=run_id, created=datetime.now(timezone.utc).isoformat(),
                       command=list(sys.argv), strategy=self.generator.name, knobs=self.generator.knobs(),
                       generation=dataclasses.asdict(self.gen), run=dataclasses.asdict(self.run), task=task,
                       model=model, environment=environment(self.model.device))

    def evaluate(self, index: int, ex: Example) -> ExampleRecord:
        ids, truncated = self.prompt_ids(ex)
        res = self.generator.generate(ids, self.stop())
        prediction = cut_at_stop(self.model.decode(res.tokens), self.task.stop)
        metrics = METRICS[self.task.metric](prediction, ex)
        return make_record(index, ex, ids, truncated, res, prediction, metrics)

    def warm_up(self) -> None:
        if self.run.warmup <= 0:
            return
        ids, _ = self.prompt_ids(self.examples[0])
        for _ in range(self.run.warmup):
            self.generator.generate(ids, StopCondition(self.model, min(self.max_steps, 16), ()))

    def execute(self, progress: bool = True, parent: Optional[Path] = None,
                resume: Optional[Path] = None, dist: Dist = SINGLE) -> tuple[Path, Summary]:
        """Run every example, appending each record as it finishes; always leave a summary behind.

        With `resume` (an existing run directory of this configuration), examples already recorded there
        are kept and skipped. Under torchrun (`dist.active`) this process takes every world-th example and
        rank 0 merges the shards at the end.
        """
        if resume is not None and dist.active:
            raise UsageError("--resume runs in one process; launch it without torchrun's extra processes")
        if resume is None:
            label = f"{self.task.name}_{self.generator.name}"
            path = Path(broadcast(str(new_run_dir(parent or self.run.output_dir, label)) if dist.rank == 0
                                  else None, dist))
            info = self.info(path.name)
        else:
            path, info = resume, RunInfo(**json.loads((resume / "run.json").read_text(encoding="utf-8")))
        writer = RunWriter(path, info, resume=resume is not None, shard=dist.rank if dist.active else None)
        done = {r.index for r in writer.records}
        for r in writer.records:
            if r.index >= len(self.examples) or self.examples[r.index].id != r.id:
                raise UsageError(f"--resume {path}: its example {r.index} ({r.id}) is not this run's; data changed?")
        status, error = "complete", None
        try:
            todo = [(i, ex) for i, ex in enumerate(self.examples) if i not in done and i % dist.world == dist.rank]
            if todo:
                self.warm_up()
            for i, ex in tqdm(todo, desc=f"{self.generator.name} on {self.task.name}", unit="ex",
                              disable=not progress or dist.rank > 0, file=sys.stderr, initial=len(done),
                              total=len(self.examples) if not dist.active else len(todo)):
                writer.append(self.evaluate(i, ex))
        except KeyboardInterrupt:
            status, error = "interrupted", "interrupted by the user"
            raise
        except Exception as e:
            status, error = "failed", f"{type(e).__name__}: {e}"
            raise
        finally:
            if dist.active:
                writer.close()  # this rank's records are on disk in examples.rank<R>.jsonl
            else:
                summary = writer.finish(info, status, error)
        if dist.active:
            barrier(dist)
            if dist.rank == 0:
                writer.records = merge_shards(path, dist.world)
                summary = writer.finish(info)
            else:
                summary = summarize(info, writer.records, status, error)  # this rank's share, not written
            barrier(dist)
        return path, summary


# -- several configurations in one invocation -------------------------------------------------------
def parse_spec(spec: str) -> tuple[str, dict]:
    """'self_speculative:exit_layer=8:num_speculations=6' -> (strategy, typed overrides)."""
    name, *parts = spec.strip().split(":")
    overrides = {}
    for part in parts:
        if "=" not in part:
            raise UsageError(f"strategy spec {spec!r}: expected knob=value after ':', got {part!r}")
        k, v = part.split("=", 1)
        overrides[k] = parse_value(k, v)
    return name, overrides


def expand_strategies(text: str, base: GenerationConfig, num_layers: int) -> list[GenerationConfig]:
    """--strategies a,b:k=v,... or all -> configs, the full-depth autoregressive baseline first."""
    from .config import CRITERIA
    from .generators import load_all

    specs: list[tuple[str, dict]] = []
    for item in text.split(","):
        if item.strip() == "all":
            specs += [("autoregressive", {}), ("self_speculative", {}), ("calm", {}), ("free", {})]
            specs += [("dynamic", {"criteria": c}) for c in ([base.criteria] if base.criteria else CRITERIA)]
        elif item.strip():
            specs.append(parse_spec(item))
    known = load_all()
    configs = [for_strategy(base, "autoregressive")]
    for name, over in specs:
        if name not in known:
            raise UsageError(f"unknown strategy {name!r} in --strategies; choose from: {', '.join(sorted(known))}")
        if name == "autoregressive" and not over:
            continue  # the baseline is already first
        if name == "self_speculative" and base.exit_layer is None and "exit_layer" not in over:
            over = {"exit_layer": max(1, num_layers // 4), **over}  # LayerSkip's typical E ~ L/4
        if name == "dynamic" and "criteria" not in over:
            over = {"criteria": base.criteria or CRITERIA[0], **over}
        configs.append(for_strategy(base, name, **over))
    return configs


def expand_sweep(items: list[str], base: GenerationConfig) -> list[GenerationConfig]:
    """--sweep exit_layer=4,6,8 num_speculations=2,4 -> the grid for --generation_strategy, baseline first."""
    import itertools

    axes = []
    for item in items:
        if "=" not in item:
            raise UsageError(f"--sweep expects knob=v1,v2,..., got {item!r}")
        k, vals = item.split("=", 1)
        axes.append([(k, parse_value(k, v)) for v in vals.split(",") if v])
    strategy = base.generation_strategy
    configs = [for_strategy(base, "autoregressive")]
    for combo in itertools.product(*axes):
        configs.append(for_strategy(base, strategy, **dict(combo)))
    return configs


def run_many(run: RunConfig, configs: list[GenerationConfig], progress: bool = True,
             model: Optional[LayeredModel] = None, dist: Dist = SINGLE) -> tuple[Path, list[Summary]]:
    """Every configuration on the same examples with one loaded model; one run directory each."""
    model = model or load_model(run.model, run.device, run.dtype)
    examples = load_run_examples(run, configs[0].seed)
    benches = [Benchmark(run, cfg, model, examples) for cfg in configs]  # validate all before running any
    parent = Path(broadcast(str(new_run_dir(run.output_dir, f"{run.dataset}_multi")) if dist.rank == 0 else None,
                            dist))
    summaries = [b.execute(progress, parent, dist=dist)[1] for b in benches]
    return parent, summaries
