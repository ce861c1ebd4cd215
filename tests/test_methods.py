"""Every decoding method on the real embedded model: losslessness, KV-cache contract, knobs, errors."""
from __future__ import annotations

import pytest
import torch

from harness import exit_rules
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
def real_mix():
    """14 real prompts: GSM8K questions, CNN/DM LM prefixes, HumanEval problems, XSum (short ones)."""
    exs = (load_examples("gsm8k", 5) + load_examples("cnn_dm_lm", 4) + load_examples("human_eval", 3)
           + sorted(load_examples("xsum_summarization", 40), key=lambda e: len(e.prompt))[:2])
    assert len(exs) == 14
    return [e.prompt for e in exs]


@pytest.mark.slow
def test_greedy_self_speculative_equals_autoregressive_on_14_real_prompts(model, real_mix):
    ar = gen(model)
    settings = [(4, 2), (8, 6), (15, 4), (24, 3), (28, 5)]
    drafted = accepted = 0
    for i, text in enumerate(real_mix):
        e, k = settings[i % len(settings)]
        ref = run(model, ar, text, 24)
        got = run(model, gen(model, generation_strategy="self_speculative", exit_layer=e, num_speculations=k), text, 24)
        assert got.tokens == ref.tokens, f"prompt {i} (E={e}, k={k})"
        assert got.exit_layers.count(model.num_layers) + got.exit_layers.count(e) == len(got.tokens)
        drafted += got.drafted
        accepted += got.accepted
    assert accepted >= 20  # untrained exits rarely agree, but the accept-and-crop path was exercised often


@torch.inference_mode()
def test_self_speculative_cache_equals_a_full_forward(model, real_mix):
    g = gen(model, generation_strategy="self_speculative", exit_layer=20, num_speculations=4)
    ids = model.encode(real_mix[0])
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
def test_free_parallel_pass_fills_deep_cache_exactly(model, real_mix):
    g = gen(model, generation_strategy="free", shallow_exit_layer=10, threshold=0.7)
    ids = model.encode(real_mix[0])
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
                                dict(criteria="cosine_similarity", cosine_threshold=0.5)])
@torch.inference_mode()
def test_state_copying_is_what_is_applied(model, real_mix, kw):
    """Replaying the recorded exits by hand (E layers, then fill_kv from the exited state) gives the same cache."""
    g = gen(model, **kw)
    ids = model.encode(real_mix[2])
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


def hand_kv(model, layer: int, h: torch.Tensor, pos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K/V of one position at one Llama layer from that layer's weights, without the core or transformers:
    RMSNorm(h) * weight, k/v projections, rotary embedding (split-half, theta from the config) on keys."""
    cfg, lay = model.config, model.layers[layer]
    hd = cfg.hidden_size // cfg.num_attention_heads
    x = h.reshape(-1).double()
    x = x * torch.rsqrt(x.pow(2).mean() + lay.input_layernorm.variance_epsilon) * lay.input_layernorm.weight.double()
    k = (lay.self_attn.k_proj.weight.double() @ x).view(-1, hd)
    v = (lay.self_attn.v_proj.weight.double() @ x).view(-1, hd)
    theta = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta") or cfg.rope_theta
    angles = pos / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    cos, sin = torch.cat([angles.cos(), angles.cos()]), torch.cat([angles.sin(), angles.sin()])
    k1, k2 = k[:, : hd // 2], k[:, hd // 2:]
    return k * cos + torch.cat([-k2, k1], dim=-1) * sin, v


@torch.inference_mode()
def test_state_copied_kv_equals_kv_recomputed_by_hand_from_the_layer_weights(model, real_mix):
    """Independent of fill_kv: every skipped layer of every exited position holds the K/V that the layer's
    own norm, k/v projections and rotary embedding give for the exited hidden state (CALM Sec. 3.3)."""
    assert model.config.model_type == "llama"
    g = gen(model, generation_strategy="calm", min_exit_layer=6, confidence="hidden_state", threshold=0.9)
    ids = model.encode(real_mix[2])
    res = g.generate(ids, StopCondition(model, 10, eos_ids=set()))
    L = model.num_layers
    exited = [(i, d) for i, d in enumerate(res.exit_layers[1:]) if d < L]
    assert len(exited) >= 3  # some tokens did exit early
    cache = model.new_cache()  # replay the recorded exits to get each exited hidden state
    model.run_layers(model.embed(torch.tensor([ids])), 0, L, cache, 0)
    for i, (prev, depth) in enumerate(zip(res.tokens[:-1], res.exit_layers[1:])):
        pos = len(ids) + i
        h = model.run_layers(model.embed(torch.tensor([[prev]])), 0, depth, cache, pos)
        for layer in range(depth, L):
            k, v = hand_kv(model, layer, h, pos)
            got = g.last_cache.layers[layer]
            assert torch.allclose(got.keys[0, :, pos].double(), k, atol=1e-4), (pos, layer)
            assert torch.allclose(got.values[0, :, pos].double(), v, atol=1e-4), (pos, layer)
            cache.update(k[None, :, None].float(), v[None, :, None].float(), layer)  # the replay goes on by hand


@torch.inference_mode()
def test_rotary_embeddings_are_computed_once_per_token_position(model, real_mix, monkeypatch):
    calls = []
    real = model._rotary
    monkeypatch.setattr(model, "_rotary", lambda h, pos: calls.append(pos.shape[-1]) or real(h, pos))
    res = run(model, gen(model, generation_strategy="calm", min_exit_layer=4, threshold=0.5), real_mix[8], 8)
    assert any(d < model.num_layers for d in res.exit_layers)
    assert len(calls) == len(res.tokens)  # the prefill, then one per decoded token (layers and state copying share it)


def test_confidence_flops_exclude_the_head_that_picks_the_token(model, real_mix):
    g = gen(model, generation_strategy="calm", min_exit_layer=4, threshold=0.5)
    res = run(model, g, real_mix[8], 10, eos=False)
    L, head = model.num_layers, model.head_flops(model.vocab_size)
    assert any(d < L for d in res.exit_layers[1:])
    # depths 4..e are evaluated; the one at e picks the token; a token at L is picked by the final head
    checks = sum((d - 4) if d < L else (L - 4) for d in res.exit_layers[1:])
    assert res.confidence_flops == checks * head
    assert res.exit_head_flops == (checks + len(res.tokens) - 1) * head


@pytest.mark.parametrize("name", list(NEVER))
def test_rules_that_never_fire_reproduce_autoregressive(model, real_mix, name):
    ar = gen(model)
    g = gen(model, **NEVER[name])
    for text in real_mix[5:7]:
        ref = run(model, ar, text, 12)
        got = run(model, g, text, 12)
        assert got.tokens == ref.tokens
        assert got.exit_layers == [model.num_layers] * len(got.tokens)


@pytest.mark.parametrize("kw", [
    dict(generation_strategy="self_speculative", exit_layer=6, num_speculations=3),
    dict(generation_strategy="self_speculative", exit_layer=6, num_speculations=3, sample=True, temperature=0.8),
    dict(generation_strategy="calm", min_exit_layer=4, threshold=0.5),
    dict(generation_strategy="calm", min_exit_layer=4, threshold=0.4, vocab_reduction="decaying", vocab_k=5000),
    dict(generation_strategy="calm", min_exit_layer=6, threshold=0.2, confidence="contrastive",
         vocab_reduction="adaptive"),
    dict(generation_strategy="free", threshold=0.4),
    dict(generation_strategy="free", threshold=0.4, adaptive_threshold=True),
    dict(generation_strategy="free", threshold=0.3, confidence="jsd_contrastive"),
    dict(criteria="cosine_similarity", cosine_threshold=0.5),
    dict(criteria="token_repeat", token_repeats=2, min_exit_layer=10),
    dict(criteria="entropy_based", min_exit_layer=10),
    dict(criteria="max_probability", min_exit_layer=10, max_prob_start=0.5, max_prob_end=0.3),
    dict(criteria="convergence", min_exit_layer=10, convergence_delta=0.05),
    dict(criteria="max_probability", min_exit_layer=10, max_prob_start=0.5, max_prob_end=0.3, exit_layer=16),
])
def test_every_method_keeps_the_cache_hole_free(model, real_mix, kw):
    """run_layers raises KVHoleError on any read over a missing position; the cache ends complete."""
    g = gen(model, **kw)
    ids = model.encode(real_mix[8])
    try:
        res = g.generate(ids, StopCondition(model, 20, eos_ids=set()))
    except KVHoleError as e:  # pragma: no cover - the assertion message is the point
        pytest.fail(f"KV hole: {e}")
    n = len(ids) + len(res.tokens) - 1
    lengths = model.cache_lengths(g.last_cache)
    pending = getattr(g, "pending", 0)
    assert all(length in (n, n - pending) for length in lengths)
    assert len(res.exit_layers) == len(res.tokens)
    cap = kw.get("exit_layer") if "criteria" in kw else None  # dynamic: --exit_layer caps the exit depth
    assert all(1 <= d <= (cap or model.num_layers) for d in res.exit_layers[1:])
    if kw.get("generation_strategy") == "self_speculative":
        assert res.drafted > 0 and res.accepted < res.drafted  # drafts were made and some were cropped
    else:
        assert any(d < model.num_layers for d in res.exit_layers[1:])  # exits did happen


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


def test_free_adaptive_threshold_refits_per_sequence_on_pairs_of_the_whole_run(model, real_mix):
    g = gen(model, generation_strategy="free", threshold=0.5, adaptive_threshold=True, shallow_exit_layer=15)
    for text in real_mix[1:4]:
        run(model, g, text, 12, eos=False)
    traj = g.threshold_trajectory
    assert [t["sequence"] for t in traj] == [0, 1, 2] and traj[0] == dict(sequence=0, pairs=0, agree=0, refit=False,
                                                                          threshold=0.5)
    assert traj[1]["refit"] and traj[2]["pairs"] > traj[1]["pairs"] > 0  # pairs accumulate across examples
    assert all(0.3 <= t["threshold"] <= 0.9 for t in traj)  # FREE's grid: never stuck at 1.0
    # every deep-processed token gives a pair, the current deep token too (below-threshold confidences)
    assert min(g.adaptive.confidences) < 0.5 and len(g.adaptive.confidences) >= 11
    assert traj[1]["threshold"] == exit_rules.bmm_threshold(g.adaptive.confidences[:traj[1]["pairs"]],
                                                       g.adaptive.agree[:traj[1]["pairs"]])
    g.reset_state()
    assert g.threshold_trajectory == [] and g.adaptive.confidences == []


def test_vocabulary_reduction_cuts_confidence_flops(model, real_mix):
    full = run(model, gen(model, generation_strategy="calm", min_exit_layer=20, threshold=2.0), real_mix[3], 8)
    red = run(model, gen(model, generation_strategy="calm", min_exit_layer=20, threshold=2.0,
                         vocab_reduction="fixed", vocab_k=1000), real_mix[3], 8)
    assert red.tokens == full.tokens
    assert 0 < red.confidence_flops < full.confidence_flops / 5


@pytest.mark.parametrize("mode", ["fixed", "decaying", "adaptive"])
@torch.inference_mode()
def test_vocabulary_reduction_exits_pick_the_right_token_ids(model, real_mix, mode):
    """Exits on reduced rows happen, and each emitted token is the argmax of the full head restricted to the
    rows the schedule keeps (a prefix of the first exit's ranking), i.e. row indices map back to vocabulary ids."""
    from harness.exit_rules import adaptive_k, decaying_k, softmax_margin

    g = gen(model, generation_strategy="calm", min_exit_layer=4, threshold=0.3, vocab_reduction=mode)
    ids = model.encode(real_mix[8])
    res = g.generate(ids, StopCondition(model, 12, eos_ids=set()))
    L, first = model.num_layers, 4
    assert sum(first < d < L for d in res.exit_layers[1:]) >= 2  # exits scored on reduced rows
    cache = model.new_cache()
    model.run_layers(model.embed(torch.tensor([ids])), 0, L, cache, 0)
    checked = 0
    for i, (prev, tok, depth) in enumerate(zip(res.tokens[:-1], res.tokens[1:], res.exit_layers[1:])):
        pos, h = len(ids) + i, model.embed(torch.tensor([[prev]]))
        states = []
        for layer in range(depth):
            h = model.run_layers(h, layer, layer + 1, cache, pos)
            states.append(h)
        model.fill_kv(h, depth, L, cache, pos)
        if not first < depth < L:
            continue
        full = [model.exit_logits(s).reshape(-1) for s in states]  # full[d - 1]: the full head at depth d
        ranking = full[first - 1].topk(min(model.vocab_size, decaying_k(first, L))).indices
        if mode == "adaptive":  # k from the previous layer's confidence, on the rows that layer was scored on
            rows_at = {first: None}
            for d in range(first + 1, depth + 1):
                prev = full[d - 2] if rows_at[d - 1] is None else full[d - 2][rows_at[d - 1]]
                c = softmax_margin(torch.softmax(prev, -1))
                rows_at[d] = ranking[:min(len(ranking), max(2, adaptive_k(model.vocab_size, c)))]
            rows = rows_at[depth]
        else:
            rows = ranking[:len(ranking) if mode == "fixed" else min(len(ranking), decaying_k(depth, L))]
        assert tok in rows.tolist() and tok == int(rows[full[depth - 1][rows].argmax()])
        checked += 1
    assert checked >= 2


@pytest.mark.parametrize("kw,match", [
    (dict(generation_strategy="self_speculative", exit_layer=8, num_speculations=0), "num_speculations must be >= 1"),
    (dict(generation_strategy="self_speculative", exit_layer=30), "below the model's 30 layers"),
    (dict(generation_strategy="self_speculative", exit_layer=31), "outside 1..30"),
    (dict(generation_strategy="self_speculative"), "needs --exit_layer"),
    (dict(generation_strategy="calm", criteria="entropy_based"), "--criteria applies to the dynamic"),
    (dict(generation_strategy="dynamic"), "dynamic needs --criteria"),
    (dict(generation_strategy="autoregressive", threshold=0.5), "--threshold applies to calm, free"),
    (dict(generation_strategy="calm", min_exit_layer=30), "outside 1..29"),
    (dict(generation_strategy="free", shallow_exit_layer=0), "--shallow_exit_layer must be >= 1"),
    (dict(generation_strategy="calm", exit_layer=8), "does not apply"),
    (dict(criteria="cosine_similarity", confidence="softmax"), "contrastive"),
    (dict(criteria="token_repeat", confidence="contrastive"), "max_probability, entropy_based or convergence"),
    (dict(generation_strategy="calm", vocab_k=500), "--vocab_k applies only with --vocab_reduction fixed"),
    (dict(generation_strategy="calm", vocab_reduction="adaptive", vocab_k=500), "--vocab_k applies only"),
    (dict(generation_strategy="calm", contrastive_alpha=0.2), "--contrastive_alpha applies only"),
    (dict(generation_strategy="free", adaptive_tolerance=0.2), "--adaptive_tolerance applies only"),
    (dict(generation_strategy="free", adaptive_threshold=True, adaptive_tolerance=0.2), "adaptive_estimator posterior"),
    (dict(generation_strategy="free", adaptive_estimator="posterior"), "--adaptive_estimator applies only"),
    (dict(generation_strategy="free", vocab_reduction="fixed"), "--vocab_reduction applies to calm, dynamic"),
    (dict(generation_strategy="free", confidence="jsd_contrastive", shallow_exit_layer=2), "shallow_exit_layer >= 3"),
    (dict(generation_strategy="calm", threshold_decay_form="free_code"), "--threshold_decay_form applies only"),
    (dict(generation_strategy="calm", confidence="hidden_state", vocab_reduction="fixed"), "exit head"),
    (dict(criteria="cosine_similarity", vocab_reduction="fixed"), "exit head"),
    (dict(criteria="token_repeat", cosine_threshold=0.9), "--cosine_threshold applies only"),
    (dict(criteria="max_probability", entropy_start=3.0), "--entropy_start applies only"),
    (dict(criteria="entropy_based", confidence="contrastive", entropy_temperature=1.0), "--entropy_temperature"),
])
def test_bad_combinations_are_usage_errors(model, kw, match):
    with pytest.raises(UsageError, match=match):
        gen(model, **kw)
