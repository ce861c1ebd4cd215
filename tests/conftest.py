"""Shared fixtures: the real embedded model (loaded once) and real prompts from the bundled data."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Under pytest-xdist (make test runs two workers) the cores are shared: each worker and the CLIs it spawns get
# their share of threads, so that OpenMP does not oversubscribe them.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _share = str(max(1, (os.cpu_count() or 1) // _WORKERS))
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = _share
    torch.set_num_threads(int(_share))
torch.set_num_threads(max(1, torch.get_num_threads()))
# The per-invocation cost curve (~3 s of timings in every benchmark.py run.json) is left out of the suite's many
# short CLI runs, in this process and the ones it spawns; tests of the curve itself turn it back on.
os.environ["EE_HARNESS_COST_CURVE"] = "0"


@pytest.fixture(scope="session")
def model():
    from harness.model import load_model

    return load_model(None, "cpu", "float32", exits="none")


@pytest.fixture(scope="session")
def real_prompts():
    """Short real prompts from several bundled tasks (CNN/DM LM prefixes, GSM8K questions, HumanEval)."""
    from harness.tasks import load_examples

    exs = (load_examples("cnn_dm_lm", 4) + load_examples("gsm8k", 4) + load_examples("human_eval", 2))
    return [e.prompt for e in exs]
