"""ConsistentEE: the `consistentee` recipe (REINFORCE exit policies) and the `policy` strategy, on the real model."""
from __future__ import annotations

import json

import pytest
import torch

from harness.config import GenerationConfig, UsageError
from harness.generators import StopCondition, build_generator
from harness.generators.policy import ExitPolicy, policies_from_tensors, policy_tensors
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


def forced_artifact(model, bias: float, layers=LAYERS) -> ExitArtifact:
    """An artifact whose policies ignore the hidden state: pi = sigmoid(bias) at every layer."""
    pols = {}
    for layer in layers:
        p = ExitPolicy(model.hidden_size, 8)
        with torch.no_grad():
            p.fc2.bias.fill_(bias)
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
    r = reward_table(acc, torch.tensor([6, 30]), depths, L, alpha=1.0)
    assert torch.allclose(r[0], torch.tensor([1 - 0.2 * 0.8, 1 - 1.0 * 0.8]))  # easy: depth costs
    assert torch.allclose(r[1], torch.ones(2))  # memorized at the last layer: depth is free
    plain = reward_table(acc, torch.tensor([6, 30]), depths, L, alpha=1.0, hardness=False)
    assert torch.allclose(plain[1], torch.tensor([1 - 0.2, 0.0]))


def test_memorized_layer_over_every_layer_agrees_with_the_one_over_exits(model, real_prompts):
    rows = torch.tensor([model.encode(real_prompts[4])[:32]])
    f_exits = features(model, rows, LAYERS, ConsistentEEOptions())
    f_all = features(model, rows, LAYERS, ConsistentEEOptions(consistentee_memorized="all"))
    L = model.num_layers
    assert torch.equal(f_exits.correct, f_all.correct) and f_exits.correct[:, -1].all()
    assert ((f_all.memorized >= 1) & (f_all.memorized <= L)).all()
    # every exit at or after the memorized layer (over all layers) is correct, so the one over exits is no deeper
    # than the first exit at or after it
    ceil = torch.tensor([next((d for d in LAYERS + [L] if d >= m), L) for m in f_all.memorized.tolist()])
    assert (f_exits.memorized <= ceil).all()
    assert (f_all.memorized < L).any()  # some token is settled before the last layer
    # reward of leaving at L: 1 - alpha * (1 - m/L) for the default `correct` reward
    assert torch.allclose(f_all.reward[:, -1], 1 - (1 - f_all.memorized.float() / L))


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
    assert prov["hidden"] == 64 and prov["layers"] == LAYERS
    assert art.recommended["policy"] == {"policy_threshold": 0.5}
    assert sorted(art.tensors) == sorted(f"consistentee.{layer}.{p}" for layer in LAYERS
                                         for p in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"))
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
    assert loaded.provenance["consistentee"]["hidden"] == 64


def test_recipe_options_are_on_the_cli():
    p = make_parser()
    ns = p.parse_args(["--recipe", "consistentee", "--consistentee_hidden", "32", "--consistentee_reward", "log_prob",
                       "--consistentee_hardness", "false"])
    cfg, opts = split_args(ns, load_all()["consistentee"])
    assert (opts.consistentee_hidden, opts.consistentee_reward, opts.consistentee_hardness) == (32, "log_prob", False)


# -- the strategy ----------------------------------------------------------------------------------------------------
def test_policy_generates_with_the_trained_artifact(model, trained, real_prompts):
    _, path, _ = trained
    model.set_exits(ExitArtifact.load(path))
    try:
        g, res = generate(model, real_prompts[0], 16, generation_strategy="policy")
        assert len(res.tokens) == 16 and res.stop_reason == "max_steps"
        assert set(res.exit_layers) <= {*LAYERS, model.num_layers}
        assert res.confidence_flops > 0
        assert g.knobs() == {"policy_threshold": 0.5, "policy_layers": LAYERS, "policy_hidden": 64}
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
