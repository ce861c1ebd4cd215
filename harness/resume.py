"""--resume: finish an interrupted run directory (or multi-configuration folder) in place, exactly as it was made."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

from .config import GenerationConfig, RunConfig, UsageError
from .distributed import SINGLE, Dist
from .logs import Summary, lock_run
from .model import load_model
from .runner import Benchmark, execute_schedule, load_run_examples
from .shards import read_run_info


def resume_configs(path: str, dist: Dist = SINGLE) -> tuple[list[Path], RunConfig, list[GenerationConfig], list[bool]]:
    """The configurations recorded under --resume PATH: one run directory, or a multi-configuration folder."""
    root = Path(path)
    own = f"shards/run.rank{dist.rank}.json"  # a rank without rank 0's storage has its own copy
    is_run = lambda d: (d / "run.json").is_file() or (dist.rank > 0 and (d / own).is_file())  # noqa: E731
    dirs = [root] if is_run(root) else sorted(d for d in root.glob("*") if d.is_dir() and is_run(d))
    if not dirs:
        raise UsageError(f"--resume {path}: not a run directory or a folder of run directories")
    try:
        infos = [read_run_info(d, dist) for d in dirs]
        order = sorted(range(len(dirs)), key=lambda k: infos[k].get("schedule", {}).get("config_index", 0))
        dirs, infos = [dirs[k] for k in order], [infos[k] for k in order]
        run = RunConfig(**infos[0]["run"])
        gens = [GenerationConfig(**i["generation"]) for i in infos]
        return dirs, run, gens, [bool(i.get("control")) for i in infos]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise UsageError(f"--resume {path}: not a readable run directory ({e})") from None


def refuse_flags_with_resume(path: str, args, typed: set) -> None:
    """--resume continues a run exactly as it was configured: a typed flag that differs from the run's is refused."""
    if not typed:
        return
    _, run, gens, _ = resume_configs(path)
    run_fields = {f.name for f in dataclasses.fields(RunConfig)}
    gen_fields = {f.name for f in dataclasses.fields(GenerationConfig)}
    for name in sorted(typed):
        value = getattr(args, name)
        if name in run_fields:
            recorded = [getattr(run, name)]
        elif name in gen_fields:
            recorded = [getattr(g, name) for g in gens]
        else:
            raise UsageError(f"--{name} cannot be given with --resume: the configurations come from the run directory")
        if any(value != r for r in recorded):
            raise UsageError(f"--{name} {value} differs from the run's {recorded[0] if len(set(map(str, recorded))) == 1 else recorded}: "
                             "--resume continues a run as it was made; start a new run to change it")


def resume(path: str, progress: bool = True, dist: Dist = SINGLE, device: Optional[str] = None
           ) -> list[tuple[Path, Summary]]:
    """Finish an interrupted run (or multi-configuration folder) in place; under torchrun each rank
    resumes from its own shard file."""
    dirs, run, gens, controls = resume_configs(path, dist)
    if not dist.active:  # one writer per run directory, taken before any model time is spent
        for d in dirs:
            lock_run(d)
    if device is not None:
        run = dataclasses.replace(run, device=device)
    # `--dtype auto` is resolved again by measurement: resume in the dtype the run actually used
    made_in = json.loads((dirs[0] / "run.json").read_text(encoding="utf-8")).get("model", {}).get("dtype")
    dtype = made_in if run.dtype == "auto" and made_in else run.dtype
    model = load_model(run.model, run.device, dtype, run.device_map, run.exits, run.core)
    examples = load_run_examples(run, gens[0].seed)
    benches = [Benchmark(run, g, model, examples, control=c) for g, c in zip(gens, controls)]
    return execute_schedule(benches, dirs[0].parent if len(dirs) > 1 else None, progress, dirs, dist)
