"""Several tasks in one invocation, the across-task summary, dataset-level latency, HumanEval chat answers,
and the diagnostics CLI."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from harness.metrics import extract_code, humaneval_chat_program, pass_at_1_chat
from harness.tasks import load_examples

ROOT = Path(__file__).resolve().parents[1]


def test_code_block_extraction_runs_the_models_code():
    ex = load_examples("human_eval", 1)[0]
    body = ex.reference
    answer = (f"Here is the function:\n\n```python\n{ex.prompt}{body}\n```\n\nIt works because ...")
    code = extract_code(answer, ex.meta["entry_point"])
    assert code is not None and f"def {ex.meta['entry_point']}" in code and "```" not in code
    assert pass_at_1_chat(answer, ex)["pass_at_1"] == 1.0
    wrong = answer.replace(body, "    return None\n")
    assert pass_at_1_chat(wrong, ex)["pass_at_1"] == 0.0
    # no code block: the answer is taken as a completion of the prompt, as without the chat template
    assert humaneval_chat_program(body, ex).startswith(ex.prompt)


def test_multi_task_invocation_and_summary(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "benchmark.py"), "--dataset", "cnn_dm_lm,gsm8k",
                        "--num_samples", "2", "--max_steps", "4", "--exits", "none",
                        "--strategies", "autoregressive:exit_layer=20", "--output_dir", str(tmp_path)],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    parent = next(tmp_path.glob("*tasks*"))
    tasks = {json.loads(p.read_text())["task"]["name"] for p in parent.rglob("run.json")}
    assert tasks == {"cnn_dm_lm", "gsm8k"}
    gsm = [json.loads(p.read_text()) for p in parent.rglob("run.json")
           if json.loads(p.read_text())["task"]["name"] == "gsm8k"][0]
    assert gsm["task"]["metric"] == "gsm8k_exact_match" and "Question:" in gsm["task"]["stop"]
    summary = pd.read_csv(parent / "report" / "summary_by_task.csv")
    assert set(summary.columns) >= {"method", "cnn_dm_lm", "gsm8k"}
    exits = dict(zip(summary["method"], summary["exits"]))  # short labels; what each row read
    assert exits == {"AR E20": "untrained", "AR (A/A control)": "not read"}
    # every cell carries its n, and its CI or "n too small" (2 examples here)
    cells = summary[["cnn_dm_lm", "gsm8k"]].to_numpy().ravel()
    assert all("n=2 (n too small)" in c for c in cells), cells
    report = pd.read_csv(parent / "report" / "report.csv")
    base = report[(report["strategy"] == "autoregressive") & ~report["control"] & report["knobs"].str.contains('"exit_layer": null')]
    assert (base["latency_ratio"].round(6) == 1.0).all()
    static = report[report["knobs"].str.contains('"exit_layer": 20')]
    assert static["latency_ratio"].notna().all() and (static["latency_ratio"] > 0).all()
    assert "Summary across tasks" in (parent / "report" / "report.md").read_text()


def test_unknown_task_in_list_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "benchmark.py"), "--dataset", "cnn_dm_lm,nope",
                        "--output_dir", str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 2 and "nope" in r.stderr and r.stderr.strip().count("\n") == 0


@pytest.mark.slow
def test_diagnose_writes_its_tables(tmp_path):
    from harness.diagnose import main

    out = tmp_path / "d"
    assert main(["--dataset", "xsum_summarization", "--num_samples", "2", "--max_tokens", "16", "--exits", "none",
                 "--static_layers", "10,30", "--static_max_steps", "4", "--out", str(out)]) == 0
    agree = pd.read_csv(out / "agreement.csv")
    assert len(agree) == 29 and agree["agreement"].between(0, 1).all()
    assert agree["agreement"].iloc[-1] > agree["agreement"].iloc[0]  # deeper exits agree more with the last layer
    spec = pd.read_csv(out / "speculation.csv")
    assert (spec["best_predicted_speedup"] > 0).all() and (spec["step_ms"] > 0).all()
    static = pd.read_csv(out / "static_exit.csv")
    assert list(static["layer"]) == [10, 30] and "rougeL" in static
    for f in ("agreement.png", "confidence.png", "calibration.png", "static_exit.png"):
        assert (out / f).stat().st_size > 1000
