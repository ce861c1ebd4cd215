"""The calibrate recipe: Learn-then-Test p-values, fixed-sequence testing, and thresholds a generator picks up."""
from __future__ import annotations

import argparse
import dataclasses
import json
import math

import pytest
import torch

from harness.config import GenerationConfig, UsageError, add_dataclass_args
from harness.generators import build_generator
from harness.train.calibrate import (KNOBS, CalibrateOptions, _binom_cdf, calibrate, consistency_loss,
                                     fixed_sequence_test, min_certifiable_delta, p_value, reference_loss)
from harness.train.common import TrainConfig
from harness.trained_exits import ExitArtifact


# -- p-values ---------------------------------------------------------------------------------------------
def test_p_value_known_cases():
    # all losses 0: Hoeffding term exp(-n h1(0, d)) = (1 - d)^n is the minimum (Bentkus term is e times it)
    assert p_value([0.0] * 100, 0.1) == pytest.approx(0.9 ** 100, rel=1e-9)
    assert p_value([0.0] * 100, 0.2) < 1e-9
    assert p_value([0.0] * 100, 0.2, "hoeffding") == pytest.approx(0.8 ** 100, rel=1e-9)
    # all losses 1 (risk above any delta < 1): cannot reject
    assert p_value([1.0] * 50, 0.3) == 1.0
    assert p_value([1.0] * 50, 0.3, "hoeffding") == 1.0
    # mean exactly delta: h1(d, d) = 0 -> 1
    assert p_value([1.0] * 2 + [0.0] * 8, 0.2) == 1.0
    # delta = 0 can never be certified; delta = 1 is always true for losses in [0, 1]
    assert p_value([0.0] * 1000, 0.0) == 1.0
    assert p_value([1.0] * 10, 1.0) == 0.0
    with pytest.raises(ValueError):
        p_value([1.5], 0.1)


def test_p_value_hoeffding_bentkus_formula_and_binomial():
    # binomial CDF against a direct sum with exact integer binomials
    for n, k, p in [(10, 3, 0.2), (40, 0, 0.1), (25, 12, 0.5), (7, 7, 0.3)]:
        direct = sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(k + 1))
        assert _binom_cdf(k, n, p) == pytest.approx(min(direct, 1.0), rel=1e-9)
    # a case where the Bentkus term is the smaller one: n = 100, 5 losses of 1, delta = 0.2
    losses = [1.0] * 5 + [0.0] * 95
    r, d, n = 0.05, 0.2, 100
    h1 = r * math.log(r / d) + (1 - r) * math.log((1 - r) / (1 - d))
    hoeff = math.exp(-n * h1)
    bentkus = math.e * sum(math.comb(n, i) * d ** i * (1 - d) ** (n - i) for i in range(6))
    assert bentkus < hoeff
    assert p_value(losses, d) == pytest.approx(bentkus, rel=1e-9)
    assert p_value(losses, d, "hoeffding") == pytest.approx(hoeff, rel=1e-9)
    scipy_stats = pytest.importorskip("scipy.stats")
    assert _binom_cdf(5, 100, 0.2) == pytest.approx(float(scipy_stats.binom.cdf(5, 100, 0.2)), rel=1e-9)


def test_p_value_monotone():
    n, delta = 40, 0.25
    ps = [p_value([k / n] * n, delta) for k in range(n + 1)]  # mean loss 0 .. 1, rising
    assert all(a <= b + 1e-15 for a, b in zip(ps, ps[1:]))
    assert ps[0] < 1e-4 and ps[-1] == 1.0
    # more evidence (n) at the same small mean loss -> smaller p; larger tolerance -> smaller p
    assert p_value([0.05] * 200, delta) < p_value([0.05] * 20, delta)
    assert p_value([0.1] * 50, 0.3) < p_value([0.1] * 50, 0.2)
    # Hoeffding-Bentkus is never above its Hoeffding term
    for k in range(0, 41, 5):
        losses = [1.0] * k + [0.0] * (n - k)
        assert p_value(losses, delta) <= p_value(losses, delta, "hoeffding") + 1e-15


def test_min_certifiable_delta():
    d = min_certifiable_delta(24, 0.1)
    assert p_value([0.0] * 24, d + 1e-6) <= 0.1 < p_value([0.0] * 24, d - 1e-3)


# -- fixed-sequence testing ------------------------------------------------------------------------------
def test_fixed_sequence_stops_at_first_failure():
    n = 60
    good, bad = [0.0] * n, [1.0] * n
    table = {0: good, 1: good, 2: [0.02] * n, 3: bad, 4: good, 5: good}  # 4 and 5 would pass: never tested
    calls = []

    def losses_of(j):
        calls.append(j)
        return table[j]

    chosen, tested = fixed_sequence_test([1.0, 0.9, 0.8, 0.7, 0.6, 0.5], losses_of, delta=0.2, epsilon=0.05)
    assert calls == [0, 1, 2, 3]
    assert chosen == 2
    assert [row[0] for row in tested] == [1.0, 0.9, 0.8, 0.7]
    assert tested[3][1] == 1.0 and tested[3][2] == 1.0
    assert all(row[2] <= 0.05 for row in tested[:3])


def test_fixed_sequence_first_failure_keeps_nothing():
    calls = []
    chosen, tested = fixed_sequence_test([1.0, 0.5], lambda j: calls.append(j) or [0.0] * 5, delta=0.1, epsilon=0.05)
    assert chosen is None and calls == [0] and len(tested) == 1  # 0.9^5 = 0.59 > 0.05


def test_losses():
    assert consistency_loss("the cat sat", "the cat sat") == 0.0
    assert consistency_loss("", "") == 0.0
    assert consistency_loss("dogs run", "the cat sat") == 1.0
    assert 0 < consistency_loss("the cat sat down", "the cat sat") < 0.5
    ref = "a cat sat on the mat"
    assert reference_loss("a cat sat on the mat", "a dog ran", ref) == 0.0  # better than full: clipped at 0
    assert reference_loss("dogs run", "a cat sat on the mat", ref) == pytest.approx(1.0)


def test_grids_and_options():
    for key, knob in KNOBS.items():
        end = math.log(49152) if knob.aggressive is None else knob.aggressive
        for size in (3, 4, 5, 8):
            g = knob.grid(size, 49152, finest=1e-3)
            assert len(g) == size and g[0] == knob.never and g[-1] == pytest.approx(end, abs=1e-5)
            step = [b - a for a, b in zip(g, g[1:])]
            assert all(s != 0 for s in step) and len({s > 0 for s in step}) == 1  # strictly monotone
            # the first step is `finest` of the range; distances from never-exit grow geometrically after it
            dist = [abs(v - knob.never) / abs(end - knob.never) for v in g[1:]]
            assert dist[0] == pytest.approx(1e-3, abs=1e-6)
            ratios = [b / a for a, b in zip(dist, dist[1:])]
            assert all(r == pytest.approx(ratios[0], rel=1e-3) for r in ratios)
    # even a 4-point grid has candidates between never-exit (1.0) and 0.9, where fixed-sequence testing can stop
    assert [v for v in KNOBS["calm"].grid(4, 49152) if 0.9 < v < 1.0] == [0.999, 0.968377]
    assert KNOBS["calm"].grid(2, 49152) == [1.0, 0.0]
    parser = argparse.ArgumentParser()
    add_dataclass_args(parser, CalibrateOptions, "calibrate")
    ns = parser.parse_args(["--calibrate_delta", "0.3", "--calibrate_risk", "reference"])
    assert ns.calibrate_delta == 0.3 and ns.calibrate_risk == "reference" and ns.calibrate_grid == 8
    assert ns.calibrate_finest == 1e-3
    with pytest.raises(SystemExit):
        parser.parse_args(["--calibrate_risk", "bleu"])


def test_calibration_examples_are_the_held_out_tail():
    from harness.train.calibrate import calibration_examples
    from harness.train.common import load_texts, source_records

    train_cfg = TrainConfig(data="xsum_validation", max_docs=990, seed=3)  # all of the pool: 800 documents
    art = ExitArtifact(model={}, provenance={"exit_adapters": {"config": dataclasses.asdict(train_cfg)}})
    examples, ids = calibration_examples(TrainConfig(seed=0), CalibrateOptions(), art)
    records = source_records("xsum_validation")
    assert sorted(ids) == list(range(len(records) - 200, len(records)))  # the last --holdout_docs 200
    assert [ex.id for ex in examples] == [str(i) for i in ids]
    seen = set(load_texts(train_cfg))  # exactly what that training read
    text = lambda i: f"Article: {records[i]['document']}\nSummary: {records[i]['summary']}\n"
    assert len(seen) == 800 and not any(text(i) in seen for i in ids)
    assert examples[0].prompt.startswith("Article: ") and examples[0].prompt.endswith("\nSummary:")
    # a seeded order: the same for the same seed, another for another seed
    again = [e.id for e in calibration_examples(TrainConfig(seed=0), CalibrateOptions(), ExitArtifact(model={}))[0]]
    other = [e.id for e in calibration_examples(TrainConfig(seed=1), CalibrateOptions(), ExitArtifact(model={}))[0]]
    assert again == [e.id for e in examples] != other and sorted(other) == sorted(again)


def test_calibration_refuses_documents_the_artifact_trained_on():
    from harness.train.calibrate import calibration_examples

    # an artifact trained before the held-out tail existed (no holdout_docs in its config: all 1000 documents)
    old = TrainConfig(data="xsum_validation,gsm8k_train", max_docs=1000, seed=0)
    cfg = {k: v for k, v in dataclasses.asdict(old).items() if k != "holdout_docs"}
    art = ExitArtifact(model={}, provenance={"consistentee": {"config": cfg}})
    with pytest.raises(UsageError, match=r"200 of the 200 held-out xsum validation .*\(consistentee\).*disjoint") as e:
        calibration_examples(TrainConfig(), CalibrateOptions(), art)
    assert "\n" not in str(e.value)
    # an exact record of the documents read wins where no config says so (e.g. self-generated continuations)
    last = 1000 - 1
    art = ExitArtifact(model={}, provenance={"exit_adapters": {"config": {"data": "gsm8k_train"}, "training_data": {
        "xsum_validation": {"records": [3, last]}}}})
    with pytest.raises(UsageError, match="1 of the 200 held-out"):
        calibration_examples(TrainConfig(), CalibrateOptions(), art)
    # trained with a smaller tail than calibrate is given: refused; with the training's value: accepted
    art = ExitArtifact(model={}, provenance={"exit_adapters": {"config": dataclasses.asdict(
        TrainConfig(data="xsum_validation", max_docs=1000, holdout_docs=100))}})
    with pytest.raises(UsageError, match="100 of the 200"):
        calibration_examples(TrainConfig(), CalibrateOptions(), art)
    assert len(calibration_examples(TrainConfig(holdout_docs=100), CalibrateOptions(), art)[0]) == 100
    with pytest.raises(UsageError, match="holdout_docs 0"):
        calibration_examples(TrainConfig(holdout_docs=0), CalibrateOptions(), ExitArtifact(model={}))


def test_shipped_calibration_is_disjoint_from_training_and_scoped():
    """Every calibrated entry of a shipped artifact was certified on documents its training never read, and
    records the scope of its guarantee."""
    from harness.train.common import SPLITS, trained_records
    from harness.trained_exits import shipped_artifacts

    source_of = {split: name for name, (_, split) in SPLITS.items()}
    for path in shipped_artifacts():
        art = ExitArtifact.load(path)
        for key, entry in art.thresholds.items():
            scope = entry.get("scope")
            assert scope, f"{path.name} {key}: no recorded scope (calibrated before it was recorded); rerun make exits"
            trained, by = trained_records(art, source_of[scope["split"]])
            assert not set(scope["documents"]["records"]) & trained, (path.name, key, by)
            for field in ("task", "max_steps", "max_prompt_tokens", "n", "delta", "epsilon", "risk_definition"):
                assert scope[field] not in (None, ""), (path.name, key, field)
            assert scope["n"] == entry["examples"] == scope["documents"]["documents"]
            assert (entry["guarantee"] is None) == (not entry["passed"])


# -- end to end on the real model ---------------------------------------------------------------------------
def _opts(**kw):
    base = dict(calibrate_examples=2, calibrate_max_steps=8, calibrate_grid=3, calibrate_max_prompt_tokens=64,
                calibrate_methods="calm", calibrate_delta=0.5, calibrate_epsilon=0.5, calibrate_finest=0.25)
    base.update(kw)
    return CalibrateOptions(**base)


@pytest.fixture
def one_thread():
    """Tiny prefills on a shared 2-core machine: one intra-op thread avoids OpenMP barrier stalls under load
    (64-token prefill 0.3 s instead of 9 s at load 10); restored afterwards."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def test_calibrate_writes_thresholds_a_generator_picks_up(model, tmp_path, one_thread):
    cfg = TrainConfig(recipe="calibrate", work_dir=str(tmp_path), exits="none")
    art = calibrate(cfg, _opts(calibrate_dataset="gsm8k_train", calibrate_max_prompt_tokens=128), model)
    entry = art.thresholds["calm"]
    assert entry["examples"] == 2 and entry["split"] == "gsm8k train" and entry["risk"] == "consistency"
    assert entry["delta"] == 0.5 and entry["epsilon"] == 0.5
    assert entry["grid"] == [1.0, 0.75, 0.0]  # finest 0.25 of the range, then the aggressive end
    # the guarantee's scope: task, split, the documents (held out from training), length, n, delta, epsilon, risk
    scope = entry["scope"]
    assert (scope["task"], scope["split"], scope["n"], scope["delta"], scope["epsilon"]) == (
        "gsm8k", "gsm8k train", 2, 0.5, 0.5)
    assert scope["max_steps"] == 8 and scope["max_prompt_tokens"] == 128 and scope["risk"] == "consistency"
    from harness.train.common import heldout_documents
    assert set(scope["documents"]["records"]) <= set(heldout_documents("gsm8k_train", cfg.holdout_docs))
    assert len(scope["documents"]["records"]) == 2
    assert "<= 0.5" in entry["guarantee"] and "at most 8 new tokens" in entry["guarantee"]
    # the never-exit candidate reproduces the full model: zero loss, p = (1 - delta)^n = 0.25 <= epsilon
    assert entry["tested"][0][0] == 1.0 and entry["tested"][0][1] == 0.0
    assert entry["tested"][0][2] == pytest.approx(0.25)
    assert entry["avg_exit_layer"][0] == model.num_layers
    assert min(entry["avg_exit_layer"]) < model.num_layers  # an aggressive candidate really exited early
    assert entry["passed"] is True
    # fixed-sequence testing: every candidate before the last tested one passed; the choice is the last that passed
    ps = [row[2] for row in entry["tested"]]
    assert all(p <= 0.5 for p in ps[:-1]) and (ps[-1] > 0.5 or len(ps) == 3)
    passed = [row[0] for row in entry["tested"] if row[2] <= 0.5]
    assert entry["knobs"] == {"threshold": passed[-1]}
    assert entry["exits_early"] == (passed[-1] != 1.0)
    # the log has one line per tested candidate; the artifact file round-trips exactly
    lines = [json.loads(x) for x in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [ln["candidate"] for ln in lines] == list(range(len(entry["tested"])))
    loaded = ExitArtifact.load(tmp_path / "exits.safetensors")
    assert loaded.thresholds == art.thresholds and "calibrate" in loaded.provenance
    # a calm generator built with the artifact attached takes the calibrated threshold; explicit knobs still win
    try:
        model.set_exits(loaded)
        g = build_generator(model, GenerationConfig(generation_strategy="calm"))
        assert g.knobs()["threshold"] == entry["knobs"]["threshold"] != 0.9
        assert g.trained_knobs == entry["knobs"]
        assert build_generator(model, GenerationConfig(generation_strategy="calm", threshold=0.7)).knobs()[
            "threshold"] == 0.7
    finally:
        model.set_exits(None)
    assert build_generator(model, GenerationConfig(generation_strategy="calm")).knobs()["threshold"] == 0.9


def test_delta_zero_keeps_never_exit(model, tmp_path, one_thread):
    cfg = TrainConfig(recipe="calibrate", work_dir=str(tmp_path), exits="none")
    methods = "calm,free,dynamic:max_probability,dynamic:entropy_based"
    art = calibrate(cfg, _opts(calibrate_delta=0.0, calibrate_methods=methods, calibrate_skip_empty=False), model)
    for key, knob in KNOBS.items():
        entry = art.thresholds[key]
        assert entry["passed"] is False and entry["exits_early"] is False and entry["guarantee"] is None
        assert len(entry["tested"]) == 1  # stopped at the first (never-exit) candidate
        assert entry["tested"][0][1] == 0.0 and entry["tested"][0][2] == 1.0  # lossless, yet delta 0 is uncertifiable
        assert entry["knobs"] == {n: knob.never for n in knob.names}
    try:
        model.set_exits(art)
        g = build_generator(model, GenerationConfig(criteria="max_probability"))
        assert g.knobs()["max_prob_start"] == 1.0 and g.knobs()["max_prob_end"] == 1.0
    finally:
        model.set_exits(None)


def test_bad_options_are_one_line_errors(model, tmp_path):
    cfg = TrainConfig(recipe="calibrate", work_dir=str(tmp_path), exits="none")
    with pytest.raises(UsageError, match="calibrate_methods"):
        calibrate(cfg, _opts(calibrate_methods="calm,dynamic:convergence"), model)
    with pytest.raises(UsageError, match="calibrate_grid"):
        calibrate(cfg, _opts(calibrate_grid=1), model)
    with pytest.raises(UsageError, match="calibrate_finest"):
        calibrate(cfg, _opts(calibrate_finest=1.0), model)
