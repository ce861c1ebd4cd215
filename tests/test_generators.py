"""The autoregressive / static-exit generator on real prompts of the bundled data."""
from __future__ import annotations

import pytest
import torch

from harness.config import GenerationConfig, UsageError
from harness.generators import StopCondition, build_generator


def _gen(model, **kw):
    return build_generator(model, GenerationConfig(**kw))


@torch.inference_mode()
def test_greedy_equals_transformers_generate(model, real_prompts):
    gen = _gen(model)
    for text in real_prompts[:5]:
        ids = model.encode(text)
        res = gen.generate(ids, StopCondition(model, 24))
        x = torch.tensor([ids])
        ref = model.hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=24, do_sample=False,
                                pad_token_id=0)[0, len(ids):].tolist()
        assert res.tokens == ref
        n = len(ref)
        assert res.exit_layers == [model.num_layers] * n
        assert res.layer_forwards == model.num_layers * (n - 1)  # decode only: tokens after the prefill token
        assert res.stop_reason == ("max_steps" if n == 24 else "eos")
        assert res.prefill_seconds > 0 and res.decode_seconds > 0


@torch.inference_mode()
def test_static_exit_uses_only_the_first_layers(model, real_prompts):
    e = 9
    ids = model.encode(real_prompts[1])
    res = _gen(model, exit_layer=e).generate(ids, StopCondition(model, 6, eos_ids=set()))
    assert res.exit_layers == [e] * 6
    assert res.layer_forwards == e * 5
    # the same tokens by hand: E layers on the growing sequence (no cache), then the exit head
    seq = list(ids)
    for _ in range(6):
        h = model.run_layers(model.embed(torch.tensor([seq])), 0, e, model.new_cache(), 0)
        seq.append(int(model.exit_logits(h[:, -1:]).argmax()))
    assert res.tokens == seq[len(ids):]


@torch.inference_mode()
def test_sampling_is_seeded_and_respects_top_k(model, real_prompts):
    ids = model.encode(real_prompts[0])
    a = _gen(model, sample=True, temperature=0.8, top_k=5, seed=1).generate(ids, StopCondition(model, 12, eos_ids=set()))
    b = _gen(model, sample=True, temperature=0.8, top_k=5, seed=1).generate(ids, StopCondition(model, 12, eos_ids=set()))
    assert a.tokens == b.tokens
    # with top_k=1 sampling must reduce to greedy
    g = _gen(model).generate(ids, StopCondition(model, 12, eos_ids=set()))
    k1 = _gen(model, sample=True, top_k=1, seed=3).generate(ids, StopCondition(model, 12, eos_ids=set()))
    assert k1.tokens == g.tokens


def test_stop_condition_cuts_after_the_first_stop(model):
    toks = model.encode("Paris.\n\nQuestion: what next")
    stop = StopCondition(model, 100, ("\n\n",), eos_ids=set())
    cut, reason = stop.check(list(toks), new=len(toks))
    assert reason == "stop_string"
    assert "\n\n" in model.decode(toks[:cut]) and "\n\n" not in model.decode(toks[:cut - 1])
    eos = StopCondition(model, 100, (), eos_ids={toks[2]})
    assert eos.check(list(toks[:5]), new=5) == (3, "eos")
    assert StopCondition(model, 4, (), eos_ids=set()).check(list(toks[:4])) == (4, "max_steps")
    assert StopCondition(model, 40, (), eos_ids=set()).check(list(toks[:4])) is None


@torch.inference_mode()
def test_generation_stops_on_eos(model):
    ids = model.encode("What is the capital of France? Answer in one word.", chat=True)
    res = _gen(model).generate(ids, StopCondition(model, 64))
    assert res.stop_reason == "eos" and res.tokens[-1] in model.eos_ids()
    assert "Paris" in model.decode(res.tokens)


@pytest.mark.parametrize("kw,match", [({"exit_layer": 0}, "--exit_layer must be >= 1"), ({"exit_layer": 31}, "outside 1..30"),
                                      ({"generation_strategy": "nope"}, "unknown --generation_strategy"),
                                      ({"sample": True, "temperature": 0.0}, "temperature"),
                                      ({"max_steps": 0}, "max_steps")])
def test_bad_generation_configs_are_usage_errors(model, kw, match):
    with pytest.raises(UsageError, match=match):
        _gen(model, **kw)
