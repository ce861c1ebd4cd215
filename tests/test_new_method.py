"""A new method is one file: dropped into a copy of the package, a generator with a knob of its own is selectable,
listed in --help with its knob, in `--strategies all` where it says so, refused elsewhere, labelled in the report,
and covered by the contract test, with no edit to any other file.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRATCH = '''"""A scratch method: static exit at a depth set by a knob of its own."""
from dataclasses import dataclass

from ..config import knob
from .autoregressive import Autoregressive
from .base import register


@dataclass
class ToyOptions:
    """the toy exit's depth"""

    toy_depth: int = knob(12, "toy_exit: layers run before the exit head", range=(1, None, True))


@register("toy_exit")
class ToyExit(Autoregressive):
    """Static exit at --toy_depth."""

    short, family = "toy", "toy methods"
    baseline = False
    in_all = 99
    options = ToyOptions
    label_knobs = ("toy_depth",)

    def validate(self) -> None:
        self.config.exit_layer = self.config.toy_depth

    def knobs(self) -> dict:
        return {"toy_depth": self.config.toy_depth}
'''


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """A copy of the project with one new file in harness/generators/."""
    root = tmp_path_factory.mktemp("scratch")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "harness", root / "harness", ignore=ignore)
    shutil.copytree(ROOT / "tests", root / "tests", ignore=ignore)
    for name in ("benchmark.py", "eval.py", "generate.py"):
        shutil.copy(ROOT / name, root / name)
    (root / "harness" / "generators" / "toy_exit.py").write_text(SCRATCH)
    return root


def _run(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=root, timeout=900)


def test_a_new_file_is_a_new_method(scratch, tmp_path):
    help_text = _run(scratch, "benchmark.py", "--help")
    assert help_text.returncode == 0, help_text.stderr
    assert "--toy_depth" in help_text.stdout and "knobs of toy_exit (the toy exit's depth)" in help_text.stdout
    assert "toy_exit" in help_text.stdout.split("generation strategies")[1]  # the strategy list
    assert "toy_exit" in help_text.stdout.split("--strategies STRATEGIES\n")[1].split("(default")[0]  # what all runs

    wrong = _run(scratch, "benchmark.py", "--generation_strategy", "calm", "--toy_depth", "3", "--num_samples", "1")
    assert wrong.returncode == 2 and "--toy_depth applies to toy_exit, not calm" in wrong.stderr, wrong.stderr
    bad = _run(scratch, "benchmark.py", "--strategies", "toy_exit:toy_depth=0", "--num_samples", "1")
    assert bad.returncode == 2 and "--toy_depth must be >= 1" in bad.stderr, bad.stderr

    run = _run(scratch, "benchmark.py", "--strategies", "toy_exit:toy_depth=6", "--num_samples", "1", "--max_steps",
               "4", "--warmup", "0", "--dtype", "float32", "--output_dir", str(tmp_path))
    assert run.returncode == 0, run.stderr
    table = pd.read_csv(next(tmp_path.glob("*/report/report.csv")))
    toy = table[table["strategy"] == "toy_exit"]
    assert len(toy) == 1 and json.loads(toy["knobs"].iloc[0]) == {"toy_depth": 6}
    label = toy["label"].iloc[0]
    assert label.startswith("toy") and "6" in label, label  # its short name and its label knob

    contract = _run(scratch, "-m", "pytest", "-q", "-p", "no:xdist", "-p", "no:cacheprovider",
                    "tests/test_contract.py", "-k", "toy_exit or strategies_all")
    assert contract.returncode == 0, contract.stdout[-3000:]
    assert "2 passed" in contract.stdout, contract.stdout[-500:]
