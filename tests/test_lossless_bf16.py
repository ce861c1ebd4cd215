"""Lossless in bf16, as harness/exactness.py defines it: every mismatch with greedy autoregressive output starts at a
near-tie of plain decoding's logits; a mismatch at a clear margin fails. (fp32 exactness: tests/test_methods.py.)"""
from __future__ import annotations

import pytest
import torch

from harness.config import GenerationConfig
from harness.exactness import TOLERANCE, compare, summarize
from harness.generators import build_generator
from harness.generators.base import StopCondition


@pytest.fixture(scope="module")
def bf16_model():
    from harness.model import load_model

    return load_model(None, "cpu", "bfloat16", exits="none")


@pytest.fixture(scope="module")
def prompts():
    from harness.tasks import load_examples

    # articles copy into summaries (prompt lookup drafts), questions and code do not (early-exit drafts)
    exs = load_examples("cnn_dm_summarization", 2) + load_examples("gsm8k", 1) + load_examples("human_eval", 1)
    return [e.prompt for e in exs]


def test_classification_is_by_plain_decodings_margin_at_the_first_difference():
    ref, gaps = [5, 6, 7, 8], [3.0, 0.125, 2.0, 1.0]
    assert compare([5, 6, 7, 8], ref, gaps, "bfloat16").kind == "identical"
    tie = compare([5, 9, 1, 1], ref, gaps, "bfloat16")
    assert (tie.kind, tie.first_difference, tie.margin) == ("near-tie", 1, 0.125)
    real = compare([5, 6, 9, 1], ref, gaps, "bfloat16")
    assert (real.kind, real.first_difference, real.margin) == ("real", 2, 2.0)
    assert compare([5, 9], ref, gaps, "float32").kind == "real"  # fp32 tolerates only arithmetic noise
    assert compare([5, 9], ref, None, "bfloat16").kind == "unknown"
    assert compare([5, 6], ref, gaps, "bfloat16").kind == "identical"  # a stop cut one output short
    s = summarize([tie, real, compare(ref, ref, gaps, "bfloat16")])
    assert (s["identical"], s["near-tie"], s["real"], s["max_mismatch_margin"]) == (1, 1, 1, 2.0)
    assert TOLERANCE["float32"] < 0.01 <= TOLERANCE["bfloat16"]


@torch.inference_mode()
def test_bf16_lossless_methods_differ_from_autoregressive_only_at_near_ties(bf16_model, prompts):
    m = bf16_model
    ar = build_generator(m, GenerationConfig())
    methods = [GenerationConfig(generation_strategy="hybrid_speculative", exit_layer=8, num_speculations=4),
               GenerationConfig(generation_strategy="self_speculative", exit_layer=20, num_speculations=3),
               GenerationConfig(generation_strategy="prompt_lookup"),
               GenerationConfig(generation_strategy="hf_prompt_lookup")]
    matches, verified = [], 0
    for text in prompts:
        ids = m.encode(text)[-500:]
        ref = ar.generate(ids, StopCondition(m, 32, eos_ids=set()))
        assert ref.top2_gaps is not None and len(ref.top2_gaps) == len(ref.tokens)
        for cfg in methods:
            got = build_generator(m, cfg).generate(ids, StopCondition(m, 32, eos_ids=set()))
            match = compare(got.tokens, ref.tokens, ref.top2_gaps, "bfloat16")
            assert match.kind in ("identical", "near-tie"), (cfg.generation_strategy, text[:60], match)
            matches.append(match)
            verified += got.verify_passes or 0
    s = summarize(matches)
    assert s["identical"] >= len(matches) // 2  # most outputs are simply identical
    assert verified > 0


def test_thresholds_calibrated_in_fp32_are_not_taken_in_bf16(bf16_model):
    from harness.trained_exits import ExitArtifact, shipped_artifacts

    (path,) = shipped_artifacts()
    art = ExitArtifact.load(path)
    assert art.calibrated_dtype() == "float32" and "threshold" in art.thresholds["calm"]["knobs"]
    bf16_model.set_exits(art)
    try:
        g = build_generator(bf16_model, GenerationConfig(generation_strategy="calm"))
        assert "threshold" not in g.trained_knobs and g.config.threshold == GenerationConfig().threshold
        assert g.skipped_thresholds["knobs"]["threshold"] == art.thresholds["calm"]["knobs"]["threshold"]
        assert g.skipped_thresholds["calibrated_dtype"] == "float32"
        assert g.trained_knobs.get("min_exit_layer") == art.recommended["calm"]["min_exit_layer"]  # not a certificate
    finally:
        bf16_model.set_exits(None)
