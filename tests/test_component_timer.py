"""Per-component time breakdown: the timer itself, what each method reports, and that timing changes nothing."""
from __future__ import annotations

import pytest
import torch

from harness.component_timer import ComponentTimer, measure_section_cost
from harness.config import GenerationConfig
from harness.generators import StopCondition, build_generator

torch.set_num_threads(1)  # the suite shares a 2-core machine


def test_timer_synchronizes_at_both_ends_and_accumulates():
    syncs = []
    t = ComponentTimer(lambda: syncs.append(1), enabled=True)
    t.reset()
    measured = len(syncs)
    assert t.section_cost is not None and t.section_cost > 0  # measured once, on the first reset
    for _ in range(3):
        with t("draft"):
            pass
    with t("verify"):
        sum(range(20000))
    assert len(syncs) - measured == 8  # two synchronizations per section
    rep = t.report()
    assert rep["calls"] == {"draft": 3, "verify": 1}
    assert rep["components"]["verify"] > rep["components"]["draft"] / 3 > 0
    assert rep["overhead_seconds"] == pytest.approx(4 * t.section_cost)
    cost = t.section_cost
    t.reset()  # a new generation forgets the components but keeps the measured cost
    assert t.report() is None and t.section_cost == cost


def test_disabled_timer_is_a_no_op():
    syncs = []
    t = ComponentTimer(lambda: syncs.append(1))
    t.reset()
    with t("draft"):
        pass
    assert syncs == [] and t.report() is None and t.section_cost is None
    assert measure_section_cost(t) > 0


CASES = [
    ("self_speculative", dict(exit_layer=8, num_speculations=3), {"draft", "verify", "accept"}),
    ("hybrid_speculative", dict(exit_layer=8, num_speculations=3), {"lookup", "draft", "verify", "accept"}),
    # a low threshold makes FREE exit shallow often (checked on this prompt), so deep passes carry queued positions ("parallel")
    ("free", dict(shallow_exit_layer=6, threshold=0.4), {"shallow", "deep", "parallel"}),
    ("calm", dict(threshold=0.3, min_exit_layer=20), {"layers", "confidence", "head", "state_copy"}),
    ("dynamic", dict(criteria="max_probability"), {"layers", "confidence", "head", "state_copy"}),
]


@pytest.mark.parametrize("strategy,knobs,expected", CASES, ids=[c[0] for c in CASES])
def test_methods_report_their_components_and_timing_changes_nothing(model, real_prompts, strategy, knobs, expected):
    ids = model.encode(real_prompts[0])[-96:]
    g = build_generator(model, GenerationConfig(generation_strategy=strategy, **knobs))
    plain = g.generate(ids, StopCondition(model, 12, eos_ids=set()))
    g.timer.enabled = True
    timed = g.generate(ids, StopCondition(model, 12, eos_ids=set()))
    assert timed.tokens == plain.tokens and plain.breakdown is None
    b = timed.breakdown
    comps = b["components"]
    assert set(comps) <= expected
    assert {"verify", "layers", "shallow"} & set(comps)  # the main pass is always timed
    assert all(v >= 0 for v in comps.values())
    # sections never overlap: together they fit in the decode time, and the timer's own cost is reported
    assert sum(comps.values()) <= b["decode_seconds"] == pytest.approx(timed.decode_seconds)
    assert b["overhead_seconds"] == pytest.approx(sum(b["calls"].values()) * b["section_cost"])
    if strategy in ("self_speculative", "hybrid_speculative"):
        steps = b["calls"]["verify"]
        assert b["calls"]["accept"] == steps and b["calls"].get("draft", 0) <= steps
    if strategy == "free":
        assert b["calls"]["shallow"] == len(timed.tokens) - 1  # every decoded token runs the shallow layers
    if strategy in ("calm", "dynamic"):
        assert b["calls"]["head"] == len(timed.tokens) - 1


def test_free_parallel_pass_happens_with_a_low_threshold(model, real_prompts):
    ids = model.encode(real_prompts[0])[-96:]
    g = build_generator(model, GenerationConfig(generation_strategy="free", shallow_exit_layer=6, threshold=0.4))
    g.timer.enabled = True
    res = g.generate(ids, StopCondition(model, 16, eos_ids=set()))
    depths = res.exit_layers[1:]
    queued_then_deep = any(a == 6 and b == model.num_layers for a, b in zip(depths, depths[1:]))
    assert queued_then_deep  # a shallow exit followed by a deep token: that deep pass carries the queued one
    assert res.breakdown["calls"]["parallel"] == sum(a == 6 and b == model.num_layers
                                                     for a, b in zip(depths, depths[1:]))
