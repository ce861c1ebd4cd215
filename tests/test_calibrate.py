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
        g = knob.grid(5, 49152)
        assert len(g) == 5 and g[0] == knob.never
        step = [b - a for a, b in zip(g, g[1:])]
        assert all(s != 0 for s in step) and len({s > 0 for s in step}) == 1  # strictly monotone
    assert KNOBS["dynamic:entropy_based"].grid(3, 49152)[-1] == pytest.approx(math.log(49152), abs=1e-5)
    parser = argparse.ArgumentParser()
    add_dataclass_args(parser, CalibrateOptions, "calibrate")
    ns = parser.parse_args(["--calibrate_delta", "0.3", "--calibrate_risk", "reference"])
    assert ns.calibrate_delta == 0.3 and ns.calibrate_risk == "reference" and ns.calibrate_grid == 8
    with pytest.raises(SystemExit):
        parser.parse_args(["--calibrate_risk", "bleu"])


def test_documents_the_artifact_trained_on_come_last(model):
    from harness.tasks import DATA_DIR, read_jsonl
    from harness.train.calibrate import calibration_order
    from harness.train.common import load_texts

    train_cfg = TrainConfig(data="xsum_validation", max_docs=990, seed=3)
    art = ExitArtifact(model=ExitArtifact.identity(model),
                       provenance={"exit_adapters": {"config": dataclasses.asdict(train_cfg)}})
    ordered, trained = calibration_order(TrainConfig(seed=0), CalibrateOptions(), art)
    records = [r for _, r in read_jsonl(DATA_DIR / "xsum_validation.jsonl.gz")]
    assert len(ordered) == len(records) and len(trained) == 990
    seen = set(load_texts(train_cfg))  # exactly what that training read
    text = lambda ex: f"Article: {records[int(ex.id)]['document']}\nSummary: {records[int(ex.id)]['summary']}\n"
    assert all(text(ex) not in seen and ex.id not in trained for ex in ordered[:10])
    assert all(text(ex) in seen and ex.id in trained for ex in ordered[10:])
    assert ordered[0].prompt.startswith("Article: ") and ordered[0].prompt.endswith("\nSummary:")
    # without training provenance: a seeded shuffle of the whole split, the same for the same seed
    again, none = calibration_order(TrainConfig(seed=0), CalibrateOptions(), ExitArtifact(model={}))
    assert not none and [e.id for e in again] == [e.id for e in calibration_order(
        TrainConfig(seed=0), CalibrateOptions(), ExitArtifact(model={}))[0]] != [e.id for e in ordered]


# -- end to end on the real model ---------------------------------------------------------------------------
def _opts(**kw):
    base = dict(calibrate_examples=2, calibrate_max_steps=8, calibrate_grid=3, calibrate_max_prompt_tokens=64,
                calibrate_methods="calm", calibrate_delta=0.5, calibrate_epsilon=0.5)
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
        assert entry["passed"] is False and entry["exits_early"] is False
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
