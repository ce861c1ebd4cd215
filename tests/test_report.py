"""Reports over real run logs: baselines, paired speedups, deltas, plots; --strategies and --sweep."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import pytest

from harness.config import UsageError
from harness.report import build_table, load_runs, write_report
from harness.report.plots import pareto
from harness.report.stats import bootstrap_median

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
    from harness.plan import expand_strategies

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
    assert pareto([(1.0, 0.5), (2.0, 0.4), (1.5, 0.3), (0.5, 0.6)]) == [3, 0, 1]
    lo, hi = bootstrap_median(np.array([1.0, 1.1, 0.9, 1.2, 1.05]))
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
    assert set(auc.index) == {"static exit", "free over threshold"}
    # free: full quality to 1.5x then 0.3/0.4 of it to 2x -> (0.5 * 1 + 0.5 * 0.75) / 1 = 0.875 (grid-exact here)
    assert abs(auc["free over threshold"] - 0.875) < 0.01
    assert abs(auc["static exit"] - 0.25) < 0.01  # best quality 0.1/0.4 over the whole range
    assert auc["free over threshold"] > auc["static exit"]


# -- rules of the report, on small synthetic run directories (no model) ------------------------------
def _info(run_id, strategy="autoregressive", knobs=None, task="gsm8k", control=False, exits=None, schema=None,
          dtype="float32", sample=False, num_layers=None, cost_curve=None):
    """A run.json; num_layers / cost_curve are left out unless given (as in logs older than them)."""
    from harness.logs import SCHEMA_VERSION

    info = {"schema_version": SCHEMA_VERSION if schema is None else schema, "run_id": run_id,
            "created": "2026-01-01T00:00:00", "command": [], "strategy": strategy,
            "knobs": {"exit_layer": None} if knobs is None else knobs,
            "generation": {"seed": 0, "sample": sample}, "run": {"protocol": "harness", "fixed_length": False,
                                                                 "chat_template": False},
            "task": {"name": task, "data_sha256": "d" * 64, "examples_sha256": "e" * 64, "n_shot": 0, "max_steps": 8},
            "model": {"name": "m", "checkpoint": "c", "device": "cpu", "dtype": dtype, "exits": exits},
            "environment": {"world_size": 1, "git_commit": "0" * 40}, "control": control,
            "schedule": {"invocation": f"inv_{task}"}}
    if num_layers is not None:
        info["model"]["num_layers"] = num_layers
    if cost_curve is not None:
        info["cost_curve"] = cost_curve
    return info


def _examples(n, ms, prediction="an answer", metric="exact_match", score=0.0, breakdown=False, **fields):
    """n records; ms: decode ms/token (a number, or a list per example, None = nothing decoded); prediction and
    score likewise (a value or a list). `fields`: more record fields (verify_passes, token_ids, ...), each a value for
    every example or a function of the example's index."""
    per = lambda v, i: v[i] if isinstance(v, list) else v  # noqa: E731
    out = []
    for i in range(n):
        t = per(ms, i)
        out.append({"id": str(i), "prompt_sha256": f"p{i}", "prediction": per(prediction, i),
                    "metrics": {metric: per(score, i)}, "decode_time_per_token": None if t is None else t / 1e3,
                    "prefill_seconds": 0.1, "e2e_tokens_per_second": 10.0, "total_seconds": 1.0,
                    "exit_layers": [30] * 5, "new_tokens": 5 if t is not None else 1,
                    "breakdown": {"decode_seconds": 4 * t / 1e3, "components": {"layers": 3 * t / 1e3},
                                  "calls": {"layers": 4}, "overhead_seconds": 0.0} if breakdown and t else None,
                    **{k: v(i) if callable(v) else v for k, v in fields.items()}})
    return out


def _write(root, info, examples, status="complete", raw: Optional[bytes] = None):
    d = root / info["task"]["name"] / info["run_id"]
    d.mkdir(parents=True)
    (d / "run.json").write_text(json.dumps(info))
    (d / "examples.jsonl").write_bytes(raw if raw is not None else
                                       "".join(json.dumps(e) + "\n" for e in examples).encode())
    if status is not None:
        (d / "summary.json").write_text(json.dumps({"run_id": info["run_id"], "status": status,
                                                    "error": None if status == "complete" else "it fell over",
                                                    "num_examples": len(examples)}))
    return d


def _report(root, tmp_path):
    out = tmp_path / "report"
    df, _ = write_report([str(root)], str(out), plots=False)
    return df, out


def _md_row(md: str, dataset: str, method: str) -> str:
    """The line of `method` in the per-task table of `dataset`."""
    section = md.split(f"### {dataset} (")[1].split("\n### ")[0]
    return next(line for line in section.splitlines() if line.startswith(f"| {method} "))


N = 12  # enough pairs for CIs


@pytest.fixture
def degenerate_runs(tmp_path):
    """Two tasks: a baseline; a static exit whose output is only newlines (and very fast); a method with 6/12 and
    one with 5/12 empty outputs; a CALM run with a breakdown whose output is empty on 7/12."""
    root = tmp_path / "runs"
    for task in ("gsm8k", "cnn_dm_lm"):
        metric = "exact_match" if task == "gsm8k" else "rougeL"
        _write(root, _info(f"{task}_base", task=task), _examples(N, 50.0, metric=metric, score=0.5))
        _write(root, _info(f"{task}_e12", knobs={"exit_layer": 12}, task=task),
               _examples(N, 20.0, prediction="\n\n", metric=metric))
        half = ["", " \n"] * 3 + ["text"] * 6
        _write(root, _info(f"{task}_half", "dynamic", {"criteria": "entropy_based"}, task),
               _examples(N, 30.0, prediction=half, metric=metric, score=0.5))
        _write(root, _info(f"{task}_five", "dynamic", {"criteria": "cosine_similarity"}, task),
               _examples(N, 30.0, prediction=half[1:] + ["text"], metric=metric, score=0.5))
        _write(root, _info(f"{task}_calm", "calm", {"threshold": 0.9}, task),
               _examples(N, 25.0, prediction=["\t"] * 7 + ["x"] * 5, metric=metric, breakdown=True))
    return root


def test_degenerate_output_is_flagged_in_every_table(degenerate_runs, tmp_path):
    _, out = _report(degenerate_runs, tmp_path)
    csv = pd.read_csv(out / "report.csv").set_index("run_id")
    assert csv.loc["gsm8k_e12", "flag"] == "degenerate (12/12 empty)" and csv.loc["gsm8k_e12", "degenerate"]
    assert csv.loc["gsm8k_half", "flag"] == "degenerate (6/12 empty)"  # exactly half: flagged
    assert not csv.loc["gsm8k_five", "degenerate"] and csv.loc["gsm8k_five", "empty_outputs"] == 5
    assert not csv.loc["gsm8k_base", "degenerate"]
    md = (out / "report.md").read_text()
    for task in ("gsm8k", "cnn_dm_lm"):
        assert "degenerate (12/12 empty)" in _md_row(md, task, "autoregressive exit_layer=12")
        assert "degenerate" not in _md_row(md, task, "dynamic criteria=cosine_similarity")
    summary = pd.read_csv(out / "summary_by_task.csv").set_index("method")
    assert summary.loc["AR E12", "gsm8k"].startswith("degenerate (12/12 empty): 2.50x")
    assert not summary.loc["dyn cos", "gsm8k"].startswith("degenerate")
    # never stated as a finding, though it is the fastest row
    findings = md.split("### gsm8k (")[1].split("\n### ")[0]
    faster = next(line for line in findings.splitlines() if line.startswith("- Faster"))
    assert "AR E12" not in faster and "dyn cos" in faster
    assert any(line.startswith("- Degenerate output") and "AR E12 (12/12 empty)" in line
               for line in findings.splitlines())
    bt = pd.read_csv(out / "time_breakdown.csv")
    assert set(bt[bt["method"].str.startswith("calm")]["flag"]) == {"degenerate (7/12 empty)"}
    assert "CALM t0.9 — degenerate (7/12 empty)" in md.split("Where the decode time goes")[1]


def test_summary_cells_show_n_and_ci_or_n_too_small(tmp_path):
    import re

    root = tmp_path / "runs"
    for task, n in (("gsm8k", N), ("cnn_dm_lm", 6)):
        _write(root, _info(f"{task}_base", task=task), _examples(n, 50.0))
        _write(root, _info(f"{task}_ss", "self_speculative", {"exit_layer": 8, "num_speculations": 4}, task),
               _examples(n, [40.0 + i for i in range(n)]))
    _, out = _report(root, tmp_path)
    s = pd.read_csv(out / "summary_by_task.csv").set_index("method")
    ci = r"\d\.\d\dx \[\d\.\d\d-\d\.\d\d\] n=12, exact_match [+-]\d\.\d{3} \[[+-]\d\.\d{3}, [+-]\d\.\d{3}\] n=12"
    assert re.fullmatch(ci, s.loc["SS E8 k4", "gsm8k"]), s.loc["SS E8 k4", "gsm8k"]
    small = r"\d\.\d\dx n=6 \(n too small\), exact_match [+-]\d\.\d{3} n=6 \(n too small\)"
    assert re.fullmatch(small, s.loc["SS E8 k4", "cnn_dm_lm"]), s.loc["SS E8 k4", "cnn_dm_lm"]
    md = (out / "report.md").read_text()
    table = md.split("### Summary across tasks")[1].split("\n\n")[1]
    for line in table.splitlines()[2:]:
        for cell in line.strip("|").split("|")[3:]:
            assert re.search(r"\] n=\d+|n=\d+ \(n too small\)", cell), cell


def test_one_configuration_from_two_invocation_folders_is_one_summary_row_per_folder(tmp_path):
    """results/reference runs prompt lookup in its trained_exits and drafters invocations, one per task set: the
    summary tells them apart by the folder each invocation wrote to, so each row spans every task."""
    root = tmp_path / "runs"
    for folder, ms in (("first", 40.0), ("second", 25.0)):
        for task in ("gsm8k", "cnn_dm_lm"):
            for run, strategy, t in (("base", "autoregressive", 50.0), ("lookup", "prompt_lookup", ms)):
                info = _info(f"{folder}_{task}_{run}", strategy, None if run == "base" else {}, task)
                info["command"] = ["benchmark.py", "--output_dir", f"results/x/{folder}"]
                info["schedule"] = {"invocation": f"{folder}_{task}"}
                _write(root / folder, info, _examples(N, t))
    df, out = _report(root, tmp_path)
    assert set(df["series"]) == {"first", "second"}
    s = pd.read_csv(out / "summary_by_task.csv").set_index("method")
    assert {"lookup (first)", "lookup (second)"} <= set(s.index) and "lookup" not in s.index
    assert s.loc["lookup (first)", "gsm8k"].startswith("1.25x") and s.loc["lookup (first)", "cnn_dm_lm"] != "-"
    assert s.loc["lookup (second)", "gsm8k"].startswith("2.00x") and s.loc["lookup (second)", "cnn_dm_lm"] != "-"


def test_quality_deltas_get_paired_cis_and_prose_states_only_what_they_exclude(tmp_path):
    root = tmp_path / "runs"
    _write(root, _info("base"), _examples(N, 50.0, score=1.0))
    # worse on 8 of 12 examples: the paired interval lies below 0 -> a finding
    _write(root, _info("worse", "calm", {"threshold": 0.5}), _examples(N, 25.0, score=[0.0] * 8 + [1.0] * 4))
    # one example worse, one better: the interval includes 0, and its speed interval includes 1.0
    _write(root, _info("same", "calm", {"threshold": 0.9}),
           _examples(N, [40.0, 60.0] * 6, score=[0.0] + [1.0] * 11))
    df, out = _report(root, tmp_path)
    row = df.set_index("run_id")
    w, s = row.loc["worse"], row.loc["same"]
    assert w["delta_exact_match"] == pytest.approx(-8 / 12) and w["delta_exact_match_n"] == N
    assert w["delta_exact_match_ci95_low"] <= w["delta_exact_match"] <= w["delta_exact_match_ci95_high"] < 0
    assert s["delta_exact_match_ci95_low"] < 0 <= s["delta_exact_match_ci95_high"]  # one of 12 worse: 0 inside
    assert row.loc["base", "delta_exact_match_ci95_low"] == row.loc["base", "delta_exact_match_ci95_high"] == 0
    assert s["decode_speedup_ci95_low"] <= 1.0 <= s["decode_speedup_ci95_high"]
    lines = (out / "report.md").read_text().splitlines()
    lower = next(x for x in lines if x.startswith("- exact_match lower"))
    assert "CALM t0.5" in lower and "CALM t0.9" not in lower and "[-" in lower
    same = next(x for x in lines if x.startswith("- exact_match not distinguishable from the baseline"))
    assert "CALM t0.9" in same
    speed = next(x for x in lines if x.startswith("- Decode speed not distinguishable from the baseline"))
    assert "CALM t0.9" in speed and not any(x.startswith("- Faster") and "CALM t0.9" in x for x in lines)
    assert "-0.6667 [" in _md_row("\n".join(lines), "gsm8k", "calm threshold=0.5")
    # fewer than 10 pairs: no interval, and the prose says so instead of a finding
    few = tmp_path / "few"
    _write(few, _info("base"), _examples(5, 50.0, score=1.0))
    _write(few, _info("worse", "calm", {"threshold": 0.5}), _examples(5, 25.0, score=0.0))
    df5, out5 = _report(few, tmp_path / "r5")
    assert math.isnan(df5.set_index("run_id").loc["worse", "delta_exact_match_ci95_low"])
    md5 = (out5 / "report.md").read_text()
    assert "- exact_match: n too small for a CI (no finding): CALM t0.5." in md5 and "lower than" not in md5


def test_row_without_pairs_shows_no_run_id_and_peers_read_no_exits(tmp_path):
    root = tmp_path / "runs"
    exits = {"path": "x.safetensors", "adapter_layers": [6]}
    _write(root, _info("base_run", exits=exits), _examples(N, 50.0))
    _write(root, _info("first_token_only", knobs={"exit_layer": 12}, exits=exits), _examples(N, None, prediction=""))
    _write(root, _info("peer", "hf_generate", {}, exits=exits), _examples(N, 50.0))
    _write(root, _info("peer_aee", "hf_assistant_early_exit", {"exit_layer": 7}, exits=exits), _examples(N, 50.0))
    df, out = _report(root, tmp_path)
    md = (out / "report.md").read_text()
    line = _md_row(md, "gsm8k", "autoregressive exit_layer=12 [trained exits]")
    assert "base_run" not in line and "nothing to time" in line
    r = df.set_index("run_id")
    assert r.loc["first_token_only", "n_paired"] == 0 and r.loc["first_token_only", "exits"] == "trained"
    for peer in ("peer", "peer_aee"):
        assert r.loc[peer, "exits"] == "not read (attached)" and "[trained exits]" not in r.loc[peer, "method"]
    assert r.loc["base_run", "exits"] == "not read (attached)"


def test_speed_quality_auc_is_per_sweep_not_per_strategy(tmp_path):
    from harness.report import speed_quality_auc

    root = tmp_path / "runs"
    _write(root, _info("base"), _examples(N, 50.0, metric="rougeL", score=0.4))
    # a threshold sweep of CALM (softmax) and a single CALM configuration that differs in another knob
    _write(root, _info("t9", "calm", {"threshold": 0.9, "confidence": "softmax"}),
           _examples(N, 25.0, metric="rougeL", score=0.4))
    _write(root, _info("t5", "calm", {"threshold": 0.5, "confidence": "softmax"}),
           _examples(N, 20.0, metric="rougeL", score=0.3))
    _write(root, _info("contrastive", "calm", {"threshold": 0.9, "confidence": "contrastive"}),
           _examples(N, 12.5, metric="rougeL", score=0.1))
    df, out = _report(root, tmp_path)
    auc = speed_quality_auc(df).set_index("method")
    assert auc.loc["calm over threshold", "points"] == 2 and auc.loc["calm over threshold", "swept_knob"] == "threshold"
    assert auc.loc["CALM t0.9 contrastive", "points"] == 1  # a categorical knob (confidence) is another method
    assert auc["points"].max() == 2  # the three CALM rows are never one pooled curve
    # the sweep: full quality to 2x, 0.75 of it to 2.5x, then 0 to X = 4x -> (1 * 1 + 0.5 * 0.75) / 3
    assert auc.loc["calm over threshold", "auc"] == pytest.approx((1.0 + 0.5 * 0.75) / 3, abs=0.01)
    assert (out / "speed_quality_auc.csv").exists()


def test_knobs_from_the_artifact_are_in_the_labels_and_labels_are_unique(tmp_path):
    root = tmp_path / "runs"
    exits = {"path": "x.safetensors"}
    for task in ("gsm8k", "cnn_dm_lm"):  # two tasks, for the summary table
        _write(root, _info(f"base_{task}", task=task, exits=exits), _examples(N, 50.0))
        _write(root, _info(f"cal_{task}", "calm", {"threshold": 1.0, "min_exit_layer": 6, "trained_defaults":
                                                   {"threshold": 1.0, "min_exit_layer": 6}}, task, exits=exits),
               _examples(N, 60.0))
        # the same knobs set explicitly: another configuration (its provenance differs), another label
        _write(root, _info(f"explicit_{task}", "calm", {"threshold": 1.0, "min_exit_layer": 6}, task, exits=exits),
               _examples(N, 60.0))
        # the same short label "CALM t0.9" but different vocab_k: both must fall back to the full label
        for k in (1000, 2000):
            _write(root, _info(f"vk{k}_{task}", "calm", {"threshold": 0.9, "vocab_k": k}, task, exits=exits),
                   _examples(N, 40.0))
    df, out = _report(root, tmp_path)
    r = df.set_index("run_id")
    assert "threshold=1.0*" in r.loc["cal_gsm8k", "method"] and "min_exit_layer=6*" in r.loc["cal_gsm8k", "method"]
    assert r.loc["cal_gsm8k", "label"] == "CALM t1* min6*" and r.loc["explicit_gsm8k", "label"] == "CALM t1"
    assert r.loc["vk1000_gsm8k", "label"] != r.loc["vk2000_gsm8k", "label"]
    assert "vocab_k=1000" in r.loc["vk1000_gsm8k", "label"]
    assert_labels_unique(pd.read_csv(out / "report.csv"))
    summary = pd.read_csv(out / "summary_by_task.csv")
    assert len(summary) == 4 and not summary[["exits", "method"]].duplicated().any()
    assert (summary[["gsm8k", "cnn_dm_lm"]] != "-").all().all()  # each configuration one row, both tasks filled


def assert_labels_unique(csv: pd.DataFrame) -> None:
    """No two rows of a table share a label while differing in knobs: per dataset (full label, per-task table) and
    per (model, exits) (short label, summary across tasks)."""
    knobs = csv["knobs"].map(lambda k: json.dumps({a: b for a, b in json.loads(k).items() if b is not None},
                                                   sort_keys=True))
    ident = csv["strategy"] + knobs + csv["control"].astype(str)
    for cols in (["dataset", "method"], ["model", "exits", "label"]):
        per = ident.groupby([csv[c] for c in cols]).nunique()
        assert (per == 1).all(), per[per > 1]


def test_report_refuses_unknown_or_mixed_schema_and_undecodable_logs(tmp_path):
    def report(root):
        return subprocess.run([sys.executable, "-m", "harness.report", str(root), "--no_plots", "--out",
                               str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT, timeout=300)

    def one_line(proc, *words):
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert "Traceback" not in proc.stderr and proc.stderr.strip().count("\n") == 0, proc.stderr
        assert all(w in proc.stderr for w in words), proc.stderr

    unknown = tmp_path / "unknown"
    _write(unknown, _info("base", schema=99), _examples(3, 50.0))
    one_line(report(unknown), "schema_version 99")
    mixed = tmp_path / "mixed"
    _write(mixed, _info("base"), _examples(3, 50.0))
    _write(mixed, _info("old", "calm", {"threshold": 0.9}, schema=1), _examples(3, 50.0))
    one_line(report(mixed), "schema_version 1", "one version at a time")
    binary = tmp_path / "binary"
    _write(binary, _info("base"), [], raw=bytes(range(256)) * 4)
    one_line(report(binary), "unreadable run log")
    foreign = tmp_path / "foreign"
    _write(foreign, _info("base"), [], raw=b'{"id": 1}\n')
    one_line(report(foreign), "not an example record")


def test_failed_interrupted_and_empty_runs_are_listed_apart(tmp_path):
    root = tmp_path / "runs"
    _write(root, _info("base"), _examples(N, 50.0))
    _write(root, _info("ok", "calm", {"threshold": 0.9}), _examples(N, 40.0))
    _write(root, _info("failed_one", "calm", {"threshold": 0.5}), _examples(2, 10.0), status="failed")
    _write(root, _info("interrupted_one", "free", {"threshold": 0.9}), _examples(3, 10.0), status="interrupted")
    _write(root, _info("no_examples", "dynamic", {"criteria": "entropy_based"}), [], status="complete")
    _write(root, _info("still_running", "policy", {}), _examples(1, 10.0), status=None)
    df, out = _report(root, tmp_path)
    assert set(df["run_id"]) == {"base", "ok"}
    assert set(pd.read_csv(out / "report.csv")["run_id"]) == {"base", "ok"}
    md = (out / "report.md").read_text()
    apart = md.split("### Runs not in the tables")[1]
    for run, status in (("failed_one", "failed: it fell over"), ("interrupted_one", "interrupted: it fell over"),
                        ("no_examples", "complete, but 0 examples"), ("still_running", "no summary.json")):
        line = next(x for x in apart.splitlines() if x.startswith(f"| {run} "))
        assert status in line
    tables = md.split("### Runs not in the tables")[0]
    assert not any(run in tables for run in ("failed_one", "interrupted_one", "no_examples", "still_running"))
    # only failed runs: no rows, the list, exit 0 (there is nothing wrong with the input itself)
    lone = tmp_path / "lone"
    _write(lone, _info("failed_one"), _examples(2, 10.0), status="failed")
    df2, out2 = _report(lone, tmp_path / "r2")
    assert df2.empty and "failed_one" in (out2 / "report.md").read_text()


# -- speculation: tau, oracle speedup, exactness against the baseline -------------------------------
# layers(k) = 0.8 + 0.1 (k - 1), head(k) = 0.2 + 0.05 (k - 1), total = their sum: one position costs 1.0
CURVE = {"device": "cpu", "dtype": "float32", "context": 400, "points": [
    {"k": k, "layers": 0.8 + 0.1 * (k - 1), "head": 0.2 + 0.05 * (k - 1), "total": 1.0 + 0.15 * (k - 1)}
    for k in range(1, 5)]}
TOKENS = [11, 12, 13, 14, 15]  # every record has new_tokens = 5: 4 decoded


def _md_cell(md: str, dataset: str, method: str, column: str) -> str:
    """The cell of `column` in the row of `method` of the per-task table of `dataset`."""
    section = md.split(f"### {dataset} (")[1].split("\n### ")[0]
    header = next(line for line in section.splitlines() if line.startswith("| method "))
    names = [c.strip() for c in header.strip("|").split("|")]
    return [c.strip() for c in _md_row(md, dataset, method).strip("|").split("|")][names.index(column)]


def test_tau_and_oracle_speedup_from_the_runs_counts_and_cost_curve(tmp_path):
    root = tmp_path / "runs"
    spec = {"num_layers": 10, "cost_curve": CURVE}
    _write(root, _info("base", **spec), _examples(N, 50.0, verify_passes=4, token_ids=TOKENS, top2_gaps=[1.0] * 5))
    _write(root, _info("ctl", control=True, **spec), _examples(N, 50.0, verify_passes=4, token_ids=TOKENS))
    # two verification passes of 2 drafts each per example, drafted by layers 0..1 of 10
    _write(root, _info("ss", "self_speculative", {"exit_layer": 2, "num_speculations": 2}, **spec),
           _examples(N, 40.0, verify_passes=2, drafted=4, accepted=2, draft_passes=4, token_ids=TOKENS))
    _write(root, _info("calm", "calm", {"threshold": 0.9}, **spec), _examples(N, 30.0, token_ids=TOKENS))
    # the same speculative run from a log without a cost curve: tau, but no oracle
    _write(root, _info("ss_old", "self_speculative", {"exit_layer": 2, "num_speculations": 3}, num_layers=10),
           _examples(N, 40.0, verify_passes=2, drafted=4, accepted=2, draft_passes=4))
    df, out = _report(root, tmp_path)
    r = df.set_index("run_id")
    assert r.loc["base", "tau"] == r.loc["ctl", "tau"] == 1.0 and r.loc["ss", "tau"] == 2.0
    assert r.loc["base", "oracle_speedup"] == pytest.approx(1.0) == r.loc["ctl", "oracle_speedup"]
    # w = 1 + 4/2 = 3: verify = layers(3) * 8/10 + head(3) = 1.1; draft = layers(1) * 2/10 + head(1) = 0.36
    assert r.loc["ss", "oracle_speedup"] == pytest.approx(4 * N / (2 * N * 1.1 + 4 * N * 0.36))
    assert math.isnan(r.loc["calm", "tau"]) and math.isnan(r.loc["calm", "oracle_speedup"])
    assert r.loc["ss_old", "tau"] == 2.0 and math.isnan(r.loc["ss_old", "oracle_speedup"])
    md = (out / "report.md").read_text()
    assert _md_cell(md, "gsm8k", "autoregressive", "oracle speedup") == "1.00x"
    assert _md_cell(md, "gsm8k", "autoregressive", "tau") == "1.00"
    assert _md_cell(md, "gsm8k", "self_speculative exit_layer=2 num_speculations=2", "oracle speedup") == "1.10x"
    assert _md_cell(md, "gsm8k", "self_speculative exit_layer=2 num_speculations=2", "tau") == "2.00"
    assert _md_cell(md, "gsm8k", "calm threshold=0.9", "tau") == "-"
    assert _md_cell(md, "gsm8k", "calm threshold=0.9", "oracle speedup") == "-"
    assert "tau = decoded tokens per full-depth" in md and "oracle speedup = " in md
    # identical greedy output of the lossless row; the lossy CALM and the A/A control are not compared
    assert _md_cell(md, "gsm8k", "self_speculative exit_layer=2 num_speculations=2", "identical to AR") == "12/12"
    assert _md_cell(md, "gsm8k", "calm threshold=0.9", "identical to AR") == "-"
    assert _md_cell(md, "gsm8k", "autoregressive (A/A control)", "identical to AR") == "-"
    # a table whose every row has a tau still prints it with 2 decimals (tabulate would print 1.00 as "1")
    only = tmp_path / "only"
    for d in root.rglob("run.json"):
        if d.parent.name in ("base", "ss"):
            shutil.copytree(d.parent, only / d.parent.name)
    _, out2 = _report(only, tmp_path / "r2")
    assert _md_cell((out2 / "report.md").read_text(), "gsm8k", "autoregressive", "tau") == "1.00"


@pytest.mark.parametrize("dtype, kind", [("float32", "REAL"), ("bfloat16", "near-tie")])
def test_exactness_near_tie_or_real_by_the_dtypes_tolerance(tmp_path, dtype, kind):
    root = tmp_path / "runs"
    gaps = [2.0, 0.0001, 0.3, 2.0, 2.0]  # the baseline's top-1 minus top-2 logit per token
    _write(root, _info("base", dtype=dtype), _examples(N, 50.0, verify_passes=4, token_ids=TOKENS, top2_gaps=gaps))
    # differs at token 1 (gap 1e-4: below either dtype's tolerance) on examples 0-1
    near = lambda i: TOKENS[:1] + [99, 98, 97, 96] if i < 2 else TOKENS  # noqa: E731
    _write(root, _info("ss", "self_speculative", {"exit_layer": 2, "num_speculations": 2}, dtype=dtype),
           _examples(N, 40.0, verify_passes=2, drafted=4, accepted=2, draft_passes=4, token_ids=near))
    # differs at token 2 (gap 0.3: above float32's 0.001, below bfloat16's 0.5) on example 5; shorter on example 6
    real = lambda i: TOKENS[:2] + [77, 76, 75] if i == 5 else TOKENS[:3] if i == 6 else TOKENS  # noqa: E731
    _write(root, _info("hy", "hybrid_speculative", {"exit_layer": 2, "num_speculations": 2}, dtype=dtype),
           _examples(N, 40.0, verify_passes=2, drafted=4, accepted=2, draft_passes=4, token_ids=real))
    # lossy: compared with nothing, however different
    _write(root, _info("calm", "calm", {"threshold": 0.9}, dtype=dtype), _examples(N, 30.0, token_ids=[1, 2, 3]))
    _, out = _report(root, tmp_path)
    md = (out / "report.md").read_text()
    assert _md_cell(md, "gsm8k", "self_speculative exit_layer=2 num_speculations=2", "identical to AR") == \
        "10/12 (2 near-tie)"
    assert _md_cell(md, "gsm8k", "hybrid_speculative exit_layer=2 num_speculations=2", "identical to AR") == \
        f"11/12 (1 {kind})"
    assert _md_cell(md, "gsm8k", "calm threshold=0.9", "identical to AR") == "-"
    bug = [line for line in md.splitlines() if line.startswith("- BUG")]
    if kind == "REAL":
        assert bug == ["- BUG: lossless method hybrid E2 k2 differs from autoregressive at a clear margin on 1 example "
                       "(max margin 0.3 >= tolerance 0.001)."]
        assert md.split("### gsm8k (")[1].split("\n- ")[1].startswith("BUG")  # the first note under the table
    else:
        assert not bug
    csv = pd.read_csv(out / "report.csv").set_index("run_id")
    assert {"identical", "near_tie", "real", "n_compared"} <= set(csv.columns)
    assert csv.loc["ss", ["identical", "near_tie", "real", "n_compared"]].tolist() == [10, 2, 0, 12]
    assert csv.loc["hy", ["real", "near_tie"]].tolist() == ([1, 0] if kind == "REAL" else [0, 1])
    assert csv.loc[["calm", "base"], "n_compared"].isna().all()
    assert ",10,2,0,0,12," in (out / "report.csv").read_text()  # counts as integers, not 10.0


def test_exactness_skips_sampled_runs(tmp_path):
    root = tmp_path / "runs"
    _write(root, _info("base", sample=True), _examples(N, 50.0, token_ids=TOKENS))
    _write(root, _info("ss", "self_speculative", {"exit_layer": 2, "num_speculations": 2}, sample=True),
           _examples(N, 40.0, token_ids=[1, 2, 3, 4, 5]))
    df, out = _report(root, tmp_path)
    assert df.set_index("run_id").loc["ss", "baseline"] == "base"  # paired (both sampled), but not compared
    assert _md_cell((out / "report.md").read_text(), "gsm8k", "self_speculative exit_layer=2 num_speculations=2",
                    "identical to AR") == "-"


def test_old_logs_without_the_new_fields_still_report(tmp_path):
    """No verify_passes / draft_passes / top2_gaps in the records, no cost curve or num_layers in run.json: the new
    columns are blank; a mismatch the baseline logged no gaps for is "unknown" (said, not called a bug)."""
    root = tmp_path / "runs"
    _write(root, _info("base"), _examples(N, 50.0, token_ids=TOKENS))
    _write(root, _info("ss", "self_speculative", {"exit_layer": 2, "num_speculations": 2}),
           _examples(N, 40.0, drafted=4, accepted=2, token_ids=lambda i: [5, 4, 3, 2, 1] if i == 0 else TOKENS))
    _write(root, _info("peer", "hf_generate", {}), _examples(N, 50.0))  # no token_ids at all: not compared
    df, out = _report(root, tmp_path)
    r = df.set_index("run_id")
    assert r[["tau", "oracle_speedup"]].isna().all().all()
    assert r.loc["ss", "decode_speedup"] == pytest.approx(1.25)  # the existing columns are unchanged
    md = (out / "report.md").read_text()
    for method in ("autoregressive", "self_speculative exit_layer=2 num_speculations=2", "hf_generate"):
        assert _md_cell(md, "gsm8k", method, "tau") == _md_cell(md, "gsm8k", method, "oracle speedup") == "-"
    assert _md_cell(md, "gsm8k", "self_speculative exit_layer=2 num_speculations=2", "identical to AR") == \
        "11/12 (1 unknown)"
    assert _md_cell(md, "gsm8k", "hf_generate", "identical to AR") == "-"
    assert "- BUG" not in md and "- Lossless method SS E2 k2 differs from autoregressive on 1 example where" in md
