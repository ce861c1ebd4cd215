"""The self-speculation speed model on hand-computed cases: `simulate` walks the generator's steps exactly, and
`best_setting` picks the fastest setting, and the verdict says "don't speculate" unless that setting's interval
lies above 1.0x."""
from __future__ import annotations

import pytest

from harness.speedup_model import Costs, best_setting, recommendation, simulate
from harness.trained_exits import ExitArtifact


def unit_costs() -> Costs:
    """L = 4 layers of 1 s each at any chunk size up to 4 positions, full head 1 s, candidate-row head 0.5 s on
    100 rows, adapter 0.5 s. Autoregressive step: 4 x 1 + 1 = 5 s. A draft at E = 1 on the rows: 1 + 0.5 + 0.5
    = 2 s; on the full head: 1 + 0.5 + 1 = 2.5 s. A verify over q positions after E = 1: (layers 0..0 of the
    last position, unless a threshold-stopped draft already ran them: 1 s) + 3 x 1 + 1 = 5 s (4 s without)."""
    return Costs(layer=1.0, layer_chunk={q: 1.0 for q in range(1, 5)}, head={q: 1.0 for q in range(1, 5)},
                 head_rows=0.5, adapter=0.5, context=16, rows=100, layer_count=4)


def test_simulate_all_accepted_hand_computed():
    # 5 decode positions, E = 1, k = 2, no threshold.
    # step 1 (t = 0): room min(2, 5 - 0 - 1) = 2 drafts, both agree: a = 2, emits 3; 2 x 2 + 5 = 9 s
    # step 2 (t = 3): room min(2, 5 - 3 - 1) = 1 draft, agrees: a = 1, emits 2; 2 + 5 = 7 s (position 4 never drafted)
    # 16 s for 5 tokens against 5 x 5 = 25 s: 25 / 16 = 1.5625x, 2.5 tokens per step, 3 of 3 drafts accepted
    r = simulate([True, True, True, True, False], [1.0] * 5, 1, 2, 0.0, unit_costs())
    assert r["predicted_speedup"] == pytest.approx(25 / 16)
    assert r["tokens_per_step"] == pytest.approx(2.5)
    assert r["acceptance"] == 1.0 and r["drafted_per_step"] == pytest.approx(1.5)
    assert r["draft_vocab"] == 100  # the rows the costs were measured on


def test_simulate_threshold_stop_reuses_the_state_hand_computed():
    # 4 positions, E = 1, k = 3, threshold 0.5; agree T T F T, confidence 0.9 0.4 0.9 0.9.
    # step 1 (t = 0): draft 1 (0.9) kept, draft 2 (0.4) dropped: 2 attempts, 1 kept, agrees: a = 1, emits 2.
    #   the dropped draft's input already went through layer 0: verify 0 + 3 + 1 = 4; 2 x 2 + 4 = 8 s
    # step 2 (t = 2): room min(3, 4 - 2 - 1) = 1: draft kept (0.9), disagrees: a = 0, emits 1; 2 + 5 = 7 s
    # step 3 (t = 3): room 0: a plain full-depth step, 5 s, emits 1
    # 20 s for 4 tokens = the autoregressive 4 x 5 s: exactly 1.0x; 1 of 2 drafts accepted; 4 tokens in 3 steps
    r = simulate([True, True, False, True], [0.9, 0.4, 0.9, 0.9], 1, 3, 0.5, unit_costs())
    assert r["predicted_speedup"] == pytest.approx(1.0)
    assert r["acceptance"] == pytest.approx(0.5)
    assert r["tokens_per_step"] == pytest.approx(4 / 3)


def test_simulate_sequences_restart_and_full_head_costs_more():
    seq = [True, True, True, True, False]
    # a second sequence of one position: room 0, one plain step (5 s, 1 token). Pooled: 16 + 5 = 21 s for 6
    # tokens against 30 s: 30 / 21. Simulated as one flat sequence instead, the second step would draft across
    # the boundary (t = 3: 2 drafts, a = 1, 9 s; t = 5: 5 s): 23 s, 30 / 23.
    pooled = simulate([seq, [True]], [[1.0] * 5, [1.0]], 1, 2, 0.0, unit_costs())
    assert pooled["predicted_speedup"] == pytest.approx(30 / 21)
    flat = simulate(seq + [True], [1.0] * 6, 1, 2, 0.0, unit_costs())
    assert flat["predicted_speedup"] == pytest.approx(30 / 23)
    # drafting through the full head: draft 2.5 s; 2 x 2.5 + 5 + 2.5 + 5 = 17.5 s: 25 / 17.5
    full = simulate(seq, [1.0] * 5, 1, 2, 0.0, unit_costs(), draft_vocab=0)
    assert full["predicted_speedup"] == pytest.approx(25 / 17.5) and full["draft_vocab"] == 0
    with pytest.raises(ValueError, match="draft_vocab"):
        simulate(seq, [1.0] * 5, 1, 2, 0.0, unit_costs(), draft_vocab=50)  # no costs measured for 50 rows


def test_best_setting_picks_the_fastest_setting_and_vocabulary():
    seq, conf = [True, True, True, True, False], [1.0] * 5
    best, table = best_setting({(1, 100): (seq, conf), (1, 0): (seq, conf)}, unit_costs(), ks=(1, 2),
                               thresholds=(0.0,))
    # k = 1 on the rows: t = 0 (one agreeing draft, emits 2, 2 + 5 = 7 s), t = 2 (the same, 7 s), t = 4 (room 0,
    # a plain step, 5 s): 19 s -> 25 / 19, below k = 2's 25 / 16; the full head: 25 / 17.5 (k = 2), 25 / 20 (k = 1)
    assert len(table) == 4
    assert (best["exit_layer"], best["num_speculations"], best["draft_vocab"]) == (1, 2, 100)
    assert best["predicted_speedup"] == pytest.approx(25 / 16)
    k1 = next(r for r in table if r["num_speculations"] == 1 and r["draft_vocab"] == 100)
    assert k1["predicted_speedup"] == pytest.approx(25 / 19)


def test_best_setting_when_nothing_reaches_one():
    # the draft exit never agrees, confidence 0.4 everywhere; E = 1, 4 positions.
    # threshold 0: k = 1: t = 0,1,2 one rejected draft each (2 + 5 = 7 s), t = 3 plain (5 s): 26 s -> 20 / 26;
    #   k = 2: 9 + 9 + 7 + 5 = 30 s -> 20 / 30
    # threshold 0.5: every attempt stops at once (0.4 < 0.5), the state is reused: 2 + 4 = 6 s for t = 0,1,2,
    #   then room 0 at t = 3 (5 s): 23 s -> 20 / 23 for k = 1 and k = 2 alike; the first of the tie is kept
    best, table = best_setting({1: ([False] * 4, [0.4] * 4)}, unit_costs(), ks=(1, 2), thresholds=(0.0, 0.5))
    assert best["predicted_speedup"] == pytest.approx(20 / 23)
    assert (best["num_speculations"], best["draft_threshold"]) == (1, 0.5)
    assert sorted(round(r["predicted_speedup"], 6) for r in table) == sorted(
        round(x, 6) for x in (20 / 26, 20 / 23, 20 / 30, 20 / 23))


def test_the_verdict_speculates_only_when_the_interval_lies_above_one():
    """A point prediction above 1.0x is not enough: one prompt that drafts well and one that does not pool to
    1.29x, but resampling the prompts reaches 0.63x, so the verdict is "don't speculate" with no knobs."""
    from harness.speedup_model import verdict, worth_speculating

    good, poor = [True] * 11 + [False], [False] * 3 + [True]
    mixed = {(1, 100): ([good, poor], [[1.0] * 12, [1.0] * 4])}
    rec, _ = verdict(mixed, mixed[(1, 100)], 1, unit_costs(), 3)
    assert rec["best"]["predicted_speedup"] == pytest.approx(80 / 62)  # 16 tokens: 80 s of AR against 62 s
    assert rec["best"]["predicted_speedup_ci95"][0] < 1.0 < rec["best"]["predicted_speedup_ci95"][1]
    assert rec["speculate"] is False and rec["knobs"] == {}
    assert rec["predicted_speedup"] == rec["untrained_default"]["predicted_speedup"]
    both_good = {(1, 100): ([good, good], [[1.0] * 12, [1.0] * 12])}
    rec, _ = verdict(both_good, mixed[(1, 100)], 1, unit_costs(), 3)
    assert rec["speculate"] is True and rec["knobs"]["exit_layer"] == 1
    assert rec["best"]["predicted_speedup_ci95"][0] > 1.0
    assert not worth_speculating((0.98, 1.05)) and not worth_speculating((1.0, 1.2)) and worth_speculating((1.01, 1.2))


def test_recommendation_reads_the_recorded_verdict():
    assert recommendation(ExitArtifact(model={})) is None
    old = ExitArtifact(model={}, provenance={"exit_adapters": {"recommendation": {"exit_layer": 10}}})
    assert recommendation(old) is None  # recorded before the verdict existed
    rec = {"speculate": False, "knobs": {}, "predicted_speedup": 0.4}
    assert recommendation(ExitArtifact(model={}, provenance={"exit_adapters": {"recommendation": rec}})) == rec


def test_speedup_interval_resamples_whole_sequences():
    from harness.speedup_model import speedup_interval

    seq, conf = [True, True, True, True, False], [1.0] * 5
    # one sequence, or copies of it: every resample predicts 25 / 16
    assert speedup_interval(seq, conf, 1, 2, 0.0, unit_costs()) == pytest.approx((25 / 16, 25 / 16))
    # sequences A (16 s, 5 tokens: 25 / 16) and B (one plain step: 1.0x): resamples AA, AB, BA, BB with probability
    # 1/4, 1/2, 1/4, so the 2.5% and 97.5% quantiles are BB's 1.0 and AA's 25 / 16 (AB pools to 30 / 21)
    lo, hi = speedup_interval([seq, [True]], [conf, [1.0]], 1, 2, 0.0, unit_costs())
    assert (lo, hi) == pytest.approx((1.0, 25 / 16))


def test_the_acceptance_pattern_round_trips_and_gives_the_same_verdict():
    from harness.speedup_model import pack_pattern, unpack_pattern, verdict

    per_exit = {(1, 100): ([[True, False, True], [True]], [[0.875, 0.25, 0.75], [0.625]]),
                (2, 100): ([[True, True, True], [False]], [[0.9375, 0.875, 0.5], [0.125]])}
    default = ([[False, True, False], [True]], [[0.25, 0.875, 0.125], [0.5]])  # float32-exact: stored as such
    back = unpack_pattern(pack_pattern(per_exit, default, 1))
    assert back is not None and back[0] == per_exit and back[1] == default and back[2] == 1
    assert unpack_pattern({}) is None
    a, _ = verdict(per_exit, default, 1, unit_costs(), 3)
    b, _ = verdict(*back, unit_costs(), 3)
    assert a == b and a["speculate"] == bool(a["knobs"])


def test_a_verdict_timed_elsewhere_is_recosted_where_the_run_happens():
    """The shipped artifact keeps its fit's acceptance pattern: a bf16 run re-costs the fp32 verdict on its own
    device and dtype (stderr says so, the fit's own is kept); a run where it was timed keeps it as it is."""
    from harness.model import load_model
    from harness.trained_exits import shipped_artifacts

    (path,) = shipped_artifacts()
    shipped = recommendation(ExitArtifact.load(path))
    m = load_model(None, "cpu", "bfloat16", exits="auto")
    rec = recommendation(m.exits)
    assert rec["costed_on"] == {"device": "cpu", "dtype": "bfloat16"}
    assert rec["recosted_from"]["knobs"] == shipped["knobs"]
    assert rec["recosted_from"]["costed_on"] == {"device": "cpu", "dtype": "float32"}
    assert m.exits.recommended["self_speculative"] == rec["knobs"] and rec["speculate"] == bool(rec["knobs"])
    assert rec["fitted_on"]["decode_positions"] == shipped["fitted_on"]["decode_positions"]
    fp32 = load_model(None, "cpu", "float32", exits="auto")
    assert recommendation(fp32.exits) == shipped


def test_costs_are_timed_interleaved_after_one_warm_up_each():
    """Each repetition times every operation in turn (drift then moves them alike); one untimed warm-up each."""
    from harness.speedup_model import interleaved_medians

    calls, syncs = [], []
    out = interleaved_medians({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                              lambda: syncs.append(1), reps=3)
    assert calls == ["a", "b"] + ["a", "b"] * 3
    assert set(out) == {"a", "b"} and all(v >= 0 for v in out.values())
    assert len(syncs) == 2 * 2 * 3  # before and after each timed call


def test_a_drafter_fit_follows_todays_rule():
    """A trained drafter's fit recorded under the earlier point rule ("speculate" at 1.03x [0.97-1.10]) says don't
    speculate under the interval rule: its verdict says so and its knobs go (the candidate vocabulary stays); a fit
    whose interval lies above 1.0x keeps its knobs."""
    from harness.speedup_model import drafter_verdict, follow_drafter_rule

    def fit(lo, hi):
        return {"best": {"num_speculations": 2, "draft_threshold": 0.8, "predicted_speedup": (lo + hi) / 2,
                         "interval": [lo, hi], "speculate": True}}

    art = ExitArtifact(model={}, recommended={
        "eagle": {"num_speculations": 2, "draft_threshold": 0.8, "draft_vocab": 100},
        "self_speculative:drafter=eagle": {"num_speculations": 2, "draft_threshold": 0.8, "draft_vocab": 100},
        "self_speculative": {"exit_layer": 3}},
        provenance={"eagle": {"fit": {"fitted_on": {"device": "cpu", "dtype": "bfloat16"}, "eagle": fit(0.97, 1.10),
                                      "self_speculative:drafter=eagle": fit(1.02, 1.2)}}})
    v = drafter_verdict(art, "eagle")
    assert v["speculate"] is False and v["knobs"] == {} and v["best"]["predicted_speedup_ci95"] == [0.97, 1.10]
    assert drafter_verdict(art, "self_speculative:drafter=eagle")["speculate"] is True
    assert drafter_verdict(art, "self_speculative") is None  # the exit adapters' verdict is `recommendation`'s
    assert follow_drafter_rule(art) == ["eagle"]
    assert art.recommended["eagle"] == {"draft_vocab": 100}
    assert art.recommended["self_speculative:drafter=eagle"]["num_speculations"] == 2
    assert art.recommended["self_speculative"] == {"exit_layer": 3}


def test_the_shipped_drafters_follow_the_rule_when_attached():
    """Attaching the shipped artifact applies the rule to its drafter fits: a key whose recorded interval does not lie
    above 1.0x runs without recommended knobs, and says so through its verdict."""
    from harness.speedup_model import drafter_verdict
    from harness.trained_exits import shipped_artifacts

    art = ExitArtifact.load(shipped_artifacts()[0])
    keys = [k for k in art.recommended if drafter_verdict(art, k) is not None]
    assert keys, "the shipped artifact holds drafter fits"
    from harness.speedup_model import follow_drafter_rule

    follow_drafter_rule(art)
    for key in keys:
        v = drafter_verdict(art, key)
        assert v["speculate"] == (v["best"]["interval"][0] > 1.0)
        if not v["speculate"]:
            assert set(art.recommended[key]) <= {"draft_vocab"}, key
