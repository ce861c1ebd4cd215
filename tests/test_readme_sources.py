"""The README's figures about the shipped exits come from committed files: the artifact and results/shipped_exits."""
from __future__ import annotations

import re
from pathlib import Path

from harness.speculation_model import recommendation
from harness.trained_exits import ExitArtifact, shipped_artifacts

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
SECTION = README.split("## Trained exits on the embedded model")[1].split("\n## ")[0]


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
