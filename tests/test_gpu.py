"""GPU-only code paths (CUDA device, bf16, synchronized timers, device maps across GPUs).

Skipped without CUDA; on a GPU machine `make test` runs them. The measurement itself is checked on a GPU
with `python bench/measurement_check.py --device cuda --dtype bfloat16` (a benchmark, not a test).
"""
from __future__ import annotations

import pytest
import torch

from harness.config import GenerationConfig
from harness.generators import StopCondition, build_generator

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def gpu_model():
    from harness.model import load_model

    return load_model(None, "cuda", "bfloat16")


@cuda
@torch.inference_mode()
def test_self_speculation_is_lossless_on_the_gpu(gpu_model, real_prompts):
    for text in real_prompts[:4]:
        ids = gpu_model.encode(text)
        ar = build_generator(gpu_model, GenerationConfig()).generate(ids, StopCondition(gpu_model, 16, eos_ids=set()))
        ss = build_generator(gpu_model, GenerationConfig(generation_strategy="self_speculative", exit_layer=8,
                                                         num_speculations=4)).generate(
            ids, StopCondition(gpu_model, 16, eos_ids=set()))
        assert ss.tokens == ar.tokens


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

    spread = load_model(None, "cuda", "bfloat16", "balanced")
    assert len(set(map(str, spread.layer_devices))) == 2
    ids = gpu_model.encode(real_prompts[4])
    for cfg in (dict(), dict(generation_strategy="self_speculative", exit_layer=8, num_speculations=3)):
        a = build_generator(gpu_model, GenerationConfig(**cfg)).generate(ids, StopCondition(gpu_model, 8, eos_ids=set()))
        b = build_generator(spread, GenerationConfig(**cfg)).generate(ids, StopCondition(spread, 8, eos_ids=set()))
        assert a.tokens == b.tokens
