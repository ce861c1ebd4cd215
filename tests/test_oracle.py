"""The oracle speedup of harness/oracle.py on a synthetic cost curve (numbers worked by hand; no model)."""
from __future__ import annotations

import pytest

from harness.oracle import Counts, DraftShape, counts, curve_cost, draft_shape, layer_weights, oracle_speedup, run_oracle

E2 = DraftShape(layers=2, head_rows=100, verify_from=2)  # LayerSkip's exit after 2 layers, full head
# layers(k) = 0.8 + 0.1 (k - 1), head(k) = 0.2 + 0.05 (k - 1), total = layers + head: total(1) = 1.0
CURVE = {"points": [{"k": k, "layers": 0.8 + 0.1 * (k - 1), "head": 0.2 + 0.05 * (k - 1),
                     "total": 1.0 + 0.15 * (k - 1)} for k in (4, 3, 2, 1)]}  # any order


def test_curve_is_interpolated_and_clamped():
    assert curve_cost(CURVE, "total", 1) == pytest.approx(1.0)
    assert curve_cost(CURVE, "total", 2.5) == pytest.approx(1.225)
    assert curve_cost(CURVE, "layers", 10) == pytest.approx(1.1)  # beyond the curve: its widest pass
    assert curve_cost(CURVE, "head", 0.5) == pytest.approx(0.2)


def test_plain_decoding_is_exactly_one():
    for shape in (None, E2):  # no drafts: the drafter changes nothing
        assert oracle_speedup(CURVE, Counts(decoded=100, verify_passes=100, drafted=0, draft_passes=0), 10,
                              shape) == pytest.approx(1.0, abs=1e-12)


def test_early_exit_drafts_pay_their_layers_and_the_scorer_only_the_rest():
    # L = 10, E = 2; 30 tokens from 10 passes of w = 1 + 30/10 = 4 positions, 30 draft forwards
    # verify = layers(4) * 8/10 + head(4) = 0.88 + 0.35; draft = layers(1) * 2/10 + head(1) = 0.16 + 0.2
    got = oracle_speedup(CURVE, Counts(decoded=30, verify_passes=10, drafted=30, draft_passes=30), 10, E2)
    assert got == pytest.approx(30 * 1.0 / (10 * 1.23 + 30 * 0.36))


def test_free_drafts_verify_at_full_depth():
    # prompt lookup: no draft forwards, so every verification is a full pass of w = 1 + 20/10 = 3 positions
    c = Counts(decoded=30, verify_passes=10, drafted=20, draft_passes=0)
    assert oracle_speedup(CURVE, c, 10, None) == pytest.approx(30 / (10 * 1.3))
    assert oracle_speedup(CURVE, c, 10, E2) == oracle_speedup(CURVE, c, 10, None)  # E set, no early-exit draft


def test_counts_from_records_and_what_is_undefined():
    recs = [{"new_tokens": 5, "verify_passes": 2, "drafted": 4, "draft_passes": 4, "accepted": 2},
            {"new_tokens": 1, "verify_passes": 0, "drafted": 0, "draft_passes": 0, "accepted": 0},
            {"new_tokens": 9, "verify_passes": None}]  # counts nothing: left out
    assert counts(recs) == Counts(decoded=4, verify_passes=2, drafted=4, draft_passes=4)
    # transformers' peers log no drafted count: their accepted tokens stand in
    assert counts([{"new_tokens": 7, "verify_passes": 3, "drafted": None, "accepted": 3, "draft_passes": 0}]) == \
        Counts(decoded=6, verify_passes=3, drafted=3, draft_passes=0)
    assert counts([{"new_tokens": 5}]) is None  # older logs, or methods without verification passes
    assert oracle_speedup(CURVE, Counts(0, 0, 0, 0), 10, None) is None
    assert oracle_speedup({"points": []}, Counts(4, 4, 0, 0), 10, None) is None
    info = {"model": {"num_layers": 10}, "knobs": {"exit_layer": 2}, "cost_curve": CURVE}
    assert run_oracle(info, recs) == pytest.approx(4 / (2 * (1.0 * 0.8 + 0.3) + 4 * 0.36))
    assert run_oracle({**info, "cost_curve": None}, recs) is None
    assert run_oracle({**info, "model": {}}, recs) is None


# A 10-layer model of hidden 10, vocabulary 100, tied head: 1000 embedding weights, 10 layers of 400 weights each
MODEL = {"num_layers": 10, "hidden_size": 10, "vocab_size": 100, "parameters": 1000 + 10 * 400}


def test_each_drafter_states_what_its_forward_streams():
    assert layer_weights(MODEL) == 400 and layer_weights({"num_layers": 10}) is None
    shape = lambda knobs, model=MODEL: draft_shape({"model": model, "knobs": knobs})  # noqa: E731
    # LayerSkip's exit: E layers; with a trained adapter at E its two 10 x 40 products (800 weights = 2 layers' worth)
    assert shape({"drafter": "exit", "exit_layer": 3}) == DraftShape(3.0, 100, 3)
    art = {**MODEL, "exits": {"adapter_layers": [3], "adapter_width": 40}}
    assert shape({"drafter": "exit", "exit_layer": 3, "draft_vocab": 20}, art) == DraftShape(5.0, 20, 3)
    assert shape({"drafter": "exit", "exit_layer": 4}, art) == DraftShape(4.0, 100, 4)  # no adapter at 4
    # Kangaroo: E layers + 4 hidden^2 of attention (400 = one layer's worth here); verification resumes at E
    assert shape({"drafter": "kangaroo", "exit_layer": 2, "draft_vocab": 0}) == DraftShape(3.0, 100, 2)
    # EAGLE: one layer + fc (2 hidden^2 + hidden = 210); full-depth verification
    assert shape({"drafter": "eagle", "exit_layer": None, "draft_vocab": 50}) == DraftShape(1 + 210 / 400, 50, 0)
    # transformers' assistant early exit: no drafter knob, its exit layer; no drafter at all: None
    assert shape({"exit_layer": 7}) == DraftShape(7.0, 100, 7) and shape({}) is None
    assert shape({"drafter": "exit", "exit_layer": 3}, {"num_layers": 10}) is None  # an old record: no figure


def test_a_drafter_that_reads_the_last_layer_pays_its_module_and_a_full_verification():
    # EAGLE on CURVE, L = 10: 30 tokens from 10 passes of w = 4, 30 drafts of 1.5 layers on 20 of 100 rows
    # verify = total(4) = 1.45; draft = layers(1) * 1.5 / 10 + head(1) * 0.2 = 0.12 + 0.04
    c = Counts(decoded=30, verify_passes=10, drafted=30, draft_passes=30)
    got = oracle_speedup(CURVE, c, 10, DraftShape(1.5, 20, 0), vocab=100)
    assert got == pytest.approx(30 / (10 * 1.45 + 30 * 0.16))
    info = {"model": {**MODEL, "parameters": 1000 + 10 * 420}, "cost_curve": CURVE,  # 420 per layer: fc = 0.5 layer
            "knobs": {"drafter": "eagle", "draft_vocab": 20, "exit_layer": None}}
    recs = [{"new_tokens": 16, "verify_passes": 5, "drafted": 15, "draft_passes": 15}] * 2
    assert run_oracle(info, recs) == pytest.approx(30 / (10 * 1.45 + 30 * 0.16))
