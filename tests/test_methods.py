"""Every decoding method on the real embedded model: losslessness, KV-cache contract, knobs, errors."""
from __future__ import annotations

import pytest
import torch

from harness import exits
from harness.config import GenerationConfig, UsageError
from harness.generators import StopCondition, build_generator
from harness.generators.self_speculative import verify_sampling
from harness.model import KVHoleError
from harness.tasks import load_examples

NEVER = {  # knobs under which each exit rule can never fire
    "calm": dict(generation_strategy="calm", threshold=2.0),
    "calm_hidden": dict(generation_strategy="calm", threshold=2.0, confidence="hidden_state"),
    "free": dict(generation_strategy="free", threshold=2.0),
    "cosine_similarity": dict(criteria="cosine_similarity", cosine_threshold=2.0),
    "token_repeat": dict(criteria="token_repeat", token_repeats=100, min_exit_layer=20),
    "entropy_based": dict(criteria="entropy_based", entropy_start=-1.0, entropy_end=-1.0, min_exit_layer=20),
    "max_probability": dict(criteria="max_probability", max_prob_start=2.0, max_prob_end=2.0, min_exit_layer=20),
    "convergence": dict(criteria="convergence", convergence_delta=-1.0, min_exit_layer=20),
    "calm_vocab": dict(generation_strategy="calm", threshold=2.0, min_exit_layer=20, vocab_reduction="fixed"),
}


def gen(model, **kw):
    return build_generator(model, GenerationConfig(**kw))


def run(model, g, text, n, eos=True):
    return g.generate(model.encode(text), StopCondition(model, n, eos_ids=None if eos else set()))


@pytest.fixture(scope="module")
def twenty_prompts():
    """20 real prompts: GSM8K questions, CNN/DM LM prefixes, HumanEval problems, XSum (short ones)."""
    exs = (load_examples("gsm8k", 7) + load_examples("cnn_dm_lm", 6) + load_examples("human_eval", 4)
           + sorted(load_examples("xsum_summarization", 40), key=lambda e: len(e.prompt))[:3])
    assert len(exs) == 20
    return [e.prompt for e in exs]


@pytest.mark.slow
def test_greedy_self_speculative_equals_autoregressive_on_20_real_prompts(model, twenty_prompts):
    ar = gen(model)
    settings = [(4, 2), (8, 6), (15, 4), (24, 3), (28, 5)]
    drafted = accepted = 0
    for i, text in enumerate(twenty_prompts):
        e, k = settings[i % len(settings)]
        ref = run(model, ar, text, 24)
        got = run(model, gen(model, generation_strategy="self_speculative", exit_layer=e, num_speculations=k), text, 24)
        assert got.tokens == ref.tokens, f"prompt {i} (E={e}, k={k})"
        assert got.exit_layers.count(model.num_layers) + got.exit_layers.count(e) == len(got.tokens)
        drafted += got.drafted
        accepted += got.accepted
    assert accepted >= 20  # untrained exits rarely agree, but the accept-and-crop path was exercised often


@torch.inference_mode()
def test_self_speculative_cache_equals_a_full_forward(model, twenty_prompts):
    g = gen(model, generation_strategy="self_speculative", exit_layer=20, num_speculations=4)
    ids = model.encode(twenty_prompts[0])
    res = g.generate(ids, StopCondition(model, 20, eos_ids=set()))
    assert res.accepted > 0 and res.accepted < res.drafted  # both acceptance and rejection happened
    seq = torch.tensor([ids + res.tokens])
    ref_cache = model.new_cache()
    model.run_layers(model.embed(seq), 0, model.num_layers, ref_cache, 0)
    n = len(ids) + len(res.tokens) - 1  # the last token is never processed
    assert model.cache_lengths(g.last_cache) == [n] * model.num_layers
    for i in range(model.num_layers):
        got, ref = g.last_cache.layers[i], ref_cache.layers[i]
        assert torch.allclose(got.keys, ref.keys[..., :n, :], atol=1e-4)
        assert torch.allclose(got.values, ref.values[..., :n, :], atol=1e-4)


@torch.inference_mode()
def test_free_parallel_pass_fills_deep_cache_exactly(model, twenty_prompts):
    g = gen(model, generation_strategy="free", shallow_exit_layer=10, threshold=0.7)
    ids = model.encode(twenty_prompts[0])
    res = g.generate(ids, StopCondition(model, 40, eos_ids=set()))
    S, L = 10, model.num_layers
    assert S in res.exit_layers and L in res.exit_layers[1:]  # shallow exits and deep passes both happened
    seq = torch.tensor([ids + res.tokens])
    ref_cache = model.new_cache()
    model.run_layers(model.embed(seq), 0, L, ref_cache, 0)
    n = len(ids) + len(res.tokens) - 1
    lengths = model.cache_lengths(g.last_cache)
    assert lengths[:S] == [n] * S
    assert lengths[S:] == [n - g.pending] * (L - S)  # only positions after the last deep pass are deferred
    for i in range(L):
        got, ref = g.last_cache.layers[i], ref_cache.layers[i]
        m = lengths[i]
        assert torch.allclose(got.keys, ref.keys[..., :m, :], atol=1e-4)
        assert torch.allclose(got.values, ref.values[..., :m, :], atol=1e-4)


@pytest.mark.parametrize("kw", [dict(generation_strategy="calm", min_exit_layer=6, confidence="hidden_state",
                                     threshold=0.9),
                                dict(criteria="cosine_similarity", cosine_threshold=0.9)])
@torch.inference_mode()
def test_state_copying_is_what_is_applied(model, twenty_prompts, kw):
    """Replaying the recorded exits by hand (E layers, then fill_kv from the exited state) gives the same cache."""
    g = gen(model, **kw)
    ids = model.encode(twenty_prompts[2])
    res = g.generate(ids, StopCondition(model, 16, eos_ids=set()))
    L = model.num_layers
    assert any(d < L for d in res.exit_layers[1:])  # some tokens did exit early
    cache = model.new_cache()
    model.run_layers(model.embed(torch.tensor([ids])), 0, L, cache, 0)
    pos = len(ids)
    for prev, depth in zip(res.tokens[:-1], res.exit_layers[1:]):
        h = model.embed(torch.tensor([[prev]]))
        for layer in range(depth):
            h = model.run_layers(h, layer, layer + 1, cache, pos)
        model.fill_kv(h, depth, L, cache, pos)
        pos += 1
    assert model.cache_lengths(g.last_cache) == model.cache_lengths(cache) == [pos] * L
    for i in range(L):
        assert torch.equal(g.last_cache.layers[i].keys, cache.layers[i].keys)
        assert torch.equal(g.last_cache.layers[i].values, cache.layers[i].values)


@pytest.mark.parametrize("name", list(NEVER))
def test_rules_that_never_fire_reproduce_autoregressive(model, twenty_prompts, name):
    ar = gen(model)
    g = gen(model, **NEVER[name])
    for text in twenty_prompts[5:7]:
        ref = run(model, ar, text, 12)
        got = run(model, g, text, 12)
        assert got.tokens == ref.tokens
        assert got.exit_layers == [model.num_layers] * len(got.tokens)


@pytest.mark.parametrize("kw", [
    dict(generation_strategy="self_speculative", exit_layer=6, num_speculations=3),
    dict(generation_strategy="self_speculative", exit_layer=6, num_speculations=3, sample=True, temperature=0.8),
    dict(generation_strategy="calm", min_exit_layer=4, threshold=0.5),
    dict(generation_strategy="calm", min_exit_layer=4, threshold=0.4, vocab_reduction="decaying", vocab_k=500),
    dict(generation_strategy="calm", min_exit_layer=6, threshold=0.2, confidence="contrastive",
         vocab_reduction="adaptive"),
    dict(generation_strategy="free", threshold=0.4),
    dict(generation_strategy="free", threshold=0.4, adaptive_threshold=True),
    dict(generation_strategy="free", threshold=0.3, confidence="jsd_contrastive", vocab_reduction="fixed"),
    dict(criteria="cosine_similarity", cosine_threshold=0.9),
    dict(criteria="token_repeat", token_repeats=2, min_exit_layer=10),
    dict(criteria="entropy_based", min_exit_layer=10, entropy_start=2.0, entropy_end=4.0),
    dict(criteria="max_probability", min_exit_layer=10, max_prob_start=0.5, max_prob_end=0.3),
    dict(criteria="convergence", min_exit_layer=10, convergence_delta=0.05),
])
def test_every_method_keeps_the_cache_hole_free(model, twenty_prompts, kw):
    """run_layers raises KVHoleError on any read over a missing position; the cache ends complete."""
    g = gen(model, **kw)
    ids = model.encode(twenty_prompts[8])
    try:
        res = g.generate(ids, StopCondition(model, 20, eos_ids=set()))
    except KVHoleError as e:  # pragma: no cover - the assertion message is the point
        pytest.fail(f"KV hole: {e}")
    n = len(ids) + len(res.tokens) - 1
    lengths = model.cache_lengths(g.last_cache)
    pending = getattr(g, "pending", 0)
    assert all(length in (n, n - pending) for length in lengths)
    assert len(res.exit_layers) == len(res.tokens)
    assert all(1 <= d <= model.num_layers for d in res.exit_layers)


def test_speculative_sampling_preserves_the_target_distribution():
    """Chi-square test: the first emitted token follows p whatever the draft distribution q is."""
    torch.manual_seed(0)
    rng = torch.Generator().manual_seed(1234)
    p = torch.tensor([[0.5, 0.2, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25], [0.1, 0.1, 0.1, 0.7]])
    q = torch.tensor([[0.1, 0.6, 0.1, 0.2], [0.7, 0.1, 0.1, 0.1]])
    trials, counts, accepted = 20000, torch.zeros(4), 0
    for _ in range(trials):
        drafts = [int(torch.multinomial(q[i], 1, generator=rng)) for i in range(2)]
        a, nxt = verify_sampling(drafts, q, p, rng)
        first = drafts[0] if a >= 1 else nxt
        counts[first] += 1
        accepted += a >= 1
    expected = p[0] * trials
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 16.27  # p = 0.001 critical value, 3 degrees of freedom
    # acceptance of the first draft is sum(min(p, q)) = 0.1 + 0.2 + 0.1 + 0.1 = 0.5
    assert abs(accepted / trials - 0.5) < 0.02


def test_beta_mixture_threshold_separates_agreeing_from_disagreeing():
    est = exits.BetaMixtureThreshold(initial=0.9, tolerance=0.1)
    g = torch.Generator().manual_seed(0)
    for c in torch.distributions.Beta(8.0, 2.0).sample((200,)).tolist():
        est.update(c, True)
    for c in torch.distributions.Beta(2.0, 6.0).sample((60,)).tolist():
        est.update(c, False)
    assert 0.3 < est.value < 0.8
    del g


def test_free_adaptive_threshold_moves_with_observed_pairs(model, twenty_prompts):
    g = gen(model, generation_strategy="free", threshold=0.5, adaptive_threshold=True, shallow_exit_layer=15)
    res = run(model, g, twenty_prompts[1], 40, eos=False)
    assert g.thresholds[0] == 0.5 and any(t != 0.5 for t in g.thresholds)
    # untrained shallow exits mostly disagree with the deep model, so the estimate must rise, not fall
    assert g.thresholds[-1] > 0.5 and res.exit_layers.count(15) > 0


def test_vocabulary_reduction_cuts_confidence_flops(model, twenty_prompts):
    full = run(model, gen(model, generation_strategy="calm", min_exit_layer=20, threshold=2.0), twenty_prompts[3], 8)
    red = run(model, gen(model, generation_strategy="calm", min_exit_layer=20, threshold=2.0,
                         vocab_reduction="fixed", vocab_k=1000), twenty_prompts[3], 8)
    assert red.tokens == full.tokens
    assert 0 < red.confidence_flops < full.confidence_flops / 5


@pytest.mark.parametrize("kw,match", [
    (dict(generation_strategy="self_speculative", exit_layer=8, num_speculations=0), "num_speculations must be >= 1"),
    (dict(generation_strategy="self_speculative", exit_layer=30), "below the model's 30 layers"),
    (dict(generation_strategy="self_speculative", exit_layer=31), "outside 1..30"),
    (dict(generation_strategy="self_speculative"), "needs --exit_layer"),
    (dict(generation_strategy="calm", criteria="entropy_based"), "--criteria applies to the dynamic"),
    (dict(generation_strategy="dynamic"), "dynamic needs --criteria"),
    (dict(generation_strategy="autoregressive", threshold=0.5), "--threshold applies to calm, free"),
    (dict(generation_strategy="calm", min_exit_layer=30), "outside 1..29"),
    (dict(generation_strategy="free", shallow_exit_layer=0), "outside 1..29"),
    (dict(generation_strategy="calm", exit_layer=8), "does not apply"),
    (dict(criteria="cosine_similarity", confidence="softmax"), "contrastive"),
])
def test_bad_combinations_are_usage_errors(model, kw, match):
    with pytest.raises(UsageError, match=match):
        gen(model, **kw)
