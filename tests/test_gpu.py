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


@pytest.fixture(scope="module")
def gpu_model():
    from harness.model import load_model

    return load_model(None, "cuda", "bfloat16", exits="none")


@pytest.fixture(scope="module")
def gpu_model_fp32():
    from harness.model import load_model

    return load_model(None, "cuda", "float32", exits="none")


def _lossless_matches(model, prompts, dtype: str, n: int = 24):
    ar = build_generator(model, GenerationConfig())
    out = []
    for text in prompts:
        ids = model.encode(text)
        ref = ar.generate(ids, StopCondition(model, n, eos_ids=set()))
        for cfg in LOSSLESS:
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
