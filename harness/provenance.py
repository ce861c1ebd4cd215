"""What a run log says about where it was made: the code's commit, the machine, the data's and prompts' hashes,
the exit artifact's verdict and knobs, and the cost curve timed in this invocation."""
from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import torch

from .config import RunConfig
from .generators import Generator
from .identity import library_versions
from .model import LayeredModel
from .tasks import DATA_DIR, Task


@functools.lru_cache(maxsize=1)
def git_commit() -> Optional[str]:
    """HEAD (+ "-dirty" if tracked files outside results/ differ), read once per process: the code this process
    loaded at its start, even if the working tree is edited while a long run goes on (benchmark.py calls it first
    thing)."""
    return commit_of(Path(__file__).resolve().parents[1])


def commit_of(root: Path) -> Optional[str]:
    """`root`'s HEAD (+ "-dirty" if tracked files outside results/ differ), None outside a git checkout. results/
    holds what the harness writes: `make results` first removes the committed logs it replaces, and that must not
    make its own runs look as if uncommitted code had made them."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)results"], cwd=root, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if sha.returncode != 0:
        return None
    return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else platform's guess: speed figures belong to a machine, and
    "x86_64" names none."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    versions = library_versions()
    env = {"python": sys.version.split()[0], "platform": platform.platform(), "cpu_count": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "packages": versions, "git_commit": git_commit(),
           "device": str(device), "device_name": cpu_name(),
           "world_size": int(os.environ.get("WORLD_SIZE", 1)),
           "nodes": max(1, int(os.environ.get("WORLD_SIZE", 1)) // int(os.environ.get("LOCAL_WORLD_SIZE", 1) or 1)),
           "processes_per_node": int(os.environ.get("LOCAL_WORLD_SIZE", 1))}
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
    return env


def speculation_verdict(generator: Generator) -> Optional[dict]:
    """The attached artifact's speculation verdict for this method: the exit adapters' self-speculation
    recommendation, or a trained drafter's (speedup_model.drafter_verdict); None for other methods."""
    from .speedup_model import costed_on, drafter_verdict, recommendation

    art = getattr(generator.model, "exits", None)
    if art is None:
        return None
    if generator.artifact_key() != "self_speculative":
        v = drafter_verdict(art, generator.artifact_key())
        if v is None:
            return None
        hardware = (art.provenance.get(generator.drafter_name()) or {}).get("hardware") \
            if hasattr(generator, "drafter_name") else None
        return dict(v, fitted_dtype=v["costed_on"]["dtype"], fitted_device=v["costed_on"]["device"],
                    fitted_hardware=hardware)
    rec = recommendation(art)
    if rec is None:
        return None
    # the prediction rests on costs timed on one device in one dtype: say which (a run elsewhere is told so); a
    # verdict re-costed where this run happens (trained_exits.recost_where_run) names its own
    on = costed_on(art, rec)
    hardware = None if "recosted_from" in rec else art.provenance.get("exit_adapters", {}).get("hardware")
    return dict(rec, fitted_dtype=on["dtype"], fitted_device=on["device"], fitted_hardware=hardware)


def invocation_cost_curve(model: LayeredModel) -> Optional[dict]:
    """The core's cost curve (k = 1, 2, 4, 8 after 400 cached positions; harness.cost_curve), measured once per
    loaded model (~3 s here) so that every run.json says what a pass cost in this invocation; None where a pass
    is not cheap to time (weights offloaded by a device map), or where $EE_HARNESS_COST_CURVE is 0 (the test suite's
    many short CLI runs; the report's oracle column is then blank)."""
    if os.environ.get("EE_HARNESS_COST_CURVE", "1") == "0":
        return None
    if getattr(model, "cost_curve", None) is None:
        if model.device_map and any(v in ("cpu", "disk") for v in model.device_map.values()):
            return None
        from .cost_curve import measure

        context = max(1, min(400, model.max_context - 16))
        model.cost_curve = measure(model, context=context, reps=3, ks=(1, 2, 4, 8), quick=True).as_dict()
    return model.cost_curve


def trained_note(generator: Generator) -> str:
    """One line: which knobs a configuration took from the exit artifact, and whether its calibration never exits."""
    art = generator.model.exits
    taken = ", ".join(f"{k}={v}" for k, v in sorted(generator.trained_knobs.items()))
    cal = art.thresholds.get(generator.artifact_key(), {}) if art is not None else {}
    never = " (calibrated to never exit early: its certificate found no faster setting)" \
        if cal.get("exits_early") is False and set(cal.get("knobs", {})) <= set(generator.trained_knobs) else ""
    return f"{taken} from the exit artifact{never}; a flag you type wins (--exits none: untrained defaults)"


def sha256_of(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, ensure_ascii=False).encode()).hexdigest()


def data_sha256(run: RunConfig, task: Task) -> Optional[str]:
    """Content hash of the evaluated data file (None for --data_source hf)."""
    if run.data_path is None and run.data_source == "hf":
        return None
    path = Path(run.data_path) if run.data_path else DATA_DIR / task.eval_file
    return hashlib.sha256(path.read_bytes()).hexdigest()
