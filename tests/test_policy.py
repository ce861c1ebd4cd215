"""ConsistentEE: the `consistentee` recipe (REINFORCE exit policies) and the `policy` strategy, on the real model."""
from __future__ import annotations

import json

import pytest
import torch

from harness.config import GenerationConfig, UsageError
from harness.generators import StopCondition, build_generator
from harness.generators.consistentee import ExitPolicy, policies_from_tensors, policy_tensors
from harness.train import load_all, make_parser, split_args
from harness.train.common import TrainConfig
from harness.train.consistentee import (ConsistentEEOptions, exit_distribution, features, memorized_layer,
                                        reward_table, sample_trajectories)
from harness.trained_exits import ExitArtifact

LAYERS = [6, 8, 10]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread for this module: on a shared 2-core machine, oversubscribed threads make the layer loop
    10-20x slower; restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def small_cfg(tmp, **kw) -> TrainConfig:
    base = dict(recipe="consistentee", work_dir=str(tmp), seq_len=64, batch_size=2, steps=10, max_docs=50,
                eval_sequences=2, log_every=5, save_every=100, lr=1e-2, exit_layers="6,8,10", device="cpu")
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def trained(model, tmp_path_factory):
    """One short recipe run shared by the tests below: (artifact, its path, work dir)."""
    work = tmp_path_factory.mktemp("consistentee")
    cfg = small_cfg(work)
    recipes = load_all()
    art = recipes["consistentee"].run(cfg, ConsistentEEOptions(), model)
    return art, cfg.paths()[1], work


def forced_artifact(model, bias: float, layers=LAYERS, width: int = 8) -> ExitArtifact:
    """An artifact whose policies ignore the hidden state: pi = sigmoid(bias) at every layer (width 0: linear)."""
    pols = {}
    for layer in layers:
        p = ExitPolicy(model.hidden_size, width)
        with torch.no_grad():
            (p.fc2 if width else p.linear).bias.fill_(bias)
        pols[layer] = p
    return ExitArtifact(model=ExitArtifact.identity(model), tensors=policy_tensors(pols))


def generate(model, text, n=16, **kw):
    g = build_generator(model, GenerationConfig(**kw))
    return g, g.generate(model.encode(text), StopCondition(model, n, eos_ids=set()))


# -- the reward ----------------------------------------------------------------------------------------------------
def test_memorized_layer_is_the_earliest_depth_from_which_every_deeper_exit_is_correct():
    depths = torch.tensor([6, 8, 10, 30])
    correct = torch.tensor([[True, True, True, True],     # right everywhere: 6
                            [True, False, True, True],    # right at 6, wrong at 8, right after: 10
                            [False, False, False, True],  # only the last layer: 30
                            [False, True, True, True]])   # 8
    assert memorized_layer(correct, depths).tolist() == [6, 10, 30, 8]


def test_reward_penalizes_depth_less_for_hard_tokens():
    depths, L = torch.tensor([6, 30]), 30
    acc = torch.ones(2, 2)
    r = reward_table(acc, torch.tensor([6, 30]), depths, L, alpha=1.0, hardness=True, depth_cost="fraction")
    assert torch.allclose(r[0], torch.tensor([1 - 0.2 * 0.8, 1 - 1.0 * 0.8]))  # easy: depth costs
    assert torch.allclose(r[1], torch.ones(2))  # memorized at the last layer: depth is free
    plain = reward_table(acc, torch.tensor([6, 30]), depths, L, alpha=1.0, hardness=False, depth_cost="fraction")
    assert torch.allclose(plain[1], torch.tensor([1 - 0.2, 0.0]))


def test_reward_table_on_hand_computed_cases():
    depths, L = torch.tensor([6, 12, 30]), 30
    acc = torch.tensor([[1.0, 0.0, 1.0], [0.5, -2.0, -1.0]])
    memorized = torch.tensor([6, 30])
    # the reference's -loss - layers * alpha (the default): alpha per layer, no hardness
    ref = reward_table(acc, memorized, depths, L, alpha=0.01)
    assert torch.allclose(ref, torch.tensor([[0.94, -0.12, 0.70], [0.44, -2.12, -1.30]]))
    # ours, as shipped: alpha 2 on d/L, scaled by 1 - m/L (0.8 for m = 6, 0 for m = 30)
    ours = reward_table(acc, memorized, depths, L, alpha=2.0, hardness=True, depth_cost="fraction")
    assert torch.allclose(ours, torch.tensor([[0.68, -0.64, -0.60], [0.5, -2.0, -1.0]]))


def test_memorized_layer_over_every_layer_agrees_with_the_one_over_exits(model, real_prompts):
    rows = torch.tensor([model.encode(real_prompts[4])[:32]])
    ours = dict(consistentee_reward="correct", consistentee_depth_cost="fraction", consistentee_hardness=True,
                consistentee_alpha=1.0)
    f_exits = features(model, rows, LAYERS, ConsistentEEOptions(**ours))
    f_all = features(model, rows, LAYERS, ConsistentEEOptions(consistentee_memorized="all", **ours))
    L = model.num_layers
    assert torch.equal(f_exits.correct, f_all.correct) and f_exits.correct[:, -1].all()
    assert ((f_all.memorized >= 1) & (f_all.memorized <= L)).all()
    # every exit at or after the memorized layer (over all layers) is correct, so the one over exits is no deeper
    # than the first exit at or after it
    ceil = torch.tensor([next((d for d in LAYERS + [L] if d >= m), L) for m in f_all.memorized.tolist()])
    assert (f_exits.memorized <= ceil).all()
    assert (f_all.memorized < L).any()  # some token is settled before the last layer
    # leaving at L with alpha 1: 1 - 1 * (30/30) * (1 - m/30): 1.0 for a token memorized only at the last layer,
    # 0.2 for one memorized at layer 6, ...
    hand = {30: 1.0, 27: 0.9, 24: 0.8, 21: 0.7, 18: 0.6, 15: 0.5, 12: 0.4, 9: 0.3, 6: 0.2, 3: 0.1}
    seen = [(m, float(r)) for m, r in zip(f_all.memorized.tolist(), f_all.reward[:, -1]) if m in hand]
    assert seen and all(abs(r - hand[m]) < 1e-6 for m, r in seen), seen


def test_default_reward_is_the_references_minus_loss_minus_layers_times_alpha(model, real_prompts):
    """The default reward of leaving at layer d is -CE(next token) - alpha * d (ConsistentEE_LLM/llama/
    modeling_llama.py:1383): checked at the last layer against transformers' own forward and cross-entropy."""
    ids = model.encode(real_prompts[5])[:24]
    rows = torch.tensor([ids])
    f = features(model, rows, LAYERS, ConsistentEEOptions(consistentee_alpha=0.01))
    with torch.no_grad():
        logits = model.hf(input_ids=rows).logits[0, :-1].float()
    ce = torch.nn.functional.cross_entropy(logits, rows[0, 1:], reduction="none")
    assert f.reward.shape == (len(ids) - 1, len(LAYERS) + 1)  # the last position has no next token
    assert torch.allclose(f.reward[:, -1], -ce - 0.01 * 30, atol=1e-4)
    # an exit's reward differs from the last layer's by its CE difference and alpha * (30 - d)
    assert (f.reward[:, 0] + 0.01 * 6 <= 0).all()  # -CE is never positive


def test_sampled_trajectories_follow_the_exact_exit_distribution():
    z = torch.tensor([[0.3, -1.0, 2.0], [-3.0, 0.5, 0.0]])
    exact = exit_distribution(z)
    assert torch.allclose(exact.sum(-1), torch.ones(2))
    idx, logpi = sample_trajectories(z, 40000, torch.Generator().manual_seed(0))
    freq = torch.stack([(idx == k).float().mean(0) for k in range(4)], -1)
    assert torch.allclose(freq, exact, atol=0.01)
    # log pi of each sampled trajectory is the log of its probability under the exact distribution
    assert torch.allclose(logpi, exact.log().T.gather(0, idx), atol=1e-5)


# -- the recipe ----------------------------------------------------------------------------------------------------
def test_recipe_raises_expected_reward_on_held_out_rows_and_logs(trained):
    art, path, work = trained
    prov = art.provenance["consistentee"]
    before, after = prov["before_training"], prov["metrics"]
    assert after["eval_expected_reward"] > before["eval_expected_reward"] + 0.05, (before, after)
    # the reference's defaults: one Linear per exit, -loss - layers * alpha, K = 4
    assert prov["policy"] == "linear" and prov["hidden"] == 0 and prov["layers"] == LAYERS
    assert prov["reward"] == "log p_d(next token) - alpha * d" and prov["options"]["consistentee_samples"] == 4
    assert art.recommended["policy"] == {"policy_threshold": 0.5}
    assert sorted(art.tensors) == sorted(f"consistentee.{layer}.linear.{p}" for layer in LAYERS
                                         for p in ("weight", "bias"))
    assert art.tensors["consistentee.6.linear.weight"].shape == (1, 576)
    lines = [json.loads(x) for x in (work / "train_log.jsonl").read_text().splitlines()]
    assert len(lines) == 10
    for key in ("reward", "exit_rate", "mean_exit_layer", "exit_accuracy", "loss"):
        assert key in lines[0]
    assert "eval_expected_reward" in lines[4] and "eval_exit_accuracy" in lines[9]
    assert 6 <= lines[0]["mean_exit_layer"] <= 30 and 0 <= lines[0]["exit_rate"] <= 1


def test_artifact_round_trip_restores_identical_policy_outputs(model, trained):
    art, path, _ = trained
    loaded = ExitArtifact.load(path)
    a = policies_from_tensors(art.tensors, model.hidden_size)
    b = policies_from_tensors(loaded.tensors, model.hidden_size)
    assert sorted(a) == sorted(b) == LAYERS
    x = torch.randn(5, model.hidden_size, generator=torch.Generator().manual_seed(1))
    for layer in LAYERS:
        assert torch.equal(a[layer](x), b[layer](x))
    assert loaded.recommended == art.recommended
    assert all(p.width == 0 for p in b.values())  # the linear shape is read back from the tensor names


def test_recipe_options_are_on_the_cli():
    p = make_parser()
    ns = p.parse_args(["--recipe", "consistentee", "--consistentee_policy", "mlp", "--consistentee_hidden", "32",
                       "--consistentee_reward", "log_prob", "--consistentee_depth_cost", "fraction",
                       "--consistentee_hardness", "true", "--consistentee_samples", "8"])
    cfg, opts = split_args(ns, load_all()["consistentee"])
    assert (opts.consistentee_policy, opts.consistentee_hidden, opts.consistentee_reward) == ("mlp", 32, "log_prob")
    assert (opts.consistentee_depth_cost, opts.consistentee_hardness, opts.consistentee_samples) == ("fraction", True,
                                                                                                    8)
    ref = split_args(p.parse_args(["--recipe", "consistentee"]), load_all()["consistentee"])[1]
    assert (ref.consistentee_policy, ref.consistentee_reward, ref.consistentee_depth_cost, ref.consistentee_hardness,
            ref.consistentee_samples, ref.consistentee_alpha) == ("linear", "gold_log_prob", "layers", False, 4, 1e-5)


def test_mlp_policy_option_trains_our_shape(model, tmp_path):
    cfg = small_cfg(tmp_path, steps=2, log_every=2, eval_sequences=2)
    art = load_all()["consistentee"].run(cfg, ConsistentEEOptions(consistentee_policy="mlp", consistentee_hidden=16,
                                                                  consistentee_reward="correct"), model)
    assert sorted(art.tensors) == sorted(f"consistentee.{layer}.{p}" for layer in LAYERS
                                         for p in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"))
    assert art.provenance["consistentee"]["policy"] == "mlp" and art.provenance["consistentee"]["hidden"] == 16
    pols = policies_from_tensors(ExitArtifact.load(cfg.paths()[1]).tensors, model.hidden_size)
    assert {p.width for p in pols.values()} == {16}


def test_unknown_policy_tensors_are_a_usage_error(model):
    bad = {"consistentee.6.fc1.weight": torch.zeros(4, model.hidden_size)}  # fc2 missing
    with pytest.raises(UsageError, match="incomplete"):
        policies_from_tensors(bad, model.hidden_size)


# -- the strategy ----------------------------------------------------------------------------------------------------
def test_policy_generates_with_the_trained_artifact(model, trained, real_prompts):
    _, path, _ = trained
    model.set_exits(ExitArtifact.load(path))
    try:
        g, res = generate(model, real_prompts[0], 16, generation_strategy="policy")
        assert len(res.tokens) == 16 and res.stop_reason == "max_steps"
        assert set(res.exit_layers) <= {*LAYERS, model.num_layers}
        assert res.confidence_flops > 0
        assert g.knobs() == {"policy_threshold": 0.5, "policy_layers": LAYERS, "policy_hidden": 0}  # linear
        assert model.decode(res.tokens).strip()
    finally:
        model.set_exits(None)


def test_policies_that_always_continue_reproduce_autoregressive(model, real_prompts):
    model.set_exits(forced_artifact(model, -20.0))
    try:
        for text in real_prompts[5:7]:
            _, ref = generate(model, text, 16)
            g, got = generate(model, text, 16, generation_strategy="policy")
            assert got.tokens == ref.tokens
            assert got.exit_layers == [model.num_layers] * 16
            per_token = sum(p.flops() for p in g.policies.values())  # every policy asked, none fired
            assert got.confidence_flops == 15 * per_token
            assert got.exit_head_flops == ref.exit_head_flops + got.confidence_flops
    finally:
        model.set_exits(None)


def test_policies_that_always_exit_leave_at_the_first_policy_layer(model, real_prompts):
    model.set_exits(forced_artifact(model, 20.0))
    try:
        g, res = generate(model, real_prompts[1], 12, generation_strategy="policy")
        assert res.exit_layers == [model.num_layers] + [LAYERS[0]] * 11  # the first token comes from the prefill
        assert res.confidence_flops == 11 * g.policies[LAYERS[0]].flops()  # the picking head is not confidence
        assert res.layer_forwards == 11 * LAYERS[0]
        assert res.kv_fill_flops > 0  # skipped layers got state-copied K/V
    finally:
        model.set_exits(None)


def test_linear_policies_that_always_exit_leave_at_the_first_policy_layer(model, real_prompts):
    model.set_exits(forced_artifact(model, 20.0, width=0))
    try:
        g, res = generate(model, real_prompts[3], 8, generation_strategy="policy")
        assert res.exit_layers == [model.num_layers] + [LAYERS[0]] * 7
        assert g.policies[LAYERS[0]].flops() == 2 * model.hidden_size  # one Linear(hidden, 1)
        assert res.confidence_flops == 7 * 2 * model.hidden_size
    finally:
        model.set_exits(None)


def test_policy_threshold_decides(model, real_prompts):
    model.set_exits(forced_artifact(model, 0.0))  # pi = 0.5 exactly
    try:
        assert generate(model, real_prompts[2], 6, generation_strategy="policy", policy_threshold=0.4)[1] \
            .exit_layers[1:] == [LAYERS[0]] * 5
        assert generate(model, real_prompts[2], 6, generation_strategy="policy", policy_threshold=0.6)[1] \
            .exit_layers[1:] == [model.num_layers] * 5
        with pytest.raises(UsageError, match="policy_threshold"):
            generate(model, real_prompts[2], 6, generation_strategy="policy", policy_threshold=1.5)
    finally:
        model.set_exits(None)


def test_without_policy_networks_it_is_a_usage_error(model):
    assert model.exits is None
    with pytest.raises(UsageError, match="--recipe consistentee"):
        build_generator(model, GenerationConfig(generation_strategy="policy"))
    model.set_exits(ExitArtifact(model=ExitArtifact.identity(model)))  # an artifact without policies
    try:
        with pytest.raises(UsageError, match="--recipe consistentee"):
            build_generator(model, GenerationConfig(generation_strategy="policy"))
    finally:
        model.set_exits(None)
    with pytest.raises(UsageError, match="policy_threshold applies to policy"):
        build_generator(model, GenerationConfig(generation_strategy="calm", policy_threshold=0.7))
