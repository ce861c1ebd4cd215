"""transformers' decoding paths as ordinary strategies: same stop rule, timers and work counters as ours."""
from __future__ import annotations

import pytest
import torch

from harness.config import GenerationConfig, UsageError
from harness.generators import StopCondition, build_generator
from harness.plan import expand_strategies

PEERS = [dict(generation_strategy="hf_generate"), dict(generation_strategy="hf_prompt_lookup", num_speculations=4),
         dict(generation_strategy="hf_assistant_early_exit", exit_layer=12)]


@pytest.fixture(scope="module")
def baseline(model, real_prompts):
    ids = model.encode(real_prompts[4])  # a GSM8K question: its greedy answer ends with a blank line
    stop = StopCondition(model, 24, ("\n\n", "Question:"))
    return ids, build_generator(model, GenerationConfig()).generate(ids, stop)


@torch.inference_mode()
@pytest.mark.parametrize("cfg", PEERS, ids=[c["generation_strategy"] for c in PEERS])
def test_greedy_peers_reproduce_our_autoregressive_output(model, baseline, cfg):
    ids, ar = baseline
    res = build_generator(model, GenerationConfig(**cfg)).generate(ids, StopCondition(model, 24, ("\n\n", "Question:")))
    assert res.tokens == ar.tokens and res.stop_reason == ar.stop_reason  # same stop rule, lossless peers
    d = len(res.tokens) - 1
    assert res.layer_forwards >= 30 * d and res.head_calls >= d  # counted by hooks, prefill excluded
    if cfg["generation_strategy"] == "hf_generate":
        assert res.layer_forwards == 30 * d and res.head_calls == d and res.accepted is None
    else:
        assert res.accepted is not None and res.accepted <= d
    assert res.prefill_seconds > 0 and res.decode_seconds > 0


@torch.inference_mode()
def test_peers_honour_fixed_length(model, baseline):
    ids, ar = baseline
    assert len(ar.tokens) < 24  # the baseline stops early on its own
    for cfg in PEERS:
        res = build_generator(model, GenerationConfig(**cfg)).generate(
            ids, StopCondition(model, 24, ("\n\n", "Question:"), fixed_length=True))
        assert len(res.tokens) == 24 and res.tokens[:len(ar.tokens)] == ar.tokens


def test_peer_knobs_are_checked(model):
    with pytest.raises(UsageError, match="needs --exit_layer"):
        build_generator(model, GenerationConfig(generation_strategy="hf_assistant_early_exit"))
    with pytest.raises(UsageError, match="does not apply to hf_generate"):
        build_generator(model, GenerationConfig(generation_strategy="hf_generate", exit_layer=8))
    with pytest.raises(UsageError, match="num_speculations applies to"):
        build_generator(model, GenerationConfig(generation_strategy="hf_generate", num_speculations=3))
    names = [c.generation_strategy for c in expand_strategies("all", GenerationConfig(), 30)]
    assert {"hf_generate", "hf_prompt_lookup", "hf_assistant_early_exit"} <= set(names)
    ae = next(c for c in expand_strategies("all", GenerationConfig(), 30)
              if c.generation_strategy == "hf_assistant_early_exit")
    assert ae.exit_layer == 7
