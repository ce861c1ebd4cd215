"""Reference fidelity: hybrid prompt lookup against transformers' own matcher, and the shipped ConsistentEE
policies against the options the Makefile passes (the recipe's defaults are the reference's, the shipped artifact
was made with ours)."""
from __future__ import annotations

import dataclasses
import random
import re
import shlex
from pathlib import Path

import pytest
import torch
from transformers.generation.candidate_generator import PromptLookupCandidateGenerator

from harness.config import GenerationConfig, UsageError
from harness.generators import StopCondition, build_generator
from harness.generators.consistentee import policies_from_tensors
from harness.generators.proposers import lookup
from harness.train import load_all, make_parser, split_args
from harness.trained_exits import ExitArtifact

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "harness/data/exits/SmolLM2-135M-Instruct.safetensors"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# -- hybrid prompt lookup ----------------------------------------------------------------------------------------
def transformers_lookup(tokens: list[int], max_ngram: int, count: int, eos: list[int]) -> list[int]:
    """What transformers' prompt lookup (hf_prompt_lookup's drafter) proposes after `tokens`."""
    gen = PromptLookupCandidateGenerator(eos_token_id=torch.tensor(eos) if eos else None, num_output_tokens=count,
                                         max_matching_ngram_size=max_ngram, max_length=len(tokens) + 1000)
    ids = torch.tensor([tokens])
    out, _ = gen.get_candidates(ids)
    return out[0, len(tokens):].tolist()


def test_earliest_lookup_proposes_what_transformers_prompt_lookup_proposes(model, real_prompts):
    rng = random.Random(0)
    cases = []
    for _ in range(400):  # small vocabularies: many repeated n-grams, several occurrences each
        seq = [rng.randrange(rng.choice((3, 5, 8))) for _ in range(rng.randrange(2, 40))]
        cases.append((seq, rng.randrange(1, 5), rng.randrange(1, 12), rng.choice(([], [0], [1, 2]))))
    text = model.encode(real_prompts[0])[:160]  # real text, at every prefix length: the n-grams hf_prompt_lookup sees
    eos = sorted(model.eos_ids())
    cases += [(text[:n], 2, 10, eos) for n in range(2, len(text))]  # transformers' defaults: 2-grams, 10 tokens
    cases += [(text[:n], 3, 10, []) for n in range(2, len(text), 3)]
    proposed = 0
    for seq, n, count, stop in cases:
        want = transformers_lookup(seq, n, count, stop)
        assert lookup(seq, n, count, "earliest", set(stop)) == want, (seq, n, count, stop)
        proposed += bool(want)
    assert proposed > len(cases) // 3  # the comparison covered many real proposals, not just "no match"


def test_earliest_and_latest_match_on_a_hand_made_case():
    seq = [1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2, 3]
    assert lookup(seq, 3, 2, "earliest") == [9, 1]  # the first earlier occurrence of (1, 2, 3)
    assert lookup(seq, 3, 2, "latest") == [7, 8]  # the most recent one
    assert lookup(seq, 3, 4, "earliest", eos={1}) == [9]  # cut before an end of sequence, as transformers
    assert lookup([5, 1, 5], 1, 3, "earliest", eos={1}) == []  # nothing left: no draft (no shorter n-gram tried)
    with pytest.raises(ValueError):
        lookup(seq, 3, 2, "middle")


def test_lookup_match_knob(model):
    g = build_generator(model, GenerationConfig(generation_strategy="hybrid_speculative", exit_layer=8))
    assert g.knobs()["lookup_match"] == "earliest"  # transformers' behaviour by default
    g = build_generator(model, GenerationConfig(generation_strategy="hybrid_speculative", exit_layer=8,
                                                lookup_match="latest"))
    assert g.knobs()["lookup_match"] == "latest"
    with pytest.raises(UsageError, match="lookup_match"):
        build_generator(model, GenerationConfig(generation_strategy="hybrid_speculative", exit_layer=8,
                                                lookup_match="middle"))
    with pytest.raises(UsageError, match="lookup_match"):  # a hybrid-only knob
        build_generator(model, GenerationConfig(generation_strategy="self_speculative", exit_layer=8,
                                                lookup_match="latest"))


@pytest.mark.parametrize("strategy,match", [("hybrid_speculative", "earliest"), ("hybrid_speculative", "latest"),
                                            ("prompt_lookup", "earliest")])
def test_lookup_methods_are_lossless_with_either_match(model, strategy, match):
    from harness.tasks import load_examples

    ar = build_generator(model, GenerationConfig(max_steps=24))
    depth = {"exit_layer": 8} if strategy == "hybrid_speculative" else {}
    hy = build_generator(model, GenerationConfig(generation_strategy=strategy, lookup_match=match, max_steps=24,
                                                 **depth))
    lookups = 0
    for ex in load_examples("cnn_dm_summarization", 2):
        ids = model.encode(ex.prompt)[-400:]
        want = ar.generate(ids, StopCondition(model, 24)).tokens
        assert hy.generate(ids, StopCondition(model, 24)).tokens == want, (match, ex.id)
        lookups += hy.stats["lookup_steps"]
    assert lookups > 0  # lookup drafts were really proposed and verified


# -- ConsistentEE: the shipped policies ----------------------------------------------------------------------------
def makefile_consistentee_args() -> list[str]:
    """The arguments the Makefile's `exits` target passes to the consistentee recipe."""
    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    line = next(x for x in text.splitlines() if "--recipe consistentee" in x)
    variables = dict(re.findall(r"^(\w+) := (.*)$", text, re.M))
    line = re.sub(r"\$\((\w+)\)", lambda m: variables.get(m.group(1), m.group(0)), line)
    args = shlex.split(line)
    return args[args.index("harness.train") + 1:]


def test_makefile_passes_the_options_the_shipped_policies_were_trained_with():
    shipped = ExitArtifact.load(SHIPPED)
    prov = shipped.provenance["consistentee"]
    cfg, opts = split_args(make_parser().parse_args(makefile_consistentee_args()), load_all()["consistentee"])
    options = dataclasses.asdict(opts)
    assert prov["options"] and all(options[k] == v for k, v in prov["options"].items()), (prov["options"], options)
    # the options added since reproduce what the shipped run did before they existed
    assert (opts.consistentee_policy, opts.consistentee_depth_cost) == ("mlp", "fraction")
    assert prov["reward"] == "1[top1_d == top1_L] - alpha * (d/L) * (1 - m/L)" and opts.consistentee_hardness
    for key in ("steps", "seq_len", "batch_size", "lr", "seed", "exit_layers", "log_every"):
        assert getattr(cfg, key) == prov["config"][key], key
    # and they differ from the recipe's defaults (the reference's), which is why the Makefile names them
    defaults = dataclasses.asdict(type(opts)())
    assert {k for k in options if options[k] != defaults[k]} >= {"consistentee_policy", "consistentee_reward",
                                                                 "consistentee_depth_cost", "consistentee_hardness",
                                                                 "consistentee_samples"}


def test_shipped_policies_load_with_their_shape_and_run(model, real_prompts):
    shipped = ExitArtifact.load(SHIPPED)
    pols = policies_from_tensors(shipped.tensors, model.hidden_size)
    assert sorted(pols) == shipped.provenance["consistentee"]["layers"]
    assert {p.width for p in pols.values()} == {shipped.provenance["consistentee"]["hidden"]} == {64}  # mlp
    model.set_exits(shipped)
    try:
        g = build_generator(model, GenerationConfig(generation_strategy="policy"))
        res = g.generate(model.encode(real_prompts[0]), StopCondition(model, 12, eos_ids=set()))
        assert len(res.tokens) == 12 and set(res.exit_layers) <= {*pols, model.num_layers}
        assert g.knobs()["policy_hidden"] == 64 and res.confidence_flops > 0
    finally:
        model.set_exits(None)
