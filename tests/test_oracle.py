"""The oracle speedup of harness/oracle.py on a synthetic cost curve (numbers worked by hand; no model)."""
from __future__ import annotations

import pytest

from harness.oracle import Counts, counts, curve_cost, oracle_speedup, run_oracle

# layers(k) = 0.8 + 0.1 (k - 1), head(k) = 0.2 + 0.05 (k - 1), total = layers + head: total(1) = 1.0
CURVE = {"points": [{"k": k, "layers": 0.8 + 0.1 * (k - 1), "head": 0.2 + 0.05 * (k - 1),
                     "total": 1.0 + 0.15 * (k - 1)} for k in (4, 3, 2, 1)]}  # any order


def test_curve_is_interpolated_and_clamped():
    assert curve_cost(CURVE, "total", 1) == pytest.approx(1.0)
    assert curve_cost(CURVE, "total", 2.5) == pytest.approx(1.225)
    assert curve_cost(CURVE, "layers", 10) == pytest.approx(1.1)  # beyond the curve: its widest pass
    assert curve_cost(CURVE, "head", 0.5) == pytest.approx(0.2)


def test_plain_decoding_is_exactly_one():
    for exit_layer in (None, 2):  # no drafts: the exit layer changes nothing
        assert oracle_speedup(CURVE, Counts(decoded=100, verify_passes=100, drafted=0, draft_passes=0), 10,
                              exit_layer) == pytest.approx(1.0, abs=1e-12)


def test_early_exit_drafts_pay_their_layers_and_the_scorer_only_the_rest():
    # L = 10, E = 2; 30 tokens from 10 passes of w = 1 + 30/10 = 4 positions, 30 draft forwards
    # verify = layers(4) * 8/10 + head(4) = 0.88 + 0.35; draft = layers(1) * 2/10 + head(1) = 0.16 + 0.2
    got = oracle_speedup(CURVE, Counts(decoded=30, verify_passes=10, drafted=30, draft_passes=30), 10, 2)
    assert got == pytest.approx(30 * 1.0 / (10 * 1.23 + 30 * 0.36))


def test_free_drafts_verify_at_full_depth():
    # prompt lookup: no draft forwards, so every verification is a full pass of w = 1 + 20/10 = 3 positions
    c = Counts(decoded=30, verify_passes=10, drafted=20, draft_passes=0)
    assert oracle_speedup(CURVE, c, 10, None) == pytest.approx(30 / (10 * 1.3))
    assert oracle_speedup(CURVE, c, 10, 2) == oracle_speedup(CURVE, c, 10, None)  # E set, no early-exit draft


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
