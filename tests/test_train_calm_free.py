"""Recipes `calm` and `free` (frozen trunk, exit adapters) and CALM's trained classifier as --confidence classifier.

Small real runs on the embedded model (seq_len 64, batch 2, 8 steps, 50 documents per source): the losses on the
fixed held-out rows must go down, the artifact must round-trip exactly and act only where it was trained, and the
classifier must drive decoding end to end.
"""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from harness.config import GenerationConfig, UsageError
from harness.generators import StopCondition, build_generator
from harness.train.calm import (
    CalmOptions,
    classifier_bce,
    classifier_heads,
    exit_adapters,
    heldout,
    teacher,
    train_calm,
    weighted_ce,
)
from harness.train.common import TrainConfig, hidden_states, train_eval_split
from harness.train.free import FreeOptions, free_loss, train_free
from harness.trained_exits import ExitArtifact

CALM_LAYERS = [2, 4]
FREE_S = 4


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tests run many small ops; on a shared 2-core machine one intra-op thread is several times faster
    (spinning OpenMP workers lose to other processes). Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small_cfg(tmp, recipe: str, **kw) -> TrainConfig:
    base = {"recipe": recipe, "work_dir": str(tmp / "work"), "output": str(tmp / "exits.safetensors"),
            "seq_len": 64, "batch_size": 2, "steps": 8, "max_docs": 50, "eval_sequences": 2, "log_every": 4,
            "save_every": 4, "lr": 2e-2, "seed": 0}
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def calm_run(model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("calm")
    cfg = small_cfg(tmp, "calm", exit_layers=",".join(map(str, CALM_LAYERS)))
    opts = CalmOptions(calm_adapter_width=64, calm_classifier_steps=6, calm_classifier_lr=1e-2)
    torch.manual_seed(0)
    art = train_calm(cfg, opts, model)
    assert model.exits is None  # the caller's exits (none) are back
    return cfg, opts, art


@pytest.fixture(scope="module")
def free_run(model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("free")
    cfg = small_cfg(tmp, "free", exit_layers="6")
    opts = FreeOptions(free_shallow_exit_layer=FREE_S, free_adapter_width=64)
    torch.manual_seed(0)
    art = train_free(cfg, opts, model)
    assert model.exits is None
    return cfg, opts, art


def eval_rows(cfg, model):
    return train_eval_split(cfg, model.tokenizer)[1]


def attached(model, art):
    """Context: `art` attached to the shared model, none afterwards."""
    class _Ctx:
        def __enter__(self):
            model.set_exits(art)

        def __exit__(self, *exc):
            model.set_exits(None)
    return _Ctx()


# -- the teacher ---------------------------------------------------------------------------------------------
def test_truncated_teacher_matches_the_full_forward(model):
    ids = torch.tensor([model.encode("The quick brown fox jumps over the lazy dog. " * 3)[:24]] * 2)
    full = hidden_states(model, ids)
    part = teacher(model, ids, upto=4)
    assert len(part) == 5
    for d in range(5):
        torch.testing.assert_close(part[d], full[d], atol=1e-4, rtol=1e-4)


# -- calm ----------------------------------------------------------------------------------------------------
def test_calm_lowers_weighted_ce_and_classifier_bce_on_heldout_rows(calm_run, model):
    cfg, opts, art = calm_run
    rows = eval_rows(cfg, model)
    fresh = exit_adapters(model, ExitArtifact(model={}), CALM_LAYERS, opts.calm_adapter_width)  # untrained exits
    trained = exit_adapters(model, art, CALM_LAYERS, opts.calm_adapter_width)
    before = heldout(model, rows, lambda ids, hs: {"loss": weighted_ce(model, fresh, ids, hs)[0]})["loss"]
    after = heldout(model, rows, lambda ids, hs: {"loss": weighted_ce(model, trained, ids, hs)[0]})["loss"]
    assert after < before - 1.0, (before, after)
    assert art.provenance["calm"]["metrics"]["adapters"]["eval_loss"] == pytest.approx(after, rel=1e-4)

    zero = classifier_heads(model, CALM_LAYERS)  # the classifier's starting point: confidence 0.5 everywhere
    heads = classifier_heads(model, CALM_LAYERS)
    for d in CALM_LAYERS:
        heads[str(d)].weight.data.copy_(art.tensors[f"calm.classifier.{d}.weight"])
        heads[str(d)].bias.data.copy_(art.tensors[f"calm.classifier.{d}.bias"])
    bce0 = heldout(model, rows, lambda ids, hs: {"b": classifier_bce(model, trained, zero, ids, hs)[0]})["b"]
    bce1 = heldout(model, rows, lambda ids, hs: {"b": classifier_bce(model, trained, heads, ids, hs)[0]})["b"]
    assert bce0 == pytest.approx(0.6931, abs=1e-3)
    assert bce1 < bce0 - 0.02, (bce0, bce1)
    # both phases logged their loss and agreement
    work = cfg.paths()[0]
    lines = [json.loads(x) for x in (work / "train_log.jsonl").read_text().splitlines()]
    assert len(lines) == cfg.steps and f"agreement@{CALM_LAYERS[0]}" in lines[-1]
    clf_lines = (work / "classifier" / "train_log.jsonl").read_text().splitlines()
    assert len(clf_lines) == opts.calm_classifier_steps and "eval_bce" in json.loads(clf_lines[-1])


def test_calm_artifact_round_trips_and_acts_only_at_trained_exits(calm_run, model):
    cfg, opts, art = calm_run
    back = ExitArtifact.load(cfg.paths()[1])
    assert sorted(back.adapters) == CALM_LAYERS and back.adapter_width == opts.calm_adapter_width
    for d in CALM_LAYERS:
        for k, v in art.adapters[d].items():
            assert torch.equal(back.adapters[d][k], v)
        for name in ("weight", "bias"):
            key = f"calm.classifier.{d}.{name}"
            assert torch.equal(back.tensors[key], art.tensors[key])
    assert back.tensors[f"calm.classifier.{CALM_LAYERS[0]}.weight"].shape == (1, model.hidden_size)
    assert back.provenance["calm"]["classifier"] == "per exit layer"
    ids = eval_rows(cfg, model)[:1, :32]
    with torch.no_grad():
        hs = hidden_states(model, ids)
        plain_exit = model.exit_logits(hs[CALM_LAYERS[0]], layer=CALM_LAYERS[0])
        plain_last = model.exit_logits(hs[-1], layer=model.num_layers)
        with attached(model, back):
            exit_now = model.exit_logits(hs[CALM_LAYERS[0]], layer=CALM_LAYERS[0])
            last_now = model.exit_logits(hs[-1], layer=model.num_layers)
            other = model.exit_logits(hs[3], layer=3)  # no adapter at 3
        assert not torch.allclose(exit_now, plain_exit, atol=1e-3)
        assert torch.equal(last_now, plain_last)
        assert torch.equal(other, model.exit_logits(hs[3], layer=3))


def test_calm_resumes_from_its_checkpoints_without_training_again(calm_run, model):
    cfg, opts, art = calm_run
    work = cfg.paths()[0]
    n_lines = len((work / "train_log.jsonl").read_text().splitlines())
    again = train_calm(dataclasses.replace(cfg, output=str(work / "again.safetensors")), opts, model)
    assert len((work / "train_log.jsonl").read_text().splitlines()) == n_lines  # no new steps
    for d in CALM_LAYERS:
        for k, v in art.adapters[d].items():
            assert torch.equal(again.adapters[d][k], v)
        assert torch.equal(again.tensors[f"calm.classifier.{d}.weight"], art.tensors[f"calm.classifier.{d}.weight"])


def _prompt(model, real_prompts):
    return model.encode(real_prompts[0])[:48]  # a real prompt, kept short: prefill is not what is tested


def _decode(model, real_prompts, n=10, **kw):
    g = build_generator(model, GenerationConfig(generation_strategy="calm", **kw))
    return g, g.generate(_prompt(model, real_prompts), StopCondition(model, n, eos_ids=set()))


def test_calm_classifier_confidence_decodes_end_to_end(calm_run, model, real_prompts):
    _, _, art = calm_run
    L = model.num_layers
    with attached(model, art):
        g, res = _decode(model, real_prompts, confidence="classifier", threshold=0.3)
        assert g.knobs()["classifier_layers"] == CALM_LAYERS
        assert len(res.tokens) == 10 and all(d in (*CALM_LAYERS, L) for d in res.exit_layers[1:])
        # every check costs one dot product; no exit head is evaluated only to decide
        checks = sum(sum(1 for c in CALM_LAYERS if c <= d) for d in res.exit_layers[1:])
        assert res.confidence_flops == 2 * model.hidden_size * checks
        # a threshold the classifier cannot beat reproduces autoregressive decoding
        _, never = _decode(model, real_prompts, confidence="classifier", threshold=1.0)
        ar = build_generator(model, GenerationConfig()).generate(_prompt(model, real_prompts),
                                                                 StopCondition(model, 10, eos_ids=set()))
        assert never.tokens == ar.tokens and set(never.exit_layers) == {L}


def test_huge_classifier_bias_exits_every_token_at_the_first_classifier_depth(calm_run, model, real_prompts):
    _, _, art = calm_run
    L, first = model.num_layers, CALM_LAYERS[0]
    for bias, expect in ((1e4, first), (-1e4, L)):
        tensors = dict(art.tensors)
        for d in CALM_LAYERS:
            tensors[f"calm.classifier.{d}.bias"] = torch.tensor([bias])
        forced = dataclasses.replace(art, tensors=tensors)
        with attached(model, forced):
            _, res = _decode(model, real_prompts, n=8, confidence="classifier")
        assert res.exit_layers[0] == L  # the prefill token
        assert res.exit_layers[1:] == [expect] * 7, (bias, res.exit_layers)


def test_classifier_confidence_is_refused_without_a_classifier(model, free_run):
    model.set_exits(None)
    with pytest.raises(UsageError, match="harness.train --recipe calm"):
        build_generator(model, GenerationConfig(generation_strategy="calm", confidence="classifier"))
    _, _, free_art = free_run  # adapters, but no classifier
    with attached(model, free_art), pytest.raises(UsageError, match="no CALM classifier"):
        build_generator(model, GenerationConfig(generation_strategy="calm", confidence="classifier"))
    with pytest.raises(UsageError, match="as classifier only with calm"):
        build_generator(model, GenerationConfig(generation_strategy="free", confidence="classifier"))
    with pytest.raises(UsageError, match="exit head"):
        build_generator(model, GenerationConfig(generation_strategy="calm", confidence="classifier",
                                                vocab_reduction="fixed"))


# -- free ----------------------------------------------------------------------------------------------------
def test_free_lowers_its_loss_on_heldout_rows_and_recommends_its_shallow_exit(free_run, model):
    cfg, opts, art = free_run
    rows = eval_rows(cfg, model)
    fresh = exit_adapters(model, ExitArtifact(model={}), [FREE_S], opts.free_adapter_width)[str(FREE_S)]
    trained = exit_adapters(model, art, [FREE_S], opts.free_adapter_width)[str(FREE_S)]

    def objective(adapter):
        def fn(ids, hs):
            loss, m = free_loss(model, adapter, FREE_S, ids, opts, hs)
            return {"loss": loss, **m}
        return fn

    before, after = heldout(model, rows, objective(fresh)), heldout(model, rows, objective(trained))
    assert after["loss"] < before["loss"] - 0.2, (before, after)
    assert after["ce_deep"] == pytest.approx(before["ce_deep"], abs=1e-5)  # the deep term is a constant
    assert after["ce_shallow"] < before["ce_shallow"] and after["kd"] < before["kd"]
    assert art.recommended["free"] == {"shallow_exit_layer": FREE_S}
    assert sorted(art.adapters) == [FREE_S]
    # round trip, and the adapter acts at S only
    back = ExitArtifact.load(cfg.paths()[1])
    for k, v in art.adapters[FREE_S].items():
        assert torch.equal(back.adapters[FREE_S][k], v)
    assert back.recommended == art.recommended
    ids = rows[:1, :32]
    with torch.no_grad():
        hs = hidden_states(model, ids)
        plain_s, plain_last = model.exit_logits(hs[FREE_S], layer=FREE_S), model.exit_logits(hs[-1])
        with attached(model, back):
            assert not torch.allclose(model.exit_logits(hs[FREE_S], layer=FREE_S), plain_s, atol=1e-3)
            assert torch.equal(model.exit_logits(hs[-1], layer=model.num_layers), plain_last)
            g = build_generator(model, GenerationConfig(generation_strategy="free"))
            assert g.S == FREE_S and g.trained_knobs == {"shallow_exit_layer": FREE_S}


def test_free_loss_is_free_s_weighted_objective(model):
    """(S*CE_shallow + L*CE_deep)/(S+L) + alpha*KD, both KD kinds, checked against a direct computation."""
    S, L = 3, model.num_layers
    ids = torch.tensor([model.encode("Question: what is two plus two?\nAnswer: four, because 2 + 2 = 4.")[:20]])
    adapter = exit_adapters(model, ExitArtifact(model={}), [S], 32)[str(S)]
    with torch.no_grad():
        hs = hidden_states(model, ids)
        shallow, deep = model.lm_head(model.norm(hs[S])), model.lm_head(hs[-1])
        for kd_kind, T in (("hidden", 1.0), ("logits", 2.0)):
            opts = FreeOptions(free_kd=kd_kind, free_kd_alpha=0.5, free_kd_temperature=T)
            loss, m = free_loss(model, adapter, S, ids, opts, hs)
            if kd_kind == "hidden":
                kd = torch.nn.functional.mse_loss(model.norm(hs[S]), hs[-1])
            else:
                p, logq = torch.softmax(deep / T, -1), torch.log_softmax(shallow / T, -1)
                kd = (p * (torch.log(p) - logq)).sum(-1).mean() * T * T
            ce_s, ce_d = (torch.nn.functional.cross_entropy(z[0, :-1], ids[0, 1:]) for z in (shallow, deep))
            expect = (S * ce_s + L * ce_d) / (S + L) + 0.5 * kd
            assert float(loss) == pytest.approx(float(expect), rel=1e-4)
            assert m["kd"] == pytest.approx(float(kd), rel=1e-4)


# -- both ----------------------------------------------------------------------------------------------------
def test_adapter_width_must_match_the_starting_artifact(model, tmp_path):
    from harness.trained_exits import ExitAdapter

    other = ExitArtifact(model=ExitArtifact.identity(model), adapter_width=16,
                         adapters={6: ExitAdapter(model.hidden_size, 16).state_dict()})
    try:
        model.set_exits(other)
        with pytest.raises(UsageError, match="16 wide"):
            train_calm(small_cfg(tmp_path, "calm", exits="start.safetensors"), CalmOptions(calm_adapter_width=64),
                       model)
        with pytest.raises(UsageError, match="16 wide"):
            train_free(small_cfg(tmp_path, "free", exits="start.safetensors"), FreeOptions(free_adapter_width=64),
                       model)
    finally:
        model.set_exits(None)


def test_recipes_are_registered_with_their_own_flags():
    from harness.train import RECIPES, make_parser, split_args

    ns = make_parser().parse_args(["--recipe", "free", "--free_kd", "logits", "--free_shallow_exit_layer", "5",
                                   "--calm_classifier_steps", "3"])
    _, opts = split_args(ns, RECIPES["free"])
    assert opts == FreeOptions(free_shallow_exit_layer=5, free_kd="logits")
    assert RECIPES["calm"].options is CalmOptions and RECIPES["calm"].gpu and RECIPES["free"].gpu
    assert RECIPES["calm"].summary.startswith("CALM") and RECIPES["free"].summary.startswith("FREE")
