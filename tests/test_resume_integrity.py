"""A run directory is one configuration written by one process: resume refuses what does not match, keeps every
complete record, and every stop (SIGINT, SIGTERM) leaves a summary."""
from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN = ["--dataset", "gsm8k", "--num_samples", "3", "--max_steps", "4", "--exits", "none"]


def bench(*args, timeout=600):
    return subprocess.run([sys.executable, "benchmark.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def last_line(proc) -> str:
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    return lines[-1] if lines else ""


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    proc = bench(*RUN, "--output_dir", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    (rd,) = [p for p in out.iterdir() if p.is_dir()]
    return rd


@pytest.fixture()
def run_dir(finished, tmp_path):
    """A copy of a finished 3-example run, cut back to an interrupted one with the given records."""
    import shutil

    rd = tmp_path / finished.name
    shutil.copytree(finished, rd)
    return rd


def records(rd: Path) -> list[dict]:
    return [json.loads(x) for x in (rd / "examples.jsonl").read_text().splitlines() if x.strip()]


def keep(rd: Path, lines: list[str]) -> None:
    (rd / "examples.jsonl").write_text("".join(x + "\n" for x in lines))
    s = json.loads((rd / "summary.json").read_text())
    (rd / "summary.json").write_text(json.dumps(dict(s, status="interrupted")))


def test_records_carry_their_configuration_hash(finished):
    info = json.loads((finished / "run.json").read_text())
    assert info["config_sha256"] and {r["config_sha256"] for r in records(finished)} == {info["config_sha256"]}


def test_a_second_writer_is_refused_before_any_work(run_dir):
    lines = (run_dir / "examples.jsonl").read_text().splitlines()
    keep(run_dir, lines[:1])
    with open(run_dir / ".lock", "a+") as held:  # another process is writing this run
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        t = time.perf_counter()
        proc = bench("--resume", str(run_dir))
        elapsed = time.perf_counter() - t
    assert proc.returncode == 2 and "being written by another process" in last_line(proc), proc.stderr[-800:]
    assert "Traceback" not in proc.stderr
    assert len(records(run_dir)) == 1 and elapsed < 60  # refused before the model was loaded


def test_concurrent_resumes_never_duplicate_records(run_dir):
    lines = (run_dir / "examples.jsonl").read_text().splitlines()
    keep(run_dir, lines[:1])
    procs = [subprocess.Popen([sys.executable, "benchmark.py", "--resume", str(run_dir)], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    codes = sorted(p.wait(timeout=600) for p in procs)
    ids = [r["id"] for r in records(run_dir)]
    assert len(ids) == len(set(ids)) == 3, ids
    assert codes in ([0, 0], [0, 2])  # either one was refused, or the second found nothing left to do


def test_a_corrupt_middle_line_is_set_aside_and_the_rest_kept(run_dir):
    lines = (run_dir / "examples.jsonl").read_text().splitlines()
    keep(run_dir, [lines[0], lines[1][:40], lines[2]])
    proc = bench("--resume", str(run_dir))
    assert proc.returncode == 0, proc.stderr[-800:]
    assert "moved aside" in proc.stderr and "2 complete record(s) kept" in proc.stderr
    got = {r["index"]: r for r in records(run_dir)}
    assert sorted(got) == [0, 1, 2]
    assert got[2]["decode_seconds"] == json.loads(lines[2])["decode_seconds"]  # kept, not run again
    (aside,) = run_dir.glob("examples.jsonl.set-aside-*")
    assert aside.read_text() == lines[1][:40] + "\n"


def test_records_of_another_configuration_are_refused(run_dir):
    lines = (run_dir / "examples.jsonl").read_text().splitlines()
    foreign = dict(json.loads(lines[0]), config_sha256="0000000000000000")
    keep(run_dir, [json.dumps(foreign)])
    proc = bench("--resume", str(run_dir))
    assert proc.returncode == 2 and "made by another configuration" in last_line(proc), proc.stderr[-800:]


@pytest.mark.parametrize("field,value,named", [
    (("model", "checkpoint"), "feedfacefeedface", "model checkpoint"),
    (("environment", "packages", "transformers"), "5.0.0", "library versions"),
    (("generation", "max_steps"), 5, "max_steps"),
])
def test_resume_refuses_another_model_versions_or_configuration(run_dir, field, value, named):
    lines = (run_dir / "examples.jsonl").read_text().splitlines()
    keep(run_dir, lines[:1])
    info = json.loads((run_dir / "run.json").read_text())
    node = info
    for k in field[:-1]:
        node = node[k]
    node[field[-1]] = value
    (run_dir / "run.json").write_text(json.dumps(info))
    proc = bench("--resume", str(run_dir))
    assert proc.returncode == 2 and named in last_line(proc), proc.stderr[-800:]
    assert len(records(run_dir)) == 1


@pytest.mark.parametrize("flags,named", [(["--max_steps", "32"], "--max_steps"),
                                         (["--generation_strategy", "calm"], "--generation_strategy"),
                                         (["--strategies", "calm"], "--strategies")])
def test_flags_that_differ_from_the_run_are_refused(finished, flags, named):
    proc = bench("--resume", str(finished), *flags)
    assert proc.returncode == 2 and named in last_line(proc) and "Traceback" not in proc.stderr


def test_a_flag_equal_to_the_runs_is_accepted(finished):
    proc = bench("--resume", str(finished), "--max_steps", "4")
    assert proc.returncode == 0, proc.stderr[-800:]


def test_sigterm_writes_an_interrupted_summary_and_exits_143(tmp_path):
    p = subprocess.Popen([sys.executable, "benchmark.py", "--dataset", "gsm8k", "--num_samples", "20", "--max_steps",
                          "16", "--exits", "none", "--output_dir", str(tmp_path)], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        ex = list(tmp_path.glob("*/examples.jsonl"))
        if ex and ex[0].read_text().strip():
            break
        time.sleep(0.2)
    os.kill(p.pid, signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 143, err[-800:]
    (rd,) = [d for d in tmp_path.iterdir() if d.is_dir()]
    summary = json.loads((rd / "summary.json").read_text())
    assert summary["status"] == "interrupted" and "SIGTERM" in summary["error"] and summary["num_examples"] >= 1
    assert "Traceback" not in err
