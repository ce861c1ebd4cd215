"""The committed reference results (`make results`): complete, made from committed code, regenerable from their logs."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from harness.report import load_runs
from test_report import assert_labels_unique

ROOT = Path(__file__).resolve().parents[1]
REF = ROOT / "results" / "reference"
TASKS = {"cnn_dm_summarization", "xsum_summarization", "human_eval", "gsm8k"}
TRAINED = {"autoregressive", "self_speculative", "hybrid_speculative", "calm", "free", "dynamic", "policy",
           "prompt_lookup", "kangaroo", "eagle", "hf_generate", "hf_prompt_lookup", "hf_assistant_early_exit"}
UNTRAINED = {"autoregressive", "self_speculative", "hybrid_speculative", "calm", "free", "dynamic"}
DRAFTERS = {"autoregressive", "eagle", "kangaroo", "self_speculative", "hybrid_speculative", "prompt_lookup"}  # Makefile
CRITERIA = {"cosine_similarity", "token_repeat", "entropy_based", "max_probability", "convergence"}


@pytest.fixture(scope="module")
def runs():
    return load_runs([str(REF / "runs")])


def test_every_task_method_and_peer_with_and_without_trained_exits(runs):
    """Three invocations per task: everything with the shipped exits, the exit readers without them, and the
    trained drafters' own (issue 21: one invocation of their own, its baseline and A/A control)."""
    assert {Path(r["path"]).relative_to(REF / "runs").parts[0] for r in runs} == {"trained_exits", "untrained_exits",
                                                                                  "drafters"}
    for task in TASKS:
        for exits, wanted in (("trained_exits", TRAINED), ("untrained_exits", UNTRAINED), ("drafters", DRAFTERS)):
            mine = [r for r in runs if r["run"]["task"]["name"] == task and
                    Path(r["path"]).relative_to(REF / "runs").parts[0] == exits]
            assert {r["run"]["strategy"] for r in mine} == wanted, (task, exits)
            if "dynamic" in wanted:
                assert {r["run"]["knobs"].get("criteria") for r in mine if r["run"]["strategy"] == "dynamic"} == CRITERIA
            assert sum(bool(r["run"]["control"]) for r in mine) == 1  # each invocation has its A/A control
            attached = {bool(r["run"]["model"]["exits"]) for r in mine}
            assert attached == {exits != "untrained_exits"}
        drafted = {r["run"]["knobs"].get("drafter") for r in runs if r["run"]["task"]["name"] == task and
                   Path(r["path"]).relative_to(REF / "runs").parts[0] == "drafters"}
        assert {"kangaroo", "eagle"} <= drafted, drafted  # SS:drafter=kangaroo, hybrid:drafter=eagle
    examples = {"cnn_dm_summarization": 10, "human_eval": 10, "xsum_summarization": 20, "gsm8k": 20}  # REF_SETS
    for r in runs:
        assert len(r["examples"]) == examples[r["run"]["task"]["name"]] and r["summary"]["status"] == "complete"
        assert r["run"]["generation"]["max_steps"] == 64 and r["run"]["run"]["max_prompt_tokens"] is None


def _commits(runs) -> dict:
    """Invocation (trained_exits / untrained_exits / drafters) -> the git_commit values its logs recorded."""
    commits: dict = {}
    for r in runs:
        commits.setdefault(Path(r["path"]).relative_to(REF / "runs").parts[0], set()).add(
            r["run"]["environment"]["git_commit"])
    return commits


def test_each_invocation_ran_one_commit_of_this_repository(runs):
    """Which commit: one per invocation, in this repository's history (whether the tree was clean is the next
    test)."""
    commits = {k: {c.removesuffix("-dirty") for c in v} for k, v in _commits(runs).items()}
    assert all(len(c) == 1 for c in commits.values()), commits
    if (ROOT / ".git").exists():
        for (sha,) in commits.values():
            assert subprocess.run(["git", "merge-base", "--is-ancestor", sha, "HEAD"], cwd=ROOT).returncode == 0, sha


def test_reference_logs_were_made_from_committed_code(runs):
    dirty = sorted({c for v in _commits(runs).values() for c in v if not c or c.endswith("-dirty")})
    assert not dirty, dirty


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


def test_reference_report_flags_degenerate_rows_and_labels_what_was_read(runs):
    report = pd.read_csv(REF / "report" / "report.csv")
    by_id = report.set_index("run_id")
    for r in runs:  # every row's flag is what its own logs say, under the documented rule
        preds = {str(e["id"]): e["prediction"] for e in r["examples"]}
        empty = sum(not p.strip() for p in preds.values())
        flag = f"degenerate ({empty}/{len(preds)} empty)" if empty >= len(preds) / 2 else ""
        assert (by_id.loc[r["run"]["run_id"], "flag"] if by_id.loc[r["run"]["run_id"], "degenerate"] else "") == flag
    # static exit at layer 12 with trained exits: only newlines on CNN/DM, mostly empty on GSM8K and XSum
    e12 = report[(report["strategy"] == "autoregressive") & report["knobs"].str.contains('"exit_layer": 12')
                 & (report["exits"] == "trained")].set_index("dataset")
    assert e12.loc[["cnn_dm_summarization", "gsm8k", "xsum_summarization"], "degenerate"].all()
    summary = pd.read_csv(REF / "report" / "summary_by_task.csv")
    row = summary[(summary["method"] == "AR E12") & (summary["exits"] == "trained")].iloc[0]
    for task in ("cnn_dm_summarization", "gsm8k", "xsum_summarization"):
        assert row[task].startswith(e12.loc[task, "flag"] + ": "), row[task]
    # transformers' peers and the full-depth baseline read no exits, whatever was attached
    reads_none = report["strategy"].str.startswith("hf_") | report["knobs"].eq('{"exit_layer": null}')
    assert set(report[reads_none]["exits"]) == {"not read", "not read (attached)"}
    assert not report[reads_none]["method"].str.contains("trained exits").any()
    assert_labels_unique(report)


def test_reference_report_tables_show_no_run_id_as_a_figure(runs):
    """A row without a speedup says why (the XSum static exit E12 once showed its baseline's run id)."""
    md = (REF / "report" / "report.md").read_text(encoding="utf-8")
    ids = {r["run"]["run_id"] for r in runs}
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    assert rows and not [line for line in rows if any(i in line for i in ids)]
    xsum = md.split("### xsum_summarization (")[1].split("\n### ")[0]
    line = next(x for x in xsum.splitlines() if x.startswith("| autoregressive exit_layer=12 [trained exits]"))
    assert "nothing to time" in line and "degenerate (20/20 empty)" in line


def test_a_run_is_dirty_for_edited_code_not_for_what_make_results_removes(tmp_path):
    """`make results` removes the committed logs before it writes new ones: its runs must still record a clean
    commit, while an edit to a tracked file elsewhere marks them -dirty."""
    from harness.provenance import commit_of

    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tmp_path)]
    (tmp_path / "results" / "reference").mkdir(parents=True)
    (tmp_path / "results" / "reference" / "old.json").write_text("{}")
    (tmp_path / "code.py").write_text("x = 1\n")
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "c"]):
        subprocess.run(git + cmd, check=True)
    head = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert commit_of(tmp_path) == head
    (tmp_path / "results" / "reference" / "old.json").unlink()
    assert commit_of(tmp_path) == head
    (tmp_path / "code.py").write_text("x = 2\n")
    assert commit_of(tmp_path) == head + "-dirty"
