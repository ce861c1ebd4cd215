"""The committed reference results (`make results`): complete, made from committed code, regenerable from their logs."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from harness.report import load_runs

ROOT = Path(__file__).resolve().parents[1]
REF = ROOT / "results" / "reference"
TASKS = {"cnn_dm_summarization", "xsum_summarization", "human_eval", "gsm8k"}
TRAINED = {"autoregressive", "self_speculative", "hybrid_speculative", "calm", "free", "dynamic", "policy",
           "hf_generate", "hf_prompt_lookup", "hf_assistant_early_exit"}
UNTRAINED = {"autoregressive", "self_speculative", "hybrid_speculative", "calm", "free", "dynamic"}
CRITERIA = {"cosine_similarity", "token_repeat", "entropy_based", "max_probability", "convergence"}


@pytest.fixture(scope="module")
def runs():
    return load_runs([str(REF / "runs")])


def test_every_task_method_and_peer_with_and_without_trained_exits(runs):
    for task in TASKS:
        for exits, wanted in (("trained_exits", TRAINED), ("untrained_exits", UNTRAINED)):
            mine = [r for r in runs if r["run"]["task"]["name"] == task and
                    Path(r["path"]).relative_to(REF / "runs").parts[0] == exits]
            assert {r["run"]["strategy"] for r in mine} == wanted, (task, exits)
            assert {r["run"]["knobs"].get("criteria") for r in mine if r["run"]["strategy"] == "dynamic"} == CRITERIA
            assert sum(bool(r["run"]["control"]) for r in mine) == 1  # each invocation has its A/A control
            attached = {bool(r["run"]["model"]["exits"]) for r in mine}
            assert attached == {exits == "trained_exits"}
    commits = {}
    for r in runs:
        assert len(r["examples"]) >= 20 and r["summary"]["status"] == "complete"
        commits.setdefault(Path(r["path"]).relative_to(REF / "runs").parts[0], set()).add(
            r["run"]["environment"]["git_commit"].removesuffix("-dirty"))
    # each invocation ran one commit of this repository's history (README: why later tasks say -dirty)
    assert all(len(c) == 1 for c in commits.values()), commits
    if (ROOT / ".git").exists():
        for (sha,) in commits.values():
            assert subprocess.run(["git", "merge-base", "--is-ancestor", sha, "HEAD"], cwd=ROOT).returncode == 0, sha


def test_committed_report_regenerates_byte_for_byte(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "harness.report", str(REF / "runs"), "--out", str(tmp_path),
                           "--no_plots"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr
    committed = sorted(p.name for p in (REF / "report").glob("*.csv"))
    assert {"report.csv", "summary_by_task.csv", "time_breakdown.csv"} <= set(committed)
    assert sorted(p.name for p in tmp_path.glob("*.csv")) == committed
    for name in committed + ["report.md"]:
        assert (tmp_path / name).read_bytes() == (REF / "report" / name).read_bytes(), name


def test_readme_shows_the_committed_summary():
    md = (REF / "report" / "report.md").read_text(encoding="utf-8")
    summary = md.split("### Summary across tasks")[1].split("\n\n", 2)[1]  # the table after the heading
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert summary.strip() and summary.strip() in readme
