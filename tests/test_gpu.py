"""GPU-only code paths (CUDA device, bf16, synchronized timers, the lean core on CUDA, device maps across GPUs).

Skipped without CUDA; on a GPU machine `make test` runs them, and `bench/gpu_check.sh` runs them with the GPU's
benchmarks (the measurement check, the cost curve, the near-tie drift and a speed table).
"""
from __future__ import annotations

import pytest
import torch

from harness.config import GenerationConfig
from harness.exactness import compare
from harness.generators import StopCondition, build_generator

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# Lossless methods: early-exit drafts, prompt-lookup drafts, and both.
LOSSLESS = (dict(generation_strategy="self_speculative", exit_layer=8, num_speculations=4),
            dict(generation_strategy="hybrid_speculative", exit_layer=8, num_speculations=4),
            dict(generation_strategy="prompt_lookup"))
# The trained drafters (the shipped exit artifact's sibling file), alone and in the self-speculation loops.
DRAFTERS = (dict(generation_strategy="eagle"), dict(generation_strategy="kangaroo"),
            dict(generation_strategy="self_speculative", drafter="kangaroo"),
            dict(generation_strategy="hybrid_speculative", drafter="eagle"))


@pytest.fixture(scope="module")
def gpu_model():
    from harness.model import load_model

    return load_model(None, "cuda", "bfloat16", exits="none")


@pytest.fixture(scope="module")
def gpu_model_fp32():
    from harness.model import load_model

    return load_model(None, "cuda", "float32", exits="none")


@pytest.fixture(scope="module")
def gpu_drafters_fp32():
    from harness.model import load_model

    m = load_model(None, "cuda", "float32", exits="auto")
    if m.exits is None or "eagle.fc.weight" not in m.exits.tensors:
        pytest.skip("the shipped drafters did not attach")
    return m


def _lossless_matches(model, prompts, dtype: str, n: int = 24, methods=LOSSLESS):
    ar = build_generator(model, GenerationConfig())
    out = []
    for text in prompts:
        ids = model.encode(text)
        ref = ar.generate(ids, StopCondition(model, n, eos_ids=set()))
        for cfg in methods:
            got = build_generator(model, GenerationConfig(**cfg)).generate(ids, StopCondition(model, n, eos_ids=set()))
            out.append((cfg["generation_strategy"], compare(got.tokens, ref.tokens, ref.top2_gaps, dtype)))
    return out


@cuda
@torch.inference_mode()
def test_lossless_methods_differ_only_at_near_ties_in_bf16_on_the_gpu(gpu_model, real_prompts):
    got = _lossless_matches(gpu_model, real_prompts[:6], "bfloat16")
    assert all(m.kind in ("identical", "near-tie") for _, m in got), [g for g in got if g[1].kind not in
                                                                      ("identical", "near-tie")]
    assert sum(m.kind == "identical" for _, m in got) >= len(got) // 2


@cuda
@torch.inference_mode()
def test_lossless_methods_are_exact_in_fp32_on_the_gpu(gpu_model_fp32, real_prompts):
    got = _lossless_matches(gpu_model_fp32, real_prompts[:6], "float32")
    assert all(m.kind == "identical" for _, m in got), [g for g in got if g[1].kind != "identical"]


@cuda
@torch.inference_mode()
def test_trained_drafters_are_exact_in_fp32_on_the_gpu(gpu_drafters_fp32, real_prompts):
    got = _lossless_matches(gpu_drafters_fp32, real_prompts[:4], "float32", methods=DRAFTERS)
    assert all(m.kind == "identical" for _, m in got), [g for g in got if g[1].kind != "identical"]


@cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@torch.inference_mode()
def test_cuda_graphs_replay_the_lean_core(dtype, real_prompts):
    """--core lean-graphs: its greedy tokens are the eager lean core's up to near-ties, its lossless methods stay
    lossless against its own autoregressive output (exactly in fp32), and the passes did replay graphs."""
    from harness.model import load_model

    graphs = load_model(None, "cuda", dtype, exits="none", core="lean-graphs")
    eager = load_model(None, "cuda", dtype, exits="none")
    kinds = []
    for text in real_prompts[:4]:
        ids = graphs.encode(text)
        a = build_generator(eager, GenerationConfig()).generate(ids, StopCondition(eager, 24, eos_ids=set()))
        b = build_generator(graphs, GenerationConfig()).generate(ids, StopCondition(graphs, 24, eos_ids=set()))
        kinds.append(compare(b.tokens, a.tokens, a.top2_gaps, dtype).kind)
    # against the eager core (attention over the valid positions, not the masked capacity): near-ties at most
    assert all(k in ("identical", "near-tie") for k in kinds), kinds
    want = ("identical",) if dtype == "float32" else ("identical", "near-tie")
    got = _lossless_matches(graphs, real_prompts[:4], dtype)
    assert all(m.kind in want for _, m in got), [g for g in got if g[1].kind not in want]
    pool = graphs.lean().graphs
    assert pool.captures >= 3 and pool.replays > 100, pool.describe()
    assert "cuda_graphs" in graphs.core_summary()


@cuda
def test_cuda_graphs_are_refused_where_the_lean_core_does_not_run():
    from harness.config import UsageError
    from harness.model import load_model

    with pytest.raises(UsageError, match="lean-graphs replays the lean core.*device map"):
        load_model(None, "cuda", "bfloat16", "auto", exits="none", core="lean-graphs")


@cuda
@torch.inference_mode()
def test_lean_core_on_cuda_gives_transformers_logits(gpu_model_fp32, real_prompts):
    m = gpu_model_fp32
    x = torch.tensor([m.encode(real_prompts[1])], device=m.device)
    assert m.core_summary()["core"] == "lean"
    a = m.exit_logits(m.run_layers(m.embed(x), 0, m.num_layers, m.new_cache(), 0))
    m.core = "transformers"
    try:
        b = m.exit_logits(m.run_layers(m.embed(x), 0, m.num_layers, m.new_cache(), 0))
    finally:
        m.core = "lean"
    # same ops on the same kernels, but SDPA may pick another backend for another mask: arithmetic noise only
    assert torch.allclose(a, b, atol=1e-3, rtol=0) and torch.equal(a.argmax(-1), b.argmax(-1))


@cuda
@torch.inference_mode()
def test_timers_synchronize_the_device(gpu_model, real_prompts, monkeypatch):
    calls = []
    real = torch.cuda.synchronize
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    res = build_generator(gpu_model, GenerationConfig()).generate(gpu_model.encode(real_prompts[0]),
                                                                  StopCondition(gpu_model, 8, eos_ids=set()))
    assert len(calls) >= 3 and res.prefill_seconds > 0 and res.decode_seconds > 0


@cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@torch.inference_mode()
def test_device_map_across_gpus_gives_the_single_gpu_output(gpu_model, real_prompts):
    from harness.model import load_model

    spread = load_model(None, "cuda", "bfloat16", "balanced", exits="none")
    assert len(set(map(str, spread.layer_devices))) == 2
    ids = gpu_model.encode(real_prompts[4])
    for cfg in (dict(), dict(generation_strategy="self_speculative", exit_layer=8, num_speculations=3)):
        a = build_generator(gpu_model, GenerationConfig(**cfg)).generate(ids, StopCondition(gpu_model, 8, eos_ids=set()))
        b = build_generator(spread, GenerationConfig(**cfg)).generate(ids, StopCondition(spread, 8, eos_ids=set()))
        assert a.tokens == b.tokens
