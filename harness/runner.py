"""The benchmark loop: load, warm up, generate, score, log — one record at a time."""
from __future__ import annotations

import dataclasses
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

from .config import GenerationConfig, RunConfig, UsageError
from .generators import Generator, GenerationResult, StopCondition, build_generator
from .logs import SCHEMA_VERSION, ExampleRecord, RunInfo, RunWriter, Summary, new_run_dir
from .metrics import METRICS
from .model import LayeredModel, load_model
from .tasks import DATA_DIR, Example, Task, get_task, load_examples

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
           "device": str(device), "device_name": platform.processor() or platform.machine()}
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
    return env


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

    def __init__(self, run: RunConfig, gen: GenerationConfig, model: Optional[LayeredModel] = None):
        self.run, self.gen = run, gen
        self.task: Task = get_task(run.dataset)
        if run.num_samples is not None and run.num_samples < 0:
            raise UsageError(f"--num_samples must be >= 0, got {run.num_samples}")
        self.examples = load_examples(run.dataset, run.num_samples, run.n_shot, gen.seed, run.data_path,
                                      run.data_source)
        if not self.examples:
            raise UsageError(f"no examples to evaluate in {run.data_path or self.task.eval_file}")
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

    def execute(self, progress: bool = True) -> tuple[Path, Summary]:
        """Run every example, appending each record as it finishes; always leave a summary behind."""
        path = new_run_dir(self.run.output_dir, f"{self.task.name}_{self.generator.name}")
        info = self.info(path.name)
        writer = RunWriter(path, info)
        status, error = "complete", None
        try:
            self.warm_up()
            for i, ex in enumerate(tqdm(self.examples, desc=f"{self.generator.name} on {self.task.name}",
                                        unit="ex", disable=not progress, file=sys.stderr)):
                writer.append(self.evaluate(i, ex))
        except KeyboardInterrupt:
            status, error = "interrupted", "interrupted by the user"
            raise
        except Exception as e:
            status, error = "failed", f"{type(e).__name__}: {e}"
            raise
        finally:
            summary = writer.finish(info, status, error)
        return path, summary
