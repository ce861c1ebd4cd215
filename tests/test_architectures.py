"""The core on other Llama-family architectures: tiny randomly initialised models (no download)."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, MistralConfig, Qwen2Config, Qwen3Config

from harness.config import GenerationConfig
from harness.generators import StopCondition, build_generator
from harness.model import LayeredModel

SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, eos_token_id=0)


class _Tok:  # the generators only need eos ids and decode from the tokenizer
    eos_token_id = 0
    chat_template = None

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


@pytest.fixture(params=["mistral", "qwen2", "qwen3"])
def tiny(request):
    torch.manual_seed(0)
    cfg = {"mistral": lambda: MistralConfig(**SMALL, sliding_window=None),
           "qwen2": lambda: Qwen2Config(**SMALL),
           "qwen3": lambda: Qwen3Config(**SMALL, head_dim=16)}[request.param]()
    hf = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    return LayeredModel(hf, _Tok(), name=request.param)


@torch.inference_mode()
def test_pieces_and_incremental_decode_match_forward(tiny):
    ids = torch.randint(1, 128, (1, 12))
    ref = tiny.hf(ids).logits
    cache = tiny.new_cache()
    h = tiny.run_layers(tiny.embed(ids[:, :8]), 0, 2, cache, 0)
    h = tiny.run_layers(h, 2, 4, cache, 0)
    out = [tiny.exit_logits(h)]
    h = tiny.run_layers(tiny.embed(ids[:, 8:10]), 0, 4, cache, 8)  # chunk after cached positions
    out.append(tiny.exit_logits(h))
    for p in (10, 11):
        out.append(tiny.exit_logits(tiny.run_layers(tiny.embed(ids[:, p:p + 1]), 0, 4, cache, p)))
    assert torch.allclose(torch.cat(out, 1), ref, atol=1e-4)


@torch.inference_mode()
def test_state_copying_equals_real_kv_for_the_true_input(tiny):
    ids = torch.randint(1, 128, (1, 6))
    a, b = tiny.new_cache(), tiny.new_cache()
    h = tiny.run_layers(tiny.embed(ids), 0, 2, a, 0)
    tiny.run_layers(tiny.embed(ids), 0, 2, b, 0)
    tiny.run_layers(h, 2, 3, a, 0)
    tiny.fill_kv(h, 2, 3, b, 0)  # the K/V of layer 2 depend only on its input
    assert torch.allclose(a.layers[2].keys, b.layers[2].keys, atol=1e-6)
    assert torch.allclose(a.layers[2].values, b.layers[2].values, atol=1e-6)


@torch.inference_mode()
def test_self_speculation_is_lossless_on_other_architectures(tiny):
    prompt = torch.randint(1, 128, (10,)).tolist()
    stop = StopCondition(tiny, 12, eos_ids=set())
    ar = build_generator(tiny, GenerationConfig()).generate(prompt, stop)
    ss = build_generator(tiny, GenerationConfig(generation_strategy="self_speculative", exit_layer=2,
                                                num_speculations=3)).generate(prompt, stop)
    assert ss.tokens == ar.tokens


def test_attention_other_than_sdpa_is_refused():
    from harness.config import UsageError

    hf = AutoModelForCausalLM.from_config(MistralConfig(**SMALL, sliding_window=None), attn_implementation="eager")
    with pytest.raises(UsageError, match="attention implementation 'eager'"):
        LayeredModel(hf, _Tok())


@torch.inference_mode()
def test_sliding_window_configs_are_exact_inside_the_window_and_refused_past_it():
    from harness.config import UsageError

    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(MistralConfig(**SMALL, sliding_window=16), attn_implementation="sdpa").eval()
    m = LayeredModel(hf, _Tok(), name="mistral-swa")
    assert m.window == 16 and m.max_context == 16
    cache = m.new_cache()
    ids = torch.randint(1, 128, (1, 16))
    h = m.run_layers(m.embed(ids[:, :10]), 0, 4, cache, 0)
    for p in range(10, 16):  # a plain cache: nothing dropped, so crop and masks stay exact
        h = m.run_layers(m.embed(ids[:, p:p + 1]), 0, 4, cache, p)
    assert m.cache_lengths(cache) == [16] * 4
    assert torch.allclose(m.exit_logits(h), hf(ids).logits[:, -1:], atol=1e-4)
    with pytest.raises(UsageError, match="sliding window"):
        m.run_layers(m.embed(ids[:, :1]), 0, 4, cache, 16)
