"""The contract every registered decoding method keeps, parametrized over the registry: a method added as one file
is tested here without being listed anywhere.

Each method runs as `--strategies NAME` would run it (plan.expand_strategies, the shipped exits attached, fp32)
on a real prompt, and must: respect max_steps; stop right after the token that completes a stop string; give one
exit layer per token within 1..L; keep its counters non-negative (accepted <= drafted); log knobs that serialize
to JSON; declare a label and a plot family (a new family gets a colour of its own); and, if it declares itself lossless, give the greedy
autoregressive tokens.
"""
from __future__ import annotations

import json

import pytest
import torch

from harness.config import GenerationConfig
from harness.generators import StopCondition, build_generator, load_all

N = 14


@pytest.fixture(scope="module")
def trained():
    from harness.model import load_model

    return load_model(None, "cpu", "float32", exits="auto")


@pytest.fixture(scope="module")
def prompt(trained):
    from harness.tasks import load_examples

    return trained.encode(load_examples("cnn_dm_summarization", 1)[0].prompt)[-300:]


@pytest.fixture(scope="module")
def reference(trained, prompt):
    return build_generator(trained, GenerationConfig()).generate(prompt, StopCondition(trained, N, eos_ids=set()))


def _config(model, name: str) -> GenerationConfig:
    from harness.plan import expand_strategies

    return expand_strategies(name, GenerationConfig(), model.num_layers, exits=model.exits)[-1]


def _stop_string(model, tokens: list[int]) -> tuple[str, int]:
    """A stop string completed first by token j >= 2 of `tokens` (and not before): (string, j + 1)."""
    for j in range(2, len(tokens) - 1):
        before, text = model.decode(tokens[:j]), model.decode(tokens[:j + 1])
        tail = text[len(before):].strip()
        if len(tail) >= 2 and text.startswith(before) and tail not in before:
            return tail, j + 1
    pytest.skip("no token of this output completes a fresh stop string")


@pytest.mark.parametrize("name", sorted(load_all()))
@torch.inference_mode()
def test_every_registered_method_keeps_the_contract(trained, prompt, reference, name):
    m, cls = trained, load_all()[name]
    cfg = _config(m, name)
    assert cfg.generation_strategy == name
    res = build_generator(m, cfg).generate(prompt, StopCondition(m, N, eos_ids=set()))
    assert len(res.tokens) == N and res.stop_reason == "max_steps"
    assert len(res.exit_layers) == len(res.tokens) and all(1 <= e <= m.num_layers for e in res.exit_layers)
    for field in ("layer_forwards", "head_calls", "head_rows", "exit_head_flops", "confidence_flops", "kv_fill_flops",
                  "drafted", "accepted", "verify_passes", "draft_passes"):
        value = getattr(res, field)
        assert value is None or value >= 0, (field, value)
    assert res.accepted is None or res.drafted is None or res.accepted <= res.drafted
    assert res.prefill_seconds >= 0 and res.decode_seconds >= 0
    g = build_generator(m, cfg)
    json.dumps(g.knobs())  # the run log's knobs
    assert isinstance(cls.short, str) and isinstance(cls.family, str) and cls.family, (cls.short, cls.family)
    if cls.lossless:
        assert res.tokens == reference.tokens, name
    stop, cut = _stop_string(m, res.tokens)
    again = g.generate(prompt, StopCondition(m, N, (stop,), eos_ids=set()))
    assert again.stop_reason == "stop_string" and again.tokens == res.tokens[:cut], (stop, again.tokens, res.tokens)
    assert len(again.exit_layers) == len(again.tokens)


def test_strategies_all_is_what_the_classes_say():
    """`--strategies all` holds every method that places itself in it, in its place, as often as it asks."""
    from harness.plan import all_members, expand_strategies
    from harness.trained_exits import ExitArtifact, shipped_artifacts

    art = ExitArtifact.load(shipped_artifacts()[0])
    for exits in (None, art):
        got = [c.generation_strategy for c in expand_strategies("all", GenerationConfig(), 30, exits=exits)]
        members = sorted((c.in_all, n) for n, c in load_all().items() if c.in_all is not None)
        want = [n for _, n in members for _ in load_all()[n].all_specs(GenerationConfig(), exits)]
        assert got == want and got[0] == "autoregressive"
    assert "hybrid_speculative" not in [c.generation_strategy for c in expand_strategies("all", GenerationConfig(), 30)]
    assert all(n in all_members() for _, n in members)


def test_dataset_all_and_evals_bundled_tasks_are_the_task_registrys():
    """`--dataset all` and eval.py's offline tasks are read from the Task entries, and each offline task has its
    lm-eval definition in harness/lm_eval_tasks."""
    from pathlib import Path

    import benchmark
    import eval as eval_cli
    from harness.tasks import TASKS

    assert benchmark.task_list("all") == [n for n, t in TASKS.items() if t.in_all] and "cnn_dm_lm" not in \
        benchmark.task_list("all")
    assert set(eval_cli.BUNDLED) == {t.lm_eval_task for t in TASKS.values() if t.lm_eval_task}
    folder = Path(eval_cli.TASK_DIR)
    assert all((folder / f"{name}.yaml").is_file() for name in eval_cli.BUNDLED)
