"""The lean core (harness/lean_layers.py) against transformers' layers, and --dtype auto's decision."""
from __future__ import annotations

import json

import pytest
import torch

from harness.config import GenerationConfig
from harness.generators import build_generator
from harness.generators.base import StopCondition


def _greedy(model, ids, n=16):
    return build_generator(model, GenerationConfig()).generate(ids, StopCondition(model, n, eos_ids=set())).tokens


@torch.inference_mode()
def test_lean_core_gives_transformers_tokens_and_logits_in_fp32(model, real_prompts):
    ids = model.encode(real_prompts[1])
    lean = _greedy(model, ids)
    x = torch.tensor([ids])
    c = model.new_cache()
    a = model.exit_logits(model.run_layers(model.embed(x), 0, model.num_layers, c, 0))
    assert model.core_summary()["core"] == "lean"
    model.core = "transformers"
    try:
        assert _greedy(model, ids) == lean
        c = model.new_cache()
        b = model.exit_logits(model.run_layers(model.embed(x), 0, model.num_layers, c, 0))
    finally:
        model.core = "lean"
    assert torch.equal(a, b)  # op for op: bit-identical in fp32


@torch.inference_mode()
def test_a_weight_changed_in_place_is_repacked(model, real_prompts):
    ids = torch.tensor([model.encode(real_prompts[0])[:40]])
    run = lambda: model.run_layers(model.embed(ids), 0, 3, model.new_cache(), 0)  # noqa: E731
    before = run()
    w = model.layers[1].mlp.down_proj.weight
    with torch.no_grad():
        saved = w.clone()
        w.mul_(0.5)
    try:
        model.core = "transformers"
        want = run()
        model.core = "lean"
        assert torch.equal(run(), want) and not torch.equal(want, before)
    finally:
        with torch.no_grad():
            w.copy_(saved)
        model.core = "lean"
    assert torch.equal(run(), before)


def test_preallocated_cache_crops_by_moving_a_length():
    from harness.lean_layers import StaticKV

    kv = StaticKV()
    k = torch.arange(2 * 3 * 4, dtype=torch.float32).view(1, 2, 3, 4)
    keys, _ = kv.update(k, k, 0)
    assert keys.shape[2] == 3 and kv.get_seq_length() == 3
    kv.layers[0].crop(-2)
    assert kv.layers[0].keys.shape[2] == 1 and torch.equal(kv.layers[0].keys, k[:, :, :1])
    big = torch.ones(1, 2, 600, 4)
    keys, _ = kv.update(big, big, 0)  # grows past the first buffer, keeping what was there
    assert keys.shape[2] == 601 and torch.equal(keys[:, :, :1], k[:, :, :1])


def test_dtype_auto_follows_the_measurement_and_caches_it(tmp_path, monkeypatch):
    from harness import dtype_choice as dc

    calls = []
    monkeypatch.setattr(dc, "cpu_has_native_bf16", lambda: True)
    for fp32, bf16, want in ((0.10, 0.05, torch.bfloat16), (0.10, 0.095, torch.float32)):
        times = {torch.float32: fp32, torch.bfloat16: bf16}
        monkeypatch.setattr(dc, "step_seconds", lambda dt: calls.append(dt) or times[dt])
        folder = tmp_path / str(want)
        got, why = dc.choose(torch.device("cpu"), folder)
        assert got == want and why["resolved"] == str(want).removeprefix("torch.")
        assert dc.choose(torch.device("cpu"), folder)[0] == want  # second time: from the cache
        assert json.loads((folder / "dtype_choice.json").read_text())[dc.machine_key()]["bfloat16"] == bf16
    assert len(calls) == 4  # measured once per machine (two dtypes), not again from the cache
    monkeypatch.setattr(dc, "cpu_has_native_bf16", lambda: False)
    got, why = dc.choose(torch.device("cpu"), tmp_path / "none")
    assert got == torch.float32 and "no native bf16" in why["why"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_dtype_auto_on_cuda_is_bf16_where_the_gpu_computes_it(tmp_path):
    from harness.dtype_choice import choose

    got, _ = choose(torch.device("cuda"), tmp_path)
    assert got == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32)
