"""Reports over real run logs: baselines, paired speedups, deltas, plots; --strategies and --sweep."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from harness.config import UsageError
from harness.report import _bootstrap_median, _pareto, build_table, load_runs, write_report

ROOT = Path(__file__).resolve().parents[1]


def bench(*args):
    return subprocess.run([sys.executable, str(ROOT / "benchmark.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=900)


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    proc = bench("--generation_strategy", "self_speculative", "--sweep", "exit_layer=10,20", "num_speculations=2,3",
                 "--dataset", "gsm8k", "--num_samples", "2", "--max_steps", "6", "--output_dir", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "speedup" in proc.stdout
    (parent,) = out.iterdir()
    return parent


def test_sweep_runs_the_grid_after_the_baseline(sweep_dir):
    runs = load_runs([str(sweep_dir)])
    strategies = sorted((r["run"]["strategy"], json.dumps(r["run"]["knobs"], sort_keys=True), r["run"]["control"])
                        for r in runs)
    assert len(runs) == 6  # baseline, its A/A control, the 2x2 grid
    assert strategies[0] == ("autoregressive", json.dumps({"exit_layer": None}), False)
    assert strategies[1] == ("autoregressive", json.dumps({"exit_layer": None}), True)
    grid = {(json.loads(k)["exit_layer"], json.loads(k)["num_speculations"]) for s, k, _ in strategies[2:]}
    assert grid == {(10, 2), (10, 3), (20, 2), (20, 3)}
    # every run evaluated the same examples, on the same prompts
    assert len({tuple((e["id"], e["prompt_sha256"]) for e in r["examples"]) for r in runs}) == 1


def test_report_table_speedups_and_deltas(sweep_dir):
    runs = load_runs([str(sweep_dir)])
    df = build_table(runs)
    assert list(df["strategy"])[0] == "autoregressive" and list(df["control"])[:2] == [False, True]
    base = df.iloc[0]
    assert base["decode_speedup"] == 1.0 and base["n_paired"] == 2
    base_run = next(r for r in runs if r["run"]["strategy"] == "autoregressive" and not r["run"]["control"])
    for _, row in df.iloc[1:].iterrows():
        run = next(r for r in runs if r["run"]["run_id"] == row["run_id"])
        ratios = [b["decode_time_per_token"] / a["decode_time_per_token"]
                  for a, b in zip(run["examples"], base_run["examples"])]
        assert row["decode_speedup"] == pytest.approx(float(np.median(ratios)))
        assert row["decode_speedup_min"] <= row["decode_speedup"] <= row["decode_speedup_max"]
        assert math.isnan(row["decode_speedup_ci95_low"])  # 2 pairs: too few for an interval
        assert row["baseline"] == base_run["run"]["run_id"]
        # self-speculation is lossless: identical greedy output, so identical quality
        assert row["delta_exact_match"] == 0.0
        if row["strategy"] == "self_speculative":
            assert 0.0 <= row["acceptance_rate"] <= 1.0


def test_report_files_and_plots(sweep_dir, tmp_path):
    df, files = write_report([str(sweep_dir / "*")], str(tmp_path))
    names = {f.name for f in files}
    assert {"report.csv", "report.md", "exit_layers_gsm8k.png", "speed_quality_gsm8k.png", "sweep_gsm8k.png"} <= names
    for f in files:
        assert f.stat().st_size > 0
    back = pd.read_csv(tmp_path / "report.csv")
    assert len(back) == 6 and "decode_speedup_ci95_high" in back.columns and back["control"].dtype == bool
    md = (tmp_path / "report.md").read_text()
    assert "### gsm8k" in md and "n=2" in md
    # per-component breakdown (on by default): self-speculation's draft / verify / accept, none for the baseline
    assert {"time_breakdown.csv", "time_breakdown_gsm8k.png"} <= names and "Where the decode time goes" in md
    bt = pd.read_csv(tmp_path / "time_breakdown.csv")
    assert set(bt["method"].str.split().str[0]) == {"self_speculative"} and bt["method"].nunique() == 4
    assert set(bt["component"]) == {"draft", "verify", "accept", "other", "timer overhead"}
    verify = bt[bt["component"] == "verify"]
    assert (verify["share_median"] > 0.2).all() and (verify["share_median"] <= 1).all()
    assert (bt[bt["component"] == "timer overhead"]["share_median"] < 0.05).all()  # measured, and small on CPU


def test_rows_without_a_baseline_say_so(sweep_dir, tmp_path):
    lone = next(d for d in sweep_dir.iterdir() if "self_speculative" in d.name)
    shutil.copytree(lone, tmp_path / lone.name)
    df = build_table(load_runs([str(tmp_path)]))
    assert df.iloc[0]["baseline"].startswith("no autoregressive baseline")
    assert math.isnan(df.iloc[0]["decode_speedup"])


def test_report_cli_and_bad_paths(sweep_dir, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "harness.report", str(sweep_dir), "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "speedup" in proc.stdout and (tmp_path / "report.md").exists()
    bad = subprocess.run([sys.executable, "-m", "harness.report", "/nonexistent/run"], capture_output=True,
                         text=True, cwd=ROOT, timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "no such run directory" in bad.stderr
    with pytest.raises(UsageError):
        load_runs([str(tmp_path / "empty")])


def test_strategies_all_knob_routing_and_errors(tmp_path):
    from harness.config import GenerationConfig
    from harness.runner import expand_strategies

    configs = expand_strategies("all", GenerationConfig(threshold=0.8, num_speculations=4), 30)
    names = [c.generation_strategy for c in configs]
    assert names[0] == "autoregressive" and configs[0].exit_layer is None
    assert names.count("dynamic") == 5 and {"self_speculative", "calm", "free"} <= set(names)
    ss = next(c for c in configs if c.generation_strategy == "self_speculative")
    assert ss.exit_layer == 7 and ss.num_speculations == 4  # L//4 default, shared knob routed
    assert next(c for c in configs if c.generation_strategy == "calm").threshold == 0.8
    proc = bench("--strategies", "autoregressive,warp_drive", "--output_dir", str(tmp_path))
    assert proc.returncode == 2 and "unknown strategy 'warp_drive'" in proc.stderr
    proc = bench("--strategies", "calm:threshold=abc", "--output_dir", str(tmp_path))
    assert proc.returncode == 2 and "expects float" in proc.stderr


def test_pareto_and_bootstrap_helpers():
    assert _pareto([(1.0, 0.5), (2.0, 0.4), (1.5, 0.3), (0.5, 0.6)]) == [3, 0, 1]
    lo, hi = _bootstrap_median(np.array([1.0, 1.1, 0.9, 1.2, 1.05]))
    assert 0.9 <= lo <= 1.05 <= hi <= 1.2


def test_speed_quality_auc_puts_methods_on_one_scale():
    from harness.report import speed_quality_auc

    def row(strategy, knobs, speedup, q, control=False):
        return {"model": "m", "dataset": "d", "strategy": strategy, "knobs": json.dumps(knobs), "control": control,
                "decode_speedup": speedup, "rougeL": q, "exact_match": float("nan"), "pass_at_1": float("nan")}

    df = pd.DataFrame([
        row("autoregressive", {"exit_layer": None}, 1.0, 0.4),
        row("autoregressive", {"exit_layer": None}, 1.01, 0.4, control=True),
        row("autoregressive", {"exit_layer": 15}, 2.0, 0.1),  # static exit: fast and poor
        row("free", {"threshold": 0.9}, 1.5, 0.4),  # a sweep: keeps quality up to 1.5x, then drops
        row("free", {"threshold": 0.5}, 2.0, 0.3),
    ])
    auc = speed_quality_auc(df).set_index("method")["auc"]
    assert set(auc.index) == {"static exit", "free"}
    # free: full quality to 1.5x then 0.3/0.4 of it to 2x -> (0.5 * 1 + 0.5 * 0.75) / 1 = 0.875 (grid-exact here)
    assert abs(auc["free"] - 0.875) < 0.01
    assert abs(auc["static exit"] - 0.25) < 0.01  # best quality 0.1/0.4 over the whole range
    assert auc["free"] > auc["static exit"]
