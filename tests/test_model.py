"""The layer-addressable core against transformers' own forward, on the real embedded model."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from harness.config import UsageError
from harness.model import KVHoleError, cache_root, resolve_checkpoint


def _ids(model, text):
    return torch.tensor([model.encode(text)])


@torch.inference_mode()
def test_layers_in_pieces_match_transformers_forward(model, real_prompts):
    x = _ids(model, real_prompts[0])
    ref = model.hf(x).logits
    cache = model.new_cache()
    h = model.embed(x)
    for start, stop in [(0, 7), (7, 8), (8, 21), (21, model.num_layers)]:
        h = model.run_layers(h, start, stop, cache, 0)
    assert torch.allclose(model.exit_logits(h), ref, atol=1e-5, rtol=0)
    assert model.cache_lengths(cache) == [x.shape[1]] * model.num_layers


@torch.inference_mode()
def test_prefill_then_stepwise_decode_equals_full_forward(model, real_prompts):
    x = _ids(model, real_prompts[4])
    n = x.shape[1]
    ref = model.hf(x).logits[0]
    cache = model.new_cache()
    split = n - 12
    out = [model.exit_logits(model.run_layers(model.embed(x[:, :split]), 0, model.num_layers, cache, 0))[0]]
    # a 3-token chunk after cached positions exercises the bottom-right causal mask
    out.append(model.exit_logits(model.run_layers(model.embed(x[:, split:split + 3]), 0, model.num_layers, cache, split))[0])
    for p in range(split + 3, n):
        out.append(model.exit_logits(model.run_layers(model.embed(x[:, p:p + 1]), 0, model.num_layers, cache, p))[0])
    got = torch.cat(out)
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() < 1e-3
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


@torch.inference_mode()
def test_crop_then_redecode_equals_never_going_further(model, real_prompts):
    x = _ids(model, real_prompts[2])
    n = x.shape[1]
    keep = n - 5
    # reference: prefix then one token, never went further
    ref_cache = model.new_cache()
    model.run_layers(model.embed(x[:, :keep]), 0, model.num_layers, ref_cache, 0)
    ref = model.exit_logits(model.run_layers(model.embed(x[:, keep:keep + 1]), 0, model.num_layers, ref_cache, keep))
    # went 5 tokens further (some only partly deep), then cropped back
    cache = model.new_cache()
    model.run_layers(model.embed(x[:, :keep]), 0, model.num_layers, cache, 0)
    model.run_layers(model.embed(x[:, keep:n]), 0, model.num_layers, cache, keep)
    model.run_layers(model.embed(x[:, :1]), 0, 4, cache, n)  # extra shallow-only position
    model.crop(cache, keep)
    assert model.cache_lengths(cache) == [keep] * model.num_layers
    got = model.exit_logits(model.run_layers(model.embed(x[:, keep:keep + 1]), 0, model.num_layers, cache, keep))
    assert torch.allclose(got, ref, atol=1e-5, rtol=0)


@torch.inference_mode()
def test_kv_hole_is_refused(model):
    cache = model.new_cache()
    x = _ids(model, "A short sentence about early exits.")
    n = x.shape[1]
    model.run_layers(model.embed(x), 0, model.num_layers, cache, 0)
    model.run_layers(model.embed(x[:, :1]), 0, 6, cache, n)  # token n exits after 6 layers
    h = model.run_layers(model.embed(x[:, 1:2]), 0, 6, cache, n + 1)
    with pytest.raises(KVHoleError, match="layer 6 holds"):
        model.run_layers(h, 6, model.num_layers, cache, n + 1)  # layer 6 never saw position n


@torch.inference_mode()
def test_reduced_vocabulary_head_matches_full_head_rows(model):
    h = model.run_layers(model.embed(_ids(model, "Paris is the capital of")), 0, 10, model.new_cache(), 0)
    rows = torch.tensor([5, 17, 4000, 49151])
    full = model.exit_logits(h)
    assert torch.allclose(model.exit_logits(h, rows), full[..., rows], atol=1e-5)


def test_gguf_is_converted_once_and_cached(model):
    name, where, local = resolve_checkpoint(None)
    assert name == "SmolLM2-135M-Instruct" and local
    assert where.startswith(str(cache_root()))
    assert (Path(where) / "model.safetensors").is_file()
    assert "quantization_config" not in open(f"{where}/config.json").read()


def test_cache_location_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("EE_HARNESS_CACHE", str(tmp_path))
    assert cache_root() == tmp_path


@pytest.mark.parametrize("spec,match", [("/no/such/dir", "not a transformers directory"),
                                        ("missing.gguf", "no such .gguf file")])
def test_bad_model_values_are_usage_errors(spec, match):
    with pytest.raises(UsageError, match=match):
        resolve_checkpoint(spec)


def test_directory_without_config_is_refused(tmp_path):
    with pytest.raises(UsageError, match="no config.json"):
        resolve_checkpoint(str(tmp_path))
