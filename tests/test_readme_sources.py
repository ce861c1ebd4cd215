"""The documentation's figures come from committed files: the shipped exit artifact, results/shipped_exits,
results/core_speed and results/gpu_h200 (the README links the docs/ pages that hold them)."""
from __future__ import annotations

import re
from pathlib import Path

from harness.speedup_model import recommendation
from harness.trained_exits import ExitArtifact, shipped_artifacts

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
TRAINED = (DOCS / "trained_exits.md").read_text(encoding="utf-8")
SECTION = TRAINED.split("## Trained exits on the embedded model")[1].split("\n## ")[0]


def shipped() -> ExitArtifact:
    (path,) = shipped_artifacts()
    return ExitArtifact.load(path)


def test_readme_shows_the_shipped_exits_summary():
    md = (ROOT / "results" / "shipped_exits" / "report" / "report.md").read_text(encoding="utf-8")
    summary = md.split("### Summary across tasks")[1].split("\n\n", 2)[1].strip()
    assert summary and summary in SECTION


def test_readme_agreement_figures_are_the_artifacts():
    metrics = shipped().provenance["exit_adapters"]["metrics"]
    trained, untrained = re.search(r"candidate rows.*?\*\*([\d. /]+)\*\*.*?against\s+([\d. /]+?) untrained",
                                   SECTION, re.S).groups()
    layers = (6, 8, 10, 12)
    assert [float(x) for x in trained.split("/")] == [round(metrics[f"agree_vocab_{d}"], 2) for d in layers]
    assert [float(x) for x in untrained.split("/")] == [round(metrics[f"untrained_agree_vocab_{d}"], 2)
                                                        for d in layers]


def test_readme_prediction_is_the_recommenders():
    rec = recommendation(shipped())
    best = rec["best"]
    knobs = re.search(r"E = (\d+), k = (\d+), draft threshold ([\d.]+)", SECTION).groups()
    assert (int(knobs[0]), int(knobs[1]), float(knobs[2])) == (best["exit_layer"], best["num_speculations"],
                                                               best["draft_threshold"])
    pred, lo, hi = map(float, re.search(r"predicted \*\*([\d.]+)x \[([\d.]+)-([\d.]+)\]\*\*", SECTION).groups())
    assert (pred, lo, hi) == tuple(round(x, 2) for x in (rec["predicted_speedup"], *best["predicted_speedup_ci95"]))


def test_readme_calibrated_threshold_is_the_artifacts():
    calm = shipped().thresholds["calm"]
    certified = float(re.search(r"threshold \*\*([\d.]+)\*\* certified", SECTION).group(1))
    assert calm["passed"] and certified == calm["knobs"]["threshold"]
    assert f"{calm['scope']['n']} held-out" in SECTION and f"{calm['max_steps']} greedy tokens" in SECTION


# -- the model core's figures (docs/model_core.md): results/core_speed, written by `make speed` -----------------
CORE = (DOCS / "model_core.md").read_text(encoding="utf-8").split("## Model core")[1].split("\n## ")[0]
SPEED = ROOT / "results" / "core_speed"


def _table_rows(text: str, first_cell: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith(f"| {first_cell}")]


def test_readme_cost_curve_is_the_committed_one():
    import json

    curves = {(c["dtype"], c["core"]): c for c in json.loads((SPEED / "core_costs.json").read_text())["curves"]}
    rows = [r for r in _table_rows(CORE, "float32") + _table_rows(CORE, "bfloat16")
            if r[1] in ("transformers", "lean-library", "lean") and len(r) == 12]
    assert len(rows) == 6
    for row in rows:
        c = curves[(row[0], row[1])]
        total = {p["k"]: p["total"] for p in c["points"]}
        assert row[2] == f"{1e3 * total[1]:.1f}" and row[6] == f"{1e3 * total[8]:.1f}"
        assert row[-1] == f"{total[1] / c['floor']:.1f}x"


def test_readme_speed_table_is_the_committed_reports():
    import csv

    rows = [r for r in _table_rows(CORE, "float32 |") + _table_rows(CORE, "bfloat16 (auto)")
            if r[1] not in ("transformers", "lean-library", "lean")]
    assert len(rows) == 12
    for row in rows:
        folder = "float32" if row[0] == "float32" else "default_dtype"
        report = {r["label"]: r for r in csv.DictReader((SPEED / f"report_{folder}" / "report.csv").open())}
        r = report[row[1]]
        assert row[2] == f"{float(r['decode_ms_per_token_median']):.1f}"
        assert row[3].startswith(f"{float(r['decode_speedup']):.2f}x [{float(r['decode_speedup_ci95_low']):.2f}-")
        assert row[5] == f"{float(r['tau']):.2f}"
        if r["n_compared"]:
            assert row[6].startswith(f"{int(float(r['identical']))}/{int(float(r['n_compared']))}")
            assert "REAL" not in row[6] and float(r["real"]) == 0


# -- the GPU check's figures (docs/usage.md "Checking the measurement on your hardware"): results/gpu_h200 -----------------
GPU = ROOT / "results" / "gpu_h200"
GPU_TEXT = (DOCS / "usage.md").read_text(encoding="utf-8").split("**GPU.** `make gpu-check`")[1].split("\n### ")[0]


def test_readme_gpu_figures_are_the_committed_gpu_check():
    import csv
    import json

    block = GPU_TEXT.split("```")[1]
    logs = (GPU / "tests.log").read_text() + (GPU / "measurement_check.log").read_text()
    for line in block.strip().splitlines():
        assert line.split("  #")[0].strip() in logs, line
    report = {(r["strategy"], r["control"]): r for r in csv.DictReader((GPU / "speed/runs/report/report.csv").open())}
    for name, control in (("autoregressive", "True"), ("hybrid_speculative", "False"), ("prompt_lookup", "False"),
                          ("hf_prompt_lookup", "False"), ("self_speculative", "False")):
        r = report[(name, control)]
        figure = (f"{float(r['decode_speedup']):.2f}x [{float(r['decode_speedup_ci95_low']):.2f}-"
                  f"{float(r['decode_speedup_ci95_high']):.2f}]")
        assert figure in " ".join(GPU_TEXT.split()), (name, figure)  # wrapped lines read as one
    curves = {(c["dtype"], c["core"]): c for c in json.loads((GPU / "core_costs.json").read_text())["curves"]}
    for core in ("lean", "transformers"):
        total = {p["k"]: p["total"] for p in curves[("bfloat16", core)]["points"]}
        assert f"{1e3 * total[1]:.1f}" in GPU_TEXT and f"{1e3 * total[8]:.1f}" in GPU_TEXT
    assert "max 0.3750" in (GPU / "ties_bfloat16.log").read_text() and "0.375 logit" in GPU_TEXT


def test_readme_recosted_self_speculation_figures_are_the_committed_run():
    import csv
    import json

    flat = " ".join(CORE.split())

    def ss(folder):
        report = {r["strategy"]: r for r in csv.DictReader((SPEED / folder / "report.csv").open())
                  if r["control"] == "False"}
        r = report["self_speculative"]
        return r, (f"{float(r['decode_speedup']):.2f}x [{float(r['decode_speedup_ci95_low']):.2f}-"
                   f"{float(r['decode_speedup_ci95_high']):.2f}]")

    r, figure = ss("report_default_dtype")
    assert f"said E6 k1 (measured {figure}, oracle {float(r['oracle_speedup']):.2f}x)" in flat
    r, figure = ss("report_recosted_bf16")
    (run,) = (SPEED / "runs" / "recosted_bf16").rglob("*self_speculative*/run.json")
    v = json.loads(run.read_text())["model"]["speculation_verdict"]
    best = v["best"]
    lo, hi = best["predicted_speedup_ci95"]
    predicted = f"predicted {best['predicted_speedup']:.2f}x [{lo:.2f}-{hi:.2f}]"
    if v["speculate"]:  # the setting it chose ran
        assert f"it said E{best['exit_layer']} k{best['num_speculations']} ({predicted}), measured {figure} " \
               f"with acceptance {float(r['acceptance_rate']):.3f}" in flat
    else:  # don't speculate: the untrained defaults ran, as asked
        assert f"it said don't speculate (best E{best['exit_layer']} k{best['num_speculations']}, {predicted})" in flat
        assert f"measured {figure} with acceptance {float(r['acceptance_rate']):.3f}" in flat
    assert v["fitted_dtype"] == "bfloat16" and v["recosted_from"]["costed_on"]["dtype"] == "float32"
    r, figure = ss("report_float32")
    fit = recommendation(shipped())["best"]  # the fp32 fit's own setting, which the fp32 run keeps
    assert (fit["exit_layer"], fit["num_speculations"]) == (6, 2)
    assert f"E6 k2 measured {figure}, because the drafts' acceptance on CNN/DM was " \
           f"{float(r['acceptance_rate']):.2f} against {fit['acceptance']:.2f} on the fit's continuations" in flat


def test_readme_step_profile_is_the_committed_one():
    import json

    rows = [r for r in _table_rows(CORE, "float32") + _table_rows(CORE, "bfloat16") if len(r) == 9]
    assert len(rows) == 6
    for dtype, core, wall, native, products, attention, other, python, calls in rows:
        j = json.loads((SPEED / f"step_profile_{core}_{dtype}.json").read_text())
        g = j["groups"]
        ms = lambda group: g.get(group, {"ms": 0.0})["ms"]  # noqa: E731
        assert wall == f"{j['wall_ms']:.1f}" and products == f"{ms('matrix products'):.1f}"
        assert native == f"{ms('native layer'):.1f}" and attention == f"{ms('attention'):.1f}"
        assert python == f"{j['wall_ms'] - j['operators_ms']:.1f}"
        split = ("matrix products", "attention", "native layer")
        assert other == f"{sum(v['ms'] for k, v in g.items() if k not in split):.1f}"
        assert calls == f"{sum(v['calls'] for v in g.values()):.0f}"


# -- Spec-Bench (README "Spec-Bench, by category"): results/spec_bench, written by `make spec-bench` ------------
def test_readme_spec_bench_tables_and_figures_are_the_committed_reports():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("### Spec-Bench, by category")[1].split("![decode speedup by Spec-Bench")[0]
    md = (ROOT / "results" / "spec_bench" / "report" / "report.md").read_text(encoding="utf-8")
    tables = [t for t in section.split("\n\n") if t.startswith("| method")]
    assert len(tables) == 2 and all(t.strip() in md for t in tables)
    rows = {r[0].split(" ")[0]: r for r in _table_rows(md.split("### spec_bench")[1], "")}
    for name, quoted in (("prompt_lookup", "prompt lookup 1.17x [95% CI 1.01-1.53]"),
                         ("hybrid_speculative", "hybrid 0.68x [0.61-0.79]"),
                         ("self_speculative", "self-speculation 0.32x [0.31-0.33]")):
        speedup, ci = re.search(r"([\d.]+x) \[(?:95% CI )?([\d.]+-[\d.]+)\]", quoted).groups()
        row = " | ".join(rows[name])
        assert speedup in row and f"95% CI {ci}," in row, (name, row)
        assert quoted in section


# -- the second GPU check (docs/usage.md "Second GPU check", docs/model_core.md "CUDA graphs"): results/gpu_h200/2026-11-30
GPU2 = GPU / "2026-11-30"


def test_second_gpu_check_figures_are_the_committed_runs():
    import csv
    import json

    text = " ".join((DOCS / "usage.md").read_text(encoding="utf-8").split("**Second GPU check, 2026-11-30**")[1]
                    .split("\n### ")[0].split())
    graphs_doc = " ".join((DOCS / "model_core.md").read_text(encoding="utf-8").split("**CUDA graphs**")[1]
                          .split("\n\n")[0].split())
    assert "12 passed, 2 skipped in 110.78s" in (GPU2 / "tests.log").read_text() and "12 passed, 2 skipped" in text
    assert "2 passed, 6 deselected in 46.03s" in (GPU2 / "tests_graphs.log").read_text()

    def rows(folder):
        return {(r["strategy"], r["label"], r["control"]): r for r in csv.DictReader((GPU2 / folder / "report" /
                                                                                     "report.csv").open())}

    def figure(r):
        return (f"{float(r['decode_speedup']):.2f}x [{float(r['decode_speedup_ci95_low']):.2f}-"
                f"{float(r['decode_speedup_ci95_high']):.2f}]")

    for folder, quoted in (("speed", ("hybrid_speculative", "prompt_lookup", "hf_prompt_lookup", "kangaroo",
                                      "self_speculative", "eagle")),
                           ("speed_graphs", ("prompt_lookup", "hybrid_speculative", "hf_prompt_lookup"))):
        for (strategy, label, control), r in rows(folder).items():
            if strategy in quoted or control == "True":
                assert figure(r) in text, (folder, label, figure(r))
            if strategy == "autoregressive" and control == "False":
                assert f"autoregressive {float(r['decode_ms_per_token_median']):.1f} ms/token" in text
    ar = next(r for (s, _, c), r in rows("speed_graphs").items() if s == "autoregressive" and c == "False")
    assert f"took {float(ar['decode_ms_per_token_median']):.1f} ms per token" in graphs_doc

    def curve(name):
        return {(c["dtype"], c["core"]): {p["k"]: 1e3 * p["total"] for p in c["points"]}
                for c in json.loads((GPU2 / name).read_text())["curves"]}

    after, before = curve("core_costs_graphs.json"), curve("core_costs.json")
    bf, f32 = after[("bfloat16", "lean-graphs")], after[("float32", "lean-graphs")]
    worst = max(bf[k] / bf[1] for k in range(2, 9))
    for doc in (text, graphs_doc):
        assert f"{bf[1]:.1f} ms" in doc and f"{worst:.2f}x" in doc and f"{f32[1]:.1f} ms" in doc
    assert f"{before[('bfloat16', 'lean-graphs')][1]:.1f} ms bf16 and {before[('float32', 'lean-graphs')][1]:.1f} " \
           f"ms fp32, against the eager lean core's {before[('bfloat16', 'lean')][1]:.1f} and " \
           f"{before[('float32', 'lean')][1]:.1f} ms" in text


def test_fp32_block2_curve_figures_are_the_committed_curve():
    import json

    (c,) = json.loads((SPEED / "core_costs_amd_epyc_fp32_block2.json").read_text())["curves"]
    total = {p["k"]: 1e3 * p["total"] for p in c["points"]}
    ratios = [total[k] / total[1] for k in range(2, 9)]
    flat = " ".join(CORE.split())
    assert f"memory at {c['bandwidth'] / 1e9:.0f} GB/s): fp32 {total[1]:.1f} ms a step, " \
           f"{min(ratios):.2f}-{max(ratios):.2f}x for k = 2..8 (k = 4, still one pass of 4, {ratios[2]:.2f}x)" in flat
    readme = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    assert f"`core_costs_amd_epyc_fp32_block2.json` at {c['bandwidth'] / 1e9:.0f} GB/s: " \
           f"{min(ratios):.2f}-{max(ratios):.2f}x in fp32" in readme


def test_drafters_spec_bench_table_is_the_committed_report():
    import csv

    text = (DOCS / "drafters.md").read_text(encoding="utf-8").split("**On Spec-Bench's slice**")[1].split("\n\n")[1]
    rows = {r[0]: r for r in _table_rows(text, "")}
    report = {(r["strategy"], r["control"]): r for r in
              csv.DictReader((ROOT / "results" / "drafters" / "spec_bench" / "report" / "report.csv").open())}
    for key, (strategy, control) in (("A/A control", ("autoregressive", "True")), ("`eagle` (", ("eagle", "False")),
                                     ("`kangaroo` k3 t0.3", ("kangaroo", "False")),
                                     ("`self_speculative:drafter=kangaroo` k1 t0.1", ("self_speculative", "False")),
                                     ("`prompt_lookup`", ("prompt_lookup", "False")),
                                     ("`hybrid_speculative:drafter=eagle` (", ("hybrid_speculative", "False"))):
        r = report[(strategy, control)]
        row = next(v for k, v in rows.items() if k.startswith(key))
        assert row[1] == (f"{float(r['decode_speedup']):.2f}x [{float(r['decode_speedup_ci95_low']):.2f}-"
                          f"{float(r['decode_speedup_ci95_high']):.2f}]"), (key, row)
        assert row[2] == f"{float(r['tau']):.2f}" and row[3] == f"{float(r['oracle_speedup']):.2f}x", (key, row)


def test_drafters_speed_tables_are_the_committed_report():
    """docs/drafters.md's and the README's trained-drafter tables: each measured cell is
    results/drafters/report/report.csv (CNN/DM with its 95% CI, XSum and GSM8K with min-max)."""
    import csv

    report = {(r["dataset"], r["strategy"], r["control"]): r for r in
              csv.DictReader((ROOT / "results" / "drafters" / "report" / "report.csv").open())}

    def cell(task, strategy, control="False"):
        r = report[(task, strategy, control)]
        x = f"{float(r['decode_speedup']):.2f}x"
        if task == "cnn_dm_summarization":
            return f"{x} [{float(r['decode_speedup_ci95_low']):.2f}-{float(r['decode_speedup_ci95_high']):.2f}]"
        return f"{x} ({float(r['decode_speedup_min']):.2f}-{float(r['decode_speedup_max']):.2f})"

    keys = (("A/A control", "autoregressive", "True"),
            ("`self_speculative:drafter=kangaroo`", "self_speculative", "False"),
            ("`kangaroo`", "kangaroo", "False"), ("`eagle`", "eagle", "False"),
            ("`hybrid_speculative:drafter=eagle`", "hybrid_speculative", "False"),
            ("`prompt_lookup`", "prompt_lookup", "False"))
    docs = (DOCS / "drafters.md").read_text(encoding="utf-8").split("## Predicted and measured")[1]
    readme = (ROOT / "README.md").read_text(encoding="utf-8").split("### Trained drafters")[1].split("###")[0]
    for text, first in ((docs, 2), (readme, 3)):
        rows = [r for r in _table_rows(text, "") if len(r) >= first + 3]
        for key, strategy, control in keys:
            row = next(r for r in rows if r[0] == key or r[0].startswith(key + " "))
            assert row[first:first + 3] == [cell(t, strategy, control) for t in
                                            ("cnn_dm_summarization", "xsum_summarization", "gsm8k")], (key, row)
            if text is docs:  # its tau and oracle columns (CNN/DM's oracle)
                r = report[("cnn_dm_summarization", strategy, control)]
                assert row[first + 4] == f"{float(r['oracle_speedup']):.2f}x", (key, row)
                assert row[first + 3].split(", ")[0] in (f"{float(r['tau']):.2f}", "1"), (key, row)
