"""Exit artifacts (save/load/refusal), adapters in the exit head, trained defaults, and lossless drafting with
reduced vocabularies, adaptive draft length and prompt lookup."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness.config import GenerationConfig, UsageError
from harness.generators import StopCondition, build_generator
from harness.generators.proposers import lookup
from harness.trained_exits import ExitAdapter, ExitArtifact, attach

ROOT = Path(__file__).resolve().parents[1]


def random_artifact(model, layers=(4, 8), width=64, seed=0) -> ExitArtifact:
    torch.manual_seed(seed)
    adapters = {}
    for d in layers:
        a = ExitAdapter(model.hidden_size, width)
        torch.nn.init.normal_(a.down.weight, std=0.02)  # not the identity: the adapter must change the exit
        adapters[d] = {k: v.detach().clone() for k, v in a.state_dict().items()}
    return ExitArtifact(model=ExitArtifact.identity(model), adapters=adapters, adapter_width=width,
                        vocab=torch.arange(0, 8192), recommended={"self_speculative": {
                            "exit_layer": 8, "num_speculations": 3, "draft_vocab": 8192, "draft_threshold": 0.2}},
                        tensors={"demo.table": torch.arange(6.0).view(2, 3)}, provenance={"test": {"seed": seed}})


@pytest.fixture
def with_exits(model, tmp_path):
    art = random_artifact(model)
    path = art.save(tmp_path / "exits.safetensors")
    try:
        yield attach(model, str(path))
    finally:
        model.set_exits(None)


def test_artifact_round_trip_is_exact(model, tmp_path):
    art = random_artifact(model)
    back = ExitArtifact.load(art.save(tmp_path / "a.safetensors"))
    assert back.model == art.model and back.adapter_width == art.adapter_width
    assert back.recommended == art.recommended and back.provenance == art.provenance
    assert sorted(back.adapters) == sorted(art.adapters)
    for d in art.adapters:
        for k, v in art.adapters[d].items():
            assert torch.equal(back.adapters[d][k], v), (d, k)
    assert torch.equal(back.vocab, art.vocab) and torch.equal(back.tensors["demo.table"], art.tensors["demo.table"])


def test_adapters_change_their_exit_only(model, with_exits):
    h = torch.randn(1, 3, model.hidden_size)
    plain = model.lm_head(model.norm(h))
    # the trained exit at 8 scores the adapted state on the candidate rows (-inf elsewhere): compared on those
    # rows, so a model that masked the vocabulary but skipped the adapter fails here
    art = model.exits
    adapter = ExitAdapter(model.hidden_size, art.adapter_width)
    adapter.load_state_dict(art.adapters[8])
    rows = art.vocab
    out = model.exit_logits(h, layer=8)
    assert torch.allclose(out[..., rows], model.lm_head(model.norm(adapter(h)))[..., rows], atol=1e-4)
    assert not torch.allclose(out[..., rows], plain[..., rows], atol=1e-3)
    outside = torch.ones(model.vocab_size, dtype=torch.bool)
    outside[rows] = False
    assert torch.isinf(out[..., outside]).all()
    assert torch.equal(model.exit_logits(h, layer=6), plain)  # no adapter at 6
    assert torch.equal(model.exit_logits(h, layer=model.num_layers), plain)  # the last layer never has one
    assert torch.equal(model.exit_logits(h), plain)


def test_mismatched_or_unreadable_artifact_is_refused(model, tmp_path):
    art = random_artifact(model)
    art.model = dict(art.model, fingerprint="someone-elses-model")
    path = art.save(tmp_path / "other.safetensors")
    with pytest.raises(UsageError, match="trained for another model"):
        attach(model, str(path))
    art.model = dict(ExitArtifact.identity(model), num_layers=12)
    with pytest.raises(UsageError, match="num_layers"):
        attach(model, str(art.save(tmp_path / "small.safetensors")))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(UsageError, match="cannot read"):
        attach(model, str(bad))
    with pytest.raises(UsageError, match="no such file"):
        attach(model, str(tmp_path / "missing.safetensors"))
    assert model.exits is None


def test_trained_defaults_apply_unless_given(model, with_exits):
    gen = build_generator(model, GenerationConfig(generation_strategy="self_speculative"))
    assert gen.knobs()["exit_layer"] == 8 and gen.k == 3 and gen.knobs()["draft_vocab"] == 8192
    assert gen.trained_knobs["exit_layer"] == 8
    mine = build_generator(model, GenerationConfig(generation_strategy="self_speculative", exit_layer=4,
                                                   draft_vocab=0))
    assert mine.knobs()["exit_layer"] == 4 and mine.knobs()["draft_vocab"] == 0
    with pytest.raises(UsageError, match="candidate rows"):
        build_generator(model, GenerationConfig(generation_strategy="self_speculative", draft_vocab=100))


def test_self_speculative_without_exit_layer_or_exits_is_one_clear_error(model):
    with pytest.raises(UsageError, match="--exit_layer"):
        build_generator(model, GenerationConfig(generation_strategy="self_speculative"))
    with pytest.raises(UsageError, match="candidate vocabulary"):
        build_generator(model, GenerationConfig(generation_strategy="self_speculative", exit_layer=4, draft_vocab=10))


def test_lookup_finds_latest_longest_match():
    seq = [1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2, 3]
    assert lookup(seq, 3, 2) == [7, 8]  # latest earlier occurrence of (1, 2, 3)
    assert lookup([5, 6, 7], 3, 4) == []
    assert lookup([4, 4, 4], 1, 5) == [4]


@pytest.mark.slow
def test_trained_drafting_is_lossless_on_real_prompts(model, with_exits):
    """Adapters, a reduced draft vocabulary, early draft stops and prompt lookup never change greedy output."""
    from harness.tasks import load_examples

    exs = load_examples("cnn_dm_summarization", 2) + load_examples("xsum_summarization", 1)
    ar = build_generator(model, GenerationConfig(max_steps=32))
    configs = [GenerationConfig(generation_strategy="self_speculative", max_steps=32),  # artifact defaults
               GenerationConfig(generation_strategy="self_speculative", exit_layer=4, num_speculations=5,
                                draft_threshold=0.0, max_steps=32),
               GenerationConfig(generation_strategy="hybrid_speculative", max_steps=32)]
    gens = [build_generator(model, c) for c in configs]
    lookups = 0
    for ex in exs:
        ids = model.encode(ex.prompt)[-500:]
        want = ar.generate(ids, StopCondition(model, 32)).tokens
        for g in gens:
            got = g.generate(ids, StopCondition(model, 32))
            assert got.tokens == want, (g.name, g.knobs(), ex.id)
        lookups += gens[2].stats["lookup_steps"]
    assert lookups > 0  # the hybrid really proposed lookup drafts on these summaries


def test_cli_refuses_foreign_artifact(model, tmp_path):
    art = random_artifact(model)
    art.model = dict(art.model, fingerprint="x")
    path = art.save(tmp_path / "x.safetensors")
    r = subprocess.run([sys.executable, str(ROOT / "benchmark.py"), "--exits", str(path), "--num_samples", "1",
                        "--output_dir", str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().count("\n") == 0 and "trained for another model" in r.stderr


def test_exit_adapters_recipe_lowers_loss_and_resumes(model, tmp_path, monkeypatch):
    """Training lowers its objective on held-out text and raises candidate-row agreement there; it records what it
    trained on and fits the self-speculation verdict on held-out prompts it never trained on."""
    from harness import speedup_model
    from harness.train import RECIPES, load_all, make_parser, split_args
    from harness.train.common import heldout_documents

    load_all()
    argv = ["--recipe", "exit_adapters", "--steps", "12", "--log_every", "12", "--lr", "3e-3", "--max_docs", "20",
            "--seq_len", "64", "--eval_sequences", "2", "--exit_layers", "6", "--adapters_cache_sequences", "8",
            "--adapters_self_generated", "1", "--adapters_self_tokens", "8", "--adapters_tokens_per_step", "256",
            "--adapters_vocab", "2048", "--adapters_fit_prompts", "2", "--adapters_fit_tokens", "8",
            "--adapters_fit_prompt_tokens", "128", "--work_dir", str(tmp_path / "w")]
    try:
        cfg, opts = split_args(make_parser().parse_args(argv), RECIPES["exit_adapters"])
        art = RECIPES["exit_adapters"].run(cfg, opts, model)
        log = [json.loads(x) for x in (tmp_path / "w" / "train_log.jsonl").read_text().splitlines()]
        assert len(log) == 12
        assert sum(x["kl_6"] for x in log[-3:]) / 3 < log[0]["kl_6"]
        prov = art.provenance["exit_adapters"]
        metrics = prov["metrics"]
        # what training guarantees, on held-out positions: its objective (KL on the candidate rows) fell, and the
        # candidate-vocabulary exit (the one every method reads at a trained layer) agrees more often
        assert metrics["heldout_kl_6"] < metrics["untrained_heldout_kl_6"]
        assert metrics["agree_vocab_6"] > metrics["untrained_agree_vocab_6"]
        assert abs(metrics["stored_agree_vocab_6"] - metrics["agree_vocab_6"]) <= 0.05  # the fp16 file
        assert ExitArtifact.load(tmp_path / "w" / "exits.safetensors").adapters.keys() == {6}
        # the training documents are recorded, none from the held-out tails; the fit read only held-out ones
        trained = prov["training_data"]
        assert trained["xsum_validation"]["documents"] > 0 and trained["gsm8k_train"]["documents"] > 0
        for source, rec in trained.items():
            assert not set(rec["records"]) & set(heldout_documents(source, cfg.holdout_docs))
        rec = speedup_model.recommendation(art)
        fitted = rec["fitted_on"]["documents"]
        assert fitted and all(set(r["records"]) <= set(heldout_documents(s, cfg.holdout_docs))
                              for s, r in fitted.items())
        assert rec["fitted_on"]["decode_positions"] > 0
        # the verdict and what generators read agree: knobs only when speculating, the interval above 1.0x then
        assert art.recommended["self_speculative"] == rec["knobs"]
        assert rec["speculate"] == (rec["best"]["predicted_speedup_ci95"][0] > 1.0) == bool(rec["knobs"])
        if rec["speculate"]:
            assert rec["knobs"]["exit_layer"] == 6 and rec["predicted_speedup"] == rec["best"]["predicted_speedup"]

        # a restart with the same work dir resumes at step 12; with drafting made prohibitively slow the
        # recommender must say "don't speculate" and leave self_speculative at its untrained defaults
        measured = speedup_model.measure_costs

        def slow_drafts(*a, **kw):
            c = measured(*a, **kw)
            c.adapter = 100 * c.step()
            return c

        monkeypatch.setattr(speedup_model, "measure_costs", slow_drafts)
        cfg.steps = 14
        art = RECIPES["exit_adapters"].run(cfg, opts, model)
        log = [json.loads(x) for x in (tmp_path / "w" / "train_log.jsonl").read_text().splitlines()]
        assert [x["step"] for x in log[12:]] == [13, 14]
        rec = speedup_model.recommendation(art)
        assert rec["speculate"] is False and rec["knobs"] == {} and rec["best"]["predicted_speedup"] < 1.0
        assert art.recommended["self_speculative"] == {}
        assert rec["predicted_speedup"] == rec["untrained_default"]["predicted_speedup"]
        model.set_exits(art)
        gen = build_generator(model, GenerationConfig(generation_strategy="self_speculative", exit_layer=7))
        assert gen.trained_knobs == {} and gen.knobs()["num_speculations"] == 6  # its own defaults
        # without --exit_layer the run is refused with the verdict, not with "needs --exit_layer ... or exits"
        with pytest.raises(UsageError, match=r"recommender predicts no setting clearly above 1\.0x .* "
                                             r"\(best [0-9.]+x \[[0-9.]+-[0-9.]+\]\): don't speculate; "
                                             r"pass --exit_layer E"):
            build_generator(model, GenerationConfig(generation_strategy="self_speculative"))
    finally:
        model.set_exits(None)


def test_shipped_exits_improved_on_held_out_text():
    """The shipped artifact's stored figures show what training guarantees at every trained layer: candidate-row
    agreement with the last layer on held-out text rose, and the fp16 file scores what training measured.
    (Full-head agreement through an adapter is not among them: no method reads a trained exit that way.)"""
    from harness.trained_exits import shipped_artifacts

    paths = [p for p in shipped_artifacts() if "exit_adapters" in ExitArtifact.load(p).provenance]
    assert paths, "no shipped artifact made by the exit_adapters recipe"
    for path in paths:
        art = ExitArtifact.load(path)
        m = art.provenance["exit_adapters"]["metrics"]
        assert art.adapters
        for d in art.adapters:
            assert m[f"agree_vocab_{d}"] > m[f"untrained_agree_vocab_{d}"], (path.name, d)
            assert abs(m[f"stored_agree_{d}"] - m[f"agree_{d}"]) <= 0.01, (path.name, d)
            if f"heldout_kl_{d}" in m:  # recorded since the recipe measures its objective on held-out text
                assert m[f"heldout_kl_{d}"] < m[f"untrained_heldout_kl_{d}"], (path.name, d)


def test_shipped_self_speculation_recommendation_is_honest():
    """The shipped artifact's self-speculation verdict was fitted on greedy continuations of held-out prompts,
    recommends knobs only when their interval lies above 1.0x, and says so otherwise."""
    from harness.speedup_model import recommendation
    from harness.trained_exits import shipped_artifacts

    for path in shipped_artifacts():
        art = ExitArtifact.load(path)
        if "exit_adapters" not in art.provenance:
            continue
        rec = recommendation(art)
        assert rec is not None, f"{path.name}: no recorded verdict (made before the recommender could say " \
                                "\"don't speculate\"); rerun make exits"
        assert art.recommended.get("self_speculative", {}) == rec["knobs"]
        assert rec["speculate"] == (rec["best"]["predicted_speedup_ci95"][0] > 1.0) == bool(rec["knobs"])
        trained = art.provenance["exit_adapters"]["training_data"]
        for source, docs in rec["fitted_on"]["documents"].items():
            assert not set(docs["records"]) & set(trained.get(source, {}).get("records", [])), (path.name, source)


def test_the_recommendation_names_the_device_and_dtype_it_was_timed_on():
    """A run on another device or dtype than the recommender's timings is told so (provenance.speculation_verdict)."""
    art = ExitArtifact(model={}, provenance={"exit_adapters": {"hardware": "x86_64 CPU x2", "config": {}}})
    assert (art.recipe_device("exit_adapters"), art.recipe_dtype("exit_adapters")) == ("cpu", "float32")
    art.provenance["exit_adapters"] = {"hardware": "NVIDIA H200", "config": {"dtype": "bfloat16"}}
    assert (art.recipe_device("exit_adapters"), art.recipe_dtype("exit_adapters")) == ("cuda", "bfloat16")
    art.provenance["exit_adapters"]["device_type"] = "cpu"  # recorded since recipes resolve --device auto
    assert art.recipe_device("exit_adapters") == "cpu" and art.recipe_device("calibrate") is None
