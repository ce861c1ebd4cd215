"""`--core lean-graphs` (harness/cuda_graphs.py): the static pass a CUDA graph captures, run eagerly on the CPU.

Only the capture needs a GPU (tests/test_gpu.py replays the graphs); everything else the graphs rely on runs here:
the fixed-capacity pool, the slot writes at a device-held position, the mask over the capacity, the cache's
lengths, a second cache taking the pool, a sequence outgrowing it, and the refusal on a CPU.
"""
from __future__ import annotations

import pytest
import torch

from harness.config import GenerationConfig
from harness.cuda_graphs import GraphPool
from harness.config import UsageError
from harness.generators import StopCondition, build_generator

METHODS = (dict(), dict(generation_strategy="prompt_lookup"),
           dict(generation_strategy="self_speculative", exit_layer=8, num_speculations=3))


def _generate(model, ids, cfg, n=20):
    return build_generator(model, GenerationConfig(**cfg)).generate(ids, StopCondition(model, n, eos_ids=set()))


def _tokens(model, ids, cfg, n=20):
    return _generate(model, ids, cfg, n).tokens


@pytest.fixture
def pooled(model):
    """The session's fp32 CPU model with an uncaptured pool attached for one test."""
    with torch.inference_mode():  # the lean core serves inference only
        lean = model.lean()
    assert lean is not None

    def attach(capacity):
        lean.graphs = GraphPool(lean, capacity, model.device, capture=False)
        return lean.graphs

    yield attach
    lean.graphs = None


@torch.inference_mode()
def test_static_pass_gives_the_lean_cores_tokens(model, real_prompts, pooled):
    # 250 + 20 tokens cross a span (256 -> 512 slots); short prompts are repeated to reach 250
    prompts = [(model.encode(p) * 4)[-250:] for p in real_prompts[:3]]
    want = [[_tokens(model, ids, cfg) for cfg in METHODS] for ids in prompts]
    pool = pooled(1024)
    results = [[_generate(model, ids, cfg) for cfg in METHODS] for ids in prompts]
    assert [[r.tokens for r in row] for row in results] == want
    # each capture is counted in the generation that paid it, and left out of its decode time
    assert sum(r.graph_captures for row in results for r in row) == pool.captures
    assert results[0][0].graph_captures > 0 and results[0][0].graph_capture_seconds > 0
    # every decode pass (1..16 positions) went through the pool: one per (range, size, span), replayed many times
    assert pool.captures >= 3 and pool.replays > 3 * 20
    assert {(0, model.num_layers, 1), (0, 8, 1)} <= {key[:3] for key in pool.graphs}
    assert {key[3] for key in pool.graphs} == {256, 512}


@torch.inference_mode()
def test_static_pass_writes_the_cache_a_plain_pass_writes(model, real_prompts, pooled):
    ids = torch.tensor([model.encode(real_prompts[2])[:40]])
    h = model.embed(ids)
    plain = model.new_cache()  # no pool yet: private buffers
    a = model.run_layers(h, 0, model.num_layers, plain, 0)
    a = model.run_layers(model.embed(ids[:, :4]), 0, model.num_layers, plain, 40)
    pool = pooled(128)
    cache = model.new_cache()
    model.run_layers(h, 0, model.num_layers, cache, 0)  # 40 positions: the eager prefill, into the pool
    b = model.run_layers(model.embed(ids[:, :4]), 0, model.num_layers, cache, 40)  # 4 positions: the static pass
    assert pool.replays == 1 and model.cache_lengths(cache) == [44] * model.num_layers
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    for i in (0, model.num_layers - 1):
        torch.testing.assert_close(cache.layers[i].keys, plain.layers[i].keys, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(cache.layers[i].values, plain.layers[i].values, rtol=1e-4, atol=1e-4)


@torch.inference_mode()
def test_a_second_cache_takes_the_pool_and_the_first_keeps_its_kv(model, real_prompts, pooled):
    pool = pooled(256)
    ids = torch.tensor([model.encode(real_prompts[0])[:30]])
    first = model.new_cache()
    model.run_layers(model.embed(ids), 0, model.num_layers, first, 0)
    before = first.layers[3].keys.clone()
    second = model.new_cache()
    assert pool.owner() is second and first.layers[3].k is not pool.k[3]
    torch.testing.assert_close(first.layers[3].keys, before, rtol=0, atol=0)
    assert not pool.serves(first, 0, model.num_layers, 30, 1, 1) and pool.serves(second, 0, model.num_layers, 0, 1, 1)


@torch.inference_mode()
def test_a_sequence_longer_than_the_pool_runs_eagerly_with_the_same_tokens(model, real_prompts, pooled):
    ids = model.encode(real_prompts[1])[:50]
    want = [_tokens(model, ids, cfg, n=24) for cfg in METHODS]
    pool = pooled(60)  # the 50-token prompt fits; the 61st position does not
    got = [_tokens(model, ids, cfg, n=24) for cfg in METHODS]
    assert got == want and pool.replays > 0


@torch.inference_mode()
def test_past_the_graph_cap_new_shapes_run_eagerly_and_known_ones_still_replay(model, real_prompts, pooled,
                                                                                monkeypatch):
    from harness import cuda_graphs

    ids = model.encode(real_prompts[3])[:40]
    want = [_tokens(model, ids, cfg, n=16) for cfg in METHODS]
    pool = pooled(256)
    monkeypatch.setattr(cuda_graphs, "MAX_GRAPHS", 2)
    got = [_tokens(model, ids, cfg, n=16) for cfg in METHODS]
    assert got == want and pool.captures == 2 and pool.replays > 16


def test_a_pass_attends_over_the_power_of_two_that_holds_the_sequence():
    from harness.cuda_graphs import span

    assert [span(n, 4096) for n in (1, 256, 257, 700, 1024, 1025, 4096)] == [256, 256, 512, 1024, 1024, 2048, 4096]
    assert span(3000, 2048) == 2048  # never past the pool (a longer sequence does not reach the graphs)


def test_lean_graphs_is_refused_off_cuda(model):
    from harness.model import load_model

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(UsageError, match="needs a CUDA device"):
        load_model(None, "cpu", "float32", exits="none", core="lean-graphs")
    with pytest.raises(UsageError, match="needs a CUDA device"):
        model.use_core("lean-graphs")
