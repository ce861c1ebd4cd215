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
from harness.generators.self_speculative import lookup
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
    assert not torch.allclose(model.exit_logits(h, layer=8), plain)  # trained exit at 8
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


def test_exit_adapters_recipe_lowers_loss_and_resumes(model, tmp_path):
    from harness.train import load_all, make_parser, split_args

    load_all()
    argv = ["--recipe", "exit_adapters", "--steps", "12", "--log_every", "12", "--lr", "3e-3", "--max_docs", "20",
            "--seq_len", "64", "--eval_sequences", "2", "--exit_layers", "6", "--adapters_cache_sequences", "8",
            "--adapters_self_generated", "1", "--adapters_self_tokens", "8", "--adapters_tokens_per_step", "256",
            "--adapters_vocab", "2048", "--work_dir", str(tmp_path / "w")]
    from harness.train import RECIPES

    try:
        cfg, opts = split_args(make_parser().parse_args(argv), RECIPES["exit_adapters"])
        art = RECIPES["exit_adapters"].run(cfg, opts, model)
        log = [json.loads(x) for x in (tmp_path / "w" / "train_log.jsonl").read_text().splitlines()]
        assert len(log) == 12
        assert sum(x["kl_6"] for x in log[-3:]) / 3 < log[0]["kl_6"]
        metrics = art.provenance["exit_adapters"]["metrics"]
        assert metrics["agree_6"] >= metrics["untrained_agree_6"]
        assert ExitArtifact.load(tmp_path / "w" / "exits.safetensors").adapters.keys() == {6}
        assert art.recommended["self_speculative"]["exit_layer"] == 6
        cfg.steps = 14  # a restart with the same work dir resumes at step 12
        RECIPES["exit_adapters"].run(cfg, opts, model)
        log = [json.loads(x) for x in (tmp_path / "w" / "train_log.jsonl").read_text().splitlines()]
        assert [x["step"] for x in log[12:]] == [13, 14]
    finally:
        model.set_exits(None)
