"""--recipe layerskip: torchtune's and the paper's schedules, the training forward, a few real training steps (CPU)."""
from __future__ import annotations

import math
import shutil

import pytest
import torch

from harness.config import UsageError
from harness.train.common import TrainConfig, hidden_states
from harness.train.layerskip import (LayerSkipOptions, dropout_probs, exits_on, loss_scales, run_trunk,
                                     sample_skips, speculative_speedup, train_layerskip)
from harness.trained_exits import ExitArtifact


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """On this 2-core machine, shared with other jobs, 2 intra-op threads made these steps ~30x slower (244 s vs
    8 s for the LoRA run); one thread is fast and deterministic. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small_cfg(tmp_path, **kw) -> TrainConfig:
    base = dict(recipe="layerskip", work_dir=str(tmp_path / "work"), data="gsm8k_train", max_docs=50, seq_len=64,
                batch_size=2, steps=8, lr=5e-3, eval_sequences=2, exit_layers="8,20", log_every=1000,
                save_every=1000, device="cpu", seed=0)
    base.update(kw)
    return TrainConfig(**base)


# -- schedules -------------------------------------------------------------------------------------------
def test_dropout_schedule_rises_with_depth_to_p_max():
    L, p = 30, 0.2
    exp = dropout_probs(L, p, layer_scale="exp")
    assert exp[0] == 0.0 and exp[-1] == pytest.approx(p)
    assert all(a < b for a, b in zip(exp, exp[1:]))
    assert exp[10] == pytest.approx(p * (math.exp(10 * math.log(2) / (L - 1)) - 1))
    lin = dropout_probs(L, p, layer_scale="linear")
    assert lin[15] == pytest.approx(p * 15 / 29)
    # over time: constant S(t) = 1; exp S(t) goes 0 -> 1 over the run
    assert dropout_probs(L, p, step=0, steps=100, time_scale="constant")[-1] == pytest.approx(p)
    assert dropout_probs(L, p, step=0, steps=100, time_scale="exp")[-1] == 0.0
    assert dropout_probs(L, p, step=99, steps=100, time_scale="exp")[-1] == pytest.approx(p)
    assert dropout_probs(L, p, step=50, steps=100, time_scale="exp")[-1] < p / 2 + 1e-9


def test_sampled_skips_follow_the_configured_probabilities():
    probs = dropout_probs(8, 0.5, layer_scale="linear")  # 0, 1/14, ..., 0.5
    n = 20000
    skips = sample_skips(probs, n, torch.Generator().manual_seed(0))
    assert skips.shape == (8, n)
    freq = skips.double().mean(1)
    for f, p in zip(freq.tolist(), probs):
        assert abs(f - p) < 4 * math.sqrt(p * (1 - p) / n) + 1e-9, (f, p)
    assert not skips[0].any()  # the first layer is never dropped


def test_curricula_and_loss_scales():
    L = 12
    for t in range(8):  # rotational: every R-th exit, rotating; the last layer always on
        on = exits_on(L, t, 8, "rotational", every=4)
        assert on[-1] and [l for l in range(L - 1) if on[l]] == [l for l in range(L - 1) if l % 4 == t % 4]
    g = [exits_on(L, t, 100, "gradual", every=1) for t in (0, 25, 50, 51, 99)]
    assert sum(g[0]) == 1 and g[0][-1]  # only the last layer at the start
    assert sum(g[0]) < sum(g[1]) < sum(g[2]) < sum(g[3]) == L == sum(g[4])  # all on from T/2 + 1
    assert g[1] == sorted(g[1])  # switched on from the last layer toward the first
    w = loss_scales([True] * L, e_scale=1.0, kind="paper")
    assert sum(w) == pytest.approx(1.0)
    e = [l * (l + 1) / 2 for l in range(L - 1)] + [(L - 1) + (L - 2) * (L - 1) / 2]  # e(l), e_scale = 1
    assert w == pytest.approx([x / sum(e) for x in e])
    for kind in ("paper", "linear_l", "sum_l"):
        only_last = loss_scales([False] * (L - 1) + [True], e_scale=0.5, kind=kind)
        assert only_last[-1] == pytest.approx(1.0)
        assert loss_scales([True] * L, e_scale=0.0, kind=kind) == pytest.approx([0.0] * (L - 1) + [1.0])


def test_torchtune_schedules_on_hand_computed_cases():
    """torchtune's curricula and loss scales (recipes/dev/7B_full_early_exit.yaml, modules/early_exit_loss.py),
    worked out by hand for L = 10 layers, T = 20 steps, early_exit_loss.layers "0::4" = layers 0, 4, 8 (+ 9)."""
    L, T = 10, 20

    def on(t, kind):
        return [l for l, c in enumerate(exits_on(L, t, T, kind, every=4)) if c]

    assert on(0, "none") == on(7, "none") == [0, 4, 8, 9]
    # rotational: np.roll of [0, 4, 8] over 10 layers, one step at a time: 8 + 2 wraps to 0
    assert on(0, "rotational") == [0, 4, 8, 9]
    assert on(1, "rotational") == [1, 5, 9]
    assert on(2, "rotational") == [0, 2, 6, 9]
    assert on(3, "rotational") == [1, 3, 7, 9]
    # gradual: layer l on at step t once (t-1)/20 >= 0.5 (10-l)/10: layer 8 from t = 3, 4 from t = 7, 0 from t = 11
    assert on(0, "gradual") == on(2, "gradual") == [9]
    assert on(3, "gradual") == on(6, "gradual") == [8, 9]
    assert on(7, "gradual") == on(10, "gradual") == [4, 8, 9]
    assert on(11, "gradual") == on(19, "gradual") == [0, 4, 8, 9]
    mask = [l in (0, 4, 8, 9) for l in range(L)]
    # linear_l: l + 1 = 1, 5, 9 and 10 for the last (not scaled by e_scale): sum 25; with e_scale 0.5: 7.5 + 10
    assert loss_scales(mask, 1.0, "linear_l") == pytest.approx(
        [1 / 25, 0, 0, 0, 5 / 25, 0, 0, 0, 9 / 25, 10 / 25])
    assert loss_scales(mask, 0.5, "linear_l") == pytest.approx(
        [0.5 / 17.5, 0, 0, 0, 2.5 / 17.5, 0, 0, 0, 4.5 / 17.5, 10 / 17.5])
    # sum_l: running sums 1, 6, 15, 25: total 47
    assert loss_scales(mask, 1.0, "sum_l") == pytest.approx(
        [1 / 47, 0, 0, 0, 6 / 47, 0, 0, 0, 15 / 47, 25 / 47])


def test_defaults_are_torchtunes_layerskip_settings():
    o = LayerSkipOptions()
    assert (o.layerskip_curriculum, o.layerskip_loss_scale, o.layerskip_loss_every) == ("gradual", "linear_l", 4)
    assert (o.layerskip_dropout_max, o.layerskip_dropout_layer_scale, o.layerskip_early_exit_scale) == (0.2, "exp",
                                                                                                        1.0)
    assert o.layerskip_dropout_time_scale == "constant"


def test_speedup_estimate():
    assert speculative_speedup(0.0, 8, 32, 6) < 1.0
    assert speculative_speedup(1.0, 8, 32, 6) == pytest.approx(7 * 32 / (6 * 8 + 32))
    assert speculative_speedup(0.9, 8, 32, 6) > speculative_speedup(0.9, 16, 32, 6)


# -- the training forward ----------------------------------------------------------------------------------
def test_training_forward_matches_the_model_and_skips_per_sequence(model):
    ids = torch.tensor([model.encode("The quick brown fox jumps over the lazy dog.")[:10]] * 2)
    with torch.no_grad():
        hs = run_trunk(model.hf, ids)
        ref = hidden_states(model, ids)  # transformers' own forward: embeddings, layers 1..L-1, normed last
        assert len(hs) == model.num_layers
        assert torch.equal(hs[4], ref[5])
        assert torch.allclose(model.hf.model.norm(hs[-1]), ref[-1], atol=1e-5)
        skip = torch.zeros(model.num_layers, 2, dtype=torch.bool)
        skip[3, 0] = True  # layer 4 (index 3) skipped for sequence 0 only
        hs2 = run_trunk(model.hf, ids, skip)
        assert torch.equal(hs2[3][0], hs2[2][0])  # passed through unchanged
        assert torch.allclose(hs2[-1][1], hs[-1][1], rtol=1e-4, atol=1e-3)  # sequence 1 ran every layer
        assert not torch.allclose(hs2[-1][0], hs[-1][0], atol=1e-3)


# -- real training steps --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lora_run(model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("layerskip")
    w = {n: p.detach().clone() for n, p in model.hf.named_parameters()
         if n.endswith(("layers.3.self_attn.q_proj.weight", "layers.20.mlp.down_proj.weight", "norm.weight"))}
    cfg = small_cfg(tmp)
    art = train_layerskip(cfg, LayerSkipOptions(layerskip_lora_rank=4, layerskip_curriculum="rotational",
                                                layerskip_loss_every=15, layerskip_dropout_max=0.2), model)
    yield cfg, art, w
    shutil.rmtree(tmp, ignore_errors=True)  # a 540 MB model: not left behind in pytest's kept tmp dirs


def test_lora_training_lowers_the_held_out_exit_loss(lora_run):
    _, art, _ = lora_run
    prov = art.provenance["layerskip"]
    before, after = prov["metrics_before"], prov["metrics"]
    assert before["final_layer_agreement_with_original"] == 1.0  # the untrained copy is the original
    assert after["exit_loss"] < before["exit_loss"] - 0.02, (before["exit_loss"], after["exit_loss"])
    assert prov["trainable_parameters"] < 5_000_000  # LoRA only


def test_the_callers_model_is_unchanged(model, lora_run):
    _, _, w = lora_run
    params = dict(model.hf.named_parameters())
    assert w and all(torch.equal(params[n], v) for n, v in w.items())
    assert type(model.hf.model.layers[3].self_attn.q_proj) is torch.nn.Linear  # no LoRA injected
    assert model.exits is None


def test_saved_model_loads_and_the_artifact_is_for_it(model, lora_run):
    from harness.model import load_model

    cfg, art, _ = lora_run
    work, out = cfg.paths()
    m = art.provenance["layerskip"]["metrics"]
    agree = m["final_layer_agreement_with_original"]
    assert isinstance(agree, float) and 0.0 <= agree <= 1.0
    assert all(0.0 <= m[f"agreement@{d}"] <= 1.0 for d in (8, 20))
    assert art.recommended["self_speculative"]["exit_layer"] in (8, 20)
    loaded_art = ExitArtifact.load(out)
    assert loaded_art.recommended == art.recommended and loaded_art.provenance == art.provenance
    new = load_model(str(work / "model"), "cpu", "float32", exits=str(out))  # attach refuses a mismatch
    assert new.exits is not None and loaded_art.matches(new) is None
    assert loaded_art.matches(model) is not None  # not the original model's artifact
    a = dict(new.hf.named_parameters())["model.layers.3.self_attn.q_proj.weight"]
    b = dict(model.hf.named_parameters())["model.layers.3.self_attn.q_proj.weight"]
    assert not torch.equal(a, b)  # LoRA was merged into the saved weights
    assert type(new.hf.model.layers[3].self_attn.q_proj) is torch.nn.Linear
    # the saved (merged) model is the model that was measured: same held-out metrics, up to merge rounding
    from harness.train.common import train_eval_split
    from harness.train.layerskip import measure

    _, rows = train_eval_split(cfg, model.tokenizer)
    _, original = measure(model.hf, rows, [8, 20], 1.0)
    again, _ = measure(new.hf, rows, [8, 20], 1.0, reference=original)  # the recipe's default scale, linear_l
    tol = 2 / original.numel()  # at most a near-tie token or two may flip
    for key in ("final_layer_agreement_with_original", "agreement@8", "agreement@20"):
        assert abs(again[key] - m[key]) <= tol, key
    assert again["exit_loss"] == pytest.approx(m["exit_loss"], rel=1e-3)


def test_checkpoint_holds_only_the_trainable_parameters():
    from harness.train.layerskip import _Trainable

    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    net[0].requires_grad_(False)
    t = _Trainable(net)
    sd = {k: v.clone() for k, v in t.state_dict().items()}
    assert set(sd) == {"1.weight", "1.bias"}  # the frozen base is not checkpointed
    frozen = net[0].weight.clone()
    with torch.no_grad():
        net[1].weight.add_(1.0)
        net[0].weight.add_(1.0)
    t.load_state_dict(sd)  # what Loop does on resume
    assert torch.equal(net[1].weight, sd["1.weight"]) and torch.equal(net[0].weight, frozen + 1.0)
    with pytest.raises(UsageError):
        t.load_state_dict({"0.weight": frozen})  # another LoRA rank / full fine-tuning: refused


def test_restart_resumes_from_the_checkpoint(model, lora_run):
    cfg, art, _ = lora_run  # the run is finished: a restart loads the LoRA state and trains no further
    again = train_layerskip(cfg, LayerSkipOptions(layerskip_lora_rank=4, layerskip_curriculum="rotational",
                                                  layerskip_loss_every=15, layerskip_dropout_max=0.2), model)
    assert again.provenance["layerskip"]["metrics"] == art.provenance["layerskip"]["metrics"]
    assert again.model["fingerprint"] == art.model["fingerprint"]
    with pytest.raises(UsageError):  # a checkpoint of another LoRA rank is refused, not half-loaded
        train_layerskip(cfg, LayerSkipOptions(layerskip_lora_rank=2), model)


def test_full_fine_tuning(model, tmp_path):
    cfg = small_cfg(tmp_path, steps=1, lr=1e-5, seq_len=32, exit_layers="10")
    w = model.hf.model.layers[0].mlp.up_proj.weight.detach().clone()
    opts = LayerSkipOptions(layerskip_lora_rank=0, layerskip_loss_every=30, layerskip_curriculum="gradual")
    art = train_layerskip(cfg, opts, model)
    assert torch.equal(model.hf.model.layers[0].mlp.up_proj.weight, w)
    prov = art.provenance["layerskip"]
    assert prov["trainable_parameters"] > 100_000_000 and prov["lr"] == 1e-5
    assert art.recommended["self_speculative"] == {"exit_layer": 10}
    work, _ = cfg.paths()
    assert (work / "model" / "config.json").is_file() and (work / "checkpoint.pt").is_file()
    shutil.rmtree(work, ignore_errors=True)  # 2 GB of model + optimizer checkpoint
