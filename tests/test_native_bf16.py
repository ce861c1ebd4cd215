"""The native bf16 kernels (harness/native_bf16.py): right within bf16 rounding, batch-invariant bit for bit, and
what makes greedy speculative decoding in bf16 token-identical to bf16 autoregressive decoding. Skipped where the
kernels do not build (no AVX512-BF16 or no C compiler); the fallback's reporting is tested everywhere."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from harness import native_bf16
from harness.config import GenerationConfig
from harness.generators import build_generator
from harness.generators.base import StopCondition

needs_native = pytest.mark.skipif(native_bf16.library() is None,
                                  reason=f"native bf16 kernels unavailable: {native_bf16.status().get('why')}")
# both product kernels where the CPU has AMX (the AVX512-BF16 one is what an AMD Zen 4 runs)
KINDS = [pytest.param(True, id="amx", marks=pytest.mark.skipif(not native_bf16._amx, reason="no AMX here")),
         pytest.param(False, id="avx512")]


@needs_native
@pytest.mark.parametrize("amx", KINDS)
@pytest.mark.parametrize("rows,n,k,bias", [(1, 960, 576, False), (7, 1001, 577, True), (16, 13, 40, True),
                                           (16, 576, 1536, True), (5, 3072, 576, False), (12, 1001, 577, True)])
def test_linear_matches_a_float_reference_and_each_row_is_computed_alone(rows, n, k, bias, amx, monkeypatch):
    monkeypatch.setattr(native_bf16, "_amx", amx)
    g = torch.Generator().manual_seed(rows * n)
    x = torch.randn(rows, k, generator=g).bfloat16()
    w = (torch.randn(n, k, generator=g) * 0.05).bfloat16()
    b = torch.randn(n, generator=g) if bias else None
    got = native_bf16.linear(x, w, b)
    want = x.float() @ w.float().T + (b if bias else 0)
    # one bf16 rounding of an fp32 sum: within half an ulp of bf16 (2^-8 relative) plus fp32 summation noise
    assert torch.allclose(got.float(), want, rtol=2 ** -8, atol=1e-3 * float(want.abs().max()))
    for i in range(rows):  # batch invariance: a row alone gives the very bits it got among the others
        assert torch.equal(native_bf16.linear(x[i:i + 1].contiguous(), w, b)[0], got[i])


@needs_native
@pytest.mark.parametrize("rows,n,k,bias", [(2, 1536, 576, False), (8, 1001, 577, True), (16, 13, 40, True),
                                           (5, 7, 1100, True), (3, 49152 // 64, 576, False), (12, 1001, 577, True),
                                           (7, 6, 33, False)])
def test_fp32_verification_product_matches_float64_and_each_row_is_computed_alone(rows, n, k, bias):
    g = torch.Generator().manual_seed(rows * n + k)
    x = torch.randn(rows, k, generator=g)
    w = torch.randn(n, k, generator=g) * 0.05
    b = torch.randn(n, generator=g) if bias else None
    got = native_bf16.linear_f32(x, w, b)
    want = x.double() @ w.double().T + (b.double() if bias else 0)
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5)
    for i in range(rows):  # the same bits alone and in a pass of 2 rows as among all of them (other pass kernels)
        pair = native_bf16.linear_f32(torch.stack([x[i], x[(i + 1) % rows]]), w, b)
        assert torch.equal(pair[0], got[i]) and torch.equal(native_bf16.linear_f32(x[i:i + 1], w, b)[0], got[i])


@needs_native
@pytest.mark.parametrize("amx", KINDS)
@pytest.mark.parametrize("heads,kv_heads,dim,q_len,end", [(9, 3, 64, 5, 700), (12, 2, 128, 16, 37), (4, 4, 48, 3, 19)])
def test_attention_is_causal_softmax_attention_per_query_and_batch_invariant(heads, kv_heads, dim, q_len, end, amx,
                                                                             monkeypatch):
    monkeypatch.setattr(native_bf16, "_amx", amx)  # scores on tiles, or dot_row (and always for dim 48)
    g = torch.Generator().manual_seed(0)
    cap = 1024
    q = torch.randn(1, heads, q_len, dim, generator=g).bfloat16()
    k = (torch.randn(1, kv_heads, cap, dim, generator=g) * 3).bfloat16()
    v = torch.randn(1, kv_heads, cap, dim, generator=g).bfloat16()
    k[:, :, end:] = float("nan")  # beyond the valid positions: never read
    got = native_bf16.attention(q, k, v, end, 0.125)
    for i in range(q_len):
        n = end - q_len + i + 1
        kk = k[0, :, :n].float().repeat_interleave(heads // kv_heads, 0)
        vv = v[0, :, :n].float().repeat_interleave(heads // kv_heads, 0)
        want = ((q[0, :, i:i + 1].float() @ kk.transpose(1, 2)) * 0.125).softmax(-1) @ vv
        assert torch.allclose(got[0, i].float(), want[:, 0].reshape(-1), atol=8e-3)
        alone = native_bf16.attention(q[:, :, i:i + 1], k, v, end - q_len + i + 1, 0.125)
        assert torch.equal(alone[0, 0], got[0, i])


@pytest.fixture(scope="module")
def bf16_native():
    from harness.model import load_model

    return load_model(None, "cpu", "bfloat16", exits="auto")


@needs_native
@pytest.mark.parametrize("amx", KINDS)
@torch.inference_mode()
def test_a_verification_pass_gives_the_logits_of_one_position_steps(bf16_native, real_prompts, amx, monkeypatch):
    m = bf16_native
    monkeypatch.setattr(native_bf16, "_amx", amx)
    m.use_core("lean")  # rebuilt with this product kernel
    kind = "amx" if amx else "avx512-bf16"
    assert m.core_summary()["layer_kernel"].startswith(f"native-{kind} (<= 16 positions)")
    ids = m.encode(real_prompts[0])[-300:]
    new = m.encode(" and then the results were reported to the committee")[:9]

    def logits(tokens, cache, pos):
        h = m.run_layers(m.embed(torch.tensor([tokens])), 0, m.num_layers, cache, pos)
        return m.exit_logits(h)[0]

    one, block = m.new_cache(), m.new_cache()
    logits(ids, one, 0), logits(ids, block, 0)
    steps = torch.cat([logits([t], one, len(ids) + i) for i, t in enumerate(new)])
    assert torch.equal(logits(new, block, len(ids)), steps)
    monkeypatch.undo()
    m.use_core("lean")  # back to this machine's own kernel for the next test


@needs_native
@torch.inference_mode()
def test_greedy_speculative_decoding_in_bf16_is_token_identical_to_autoregressive(bf16_native):
    from harness.tasks import load_examples

    m = bf16_native
    prompts = [e.prompt for e in load_examples("cnn_dm_summarization", 2) + load_examples("gsm8k", 1)
               + load_examples("xsum_summarization", 1)]
    ar = build_generator(m, GenerationConfig())
    methods = [GenerationConfig(generation_strategy="prompt_lookup"),
               # an explicit exit: without one, the artifact's re-costed verdict decides, and on this CPU it sits
               # near 1.0x (a "don't speculate" refuses the run without --exit_layer)
               GenerationConfig(generation_strategy="hybrid_speculative", exit_layer=6, num_speculations=2),
               GenerationConfig(generation_strategy="self_speculative", exit_layer=8, num_speculations=4),
               GenerationConfig(generation_strategy="eagle"),
               GenerationConfig(generation_strategy="kangaroo")]
    verified = 0
    for text in prompts:
        ids = m.encode(text)[-700:]
        ref = ar.generate(ids, StopCondition(m, 40, eos_ids=set())).tokens
        for cfg in methods:
            got = build_generator(m, cfg).generate(ids, StopCondition(m, 40, eos_ids=set()))
            assert got.tokens == ref, (cfg.generation_strategy, text[:60])
            verified += got.verify_passes or 0
    assert verified > 0


@needs_native
@torch.inference_mode()
def test_exit_adapters_and_the_candidate_head_run_the_native_product_and_follow_their_weights(bf16_native):
    """The draft path's small products (an exit adapter's, the candidate-row head) run natively, agree with torch's
    within bf16 rounding, and are prepared again when a weight changes (a product of stale weights is wrong)."""
    m = bf16_native
    lean = m.lean()
    layer = next(iter(m.adapters))
    adapter = m.adapters[layer]
    h = torch.randn(1, 1, m.hidden_size, generator=torch.Generator().manual_seed(0)).bfloat16()
    native = m.exit_logits(h, m.exit_vocab, layer=layer).float()
    torch_path = F.linear(m.norm(adapter(h)), m._exit_weight).float()
    assert torch.allclose(native, torch_path, rtol=2 ** -6, atol=0.05 * float(torch_path.abs().max()))
    assert {id(adapter.up.weight), id(adapter.down.weight), id(m._exit_weight)} <= set(lean.products)
    assert all(lean.products[id(w)][1].native is not None for w in (adapter.up.weight, m._exit_weight))
    before = lean.product(m._exit_weight)
    saved = m._exit_weight
    try:
        m._exit_weight = saved * 2  # another tensor (set_exits gathers a new one): a new product
        doubled = m.exit_logits(h, m.exit_vocab, layer=layer).float()
        assert lean.product(m._exit_weight) is not before
        assert torch.allclose(doubled, 2 * native, rtol=2 ** -6, atol=0.05 * float(native.abs().max()))
    finally:
        m._exit_weight = saved


@needs_native
@torch.inference_mode()
def test_a_draft_layer_attends_natively_as_torch_does(bf16_native):
    """A draft module's layer (the shipped EAGLE head's) drafting after a cache: native attention and products
    against its torch path (SDPA, oneDNN), one position and a catch-up chunk, within bf16 rounding."""
    from harness.generators import eagle
    from harness.lean_layers import LayerKV

    m = bf16_native
    layer = eagle.stored(m).layer
    assert layer._native and layer._packed["q_proj"].native is not None
    x = torch.randn(1, 300, m.hidden_size, generator=torch.Generator().manual_seed(0)).bfloat16()
    cos, sin = m.rotary(x, 0)
    try:
        for q in (1, 3):
            outs = []
            for native in (True, False):
                layer.pack(native)
                kv = LayerKV()
                layer(x[:, :290], cos[:, :290], sin[:, :290], kv)
                outs.append(layer(x[:, 290:290 + q], cos[:, 290:290 + q], sin[:, 290:290 + q], kv).float())
            assert torch.allclose(outs[0], outs[1], rtol=2 ** -6, atol=2 ** -6 * float(outs[1].abs().max()))
    finally:
        layer.pack(True)


def test_the_library_core_and_an_unbuildable_kernel_are_reported(monkeypatch, tmp_path, capsys):
    from harness.lean_layers import native_products

    assert not native_products(torch.bfloat16, torch.device("cpu"), "lean-library")
    assert not native_products(torch.float32, torch.device("cpu"), "lean")
    monkeypatch.setenv("EE_HARNESS_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "no-such-compiler-xyz")
    monkeypatch.setattr(native_bf16, "_tried", False)
    monkeypatch.setattr(native_bf16, "_lib", None)
    monkeypatch.setattr(native_bf16, "_why", None)
    if native_bf16._cpu_has_bf16():
        assert native_bf16.library() is None
        assert native_bf16.status() == {"available": False, "why": "no C compiler (no-such-compiler-xyz) on PATH"}
        monkeypatch.setattr(native_bf16, "_warned", False)
        native_bf16.warn_unavailable()
        native_bf16.warn_unavailable()  # once per process
        err = capsys.readouterr().err
        assert err.count("native bf16 kernels unavailable (no C compiler") == 1
    monkeypatch.setattr(native_bf16, "_tried", False)
    monkeypatch.setenv("EE_HARNESS_NATIVE", "0")
    assert native_bf16.library() is None and native_bf16.status()["why"] == "EE_HARNESS_NATIVE=0"
    assert not native_products(torch.bfloat16, torch.device("cpu"), "lean")
    monkeypatch.setattr(native_bf16, "_tried", False)  # the next user rebuilds from the real environment


@needs_native
@torch.inference_mode()
def test_the_native_layer_is_as_close_to_fp32_as_the_library_kernels(bf16_native, real_prompts):
    """Its own rounding, not transformers' op for op: judged by the distance to fp32 logits on real text, against
    the library path's distance (oneDNN, SDPA, torch's elementwise operators) on the same positions."""
    from harness.model import load_model

    fp32 = load_model(None, "cpu", "float32", exits="none")
    ids = fp32.encode(real_prompts[4])[-300:]
    toks = fp32.encode(" The answer follows from the numbers given in the question, step by step.")[:16]

    def logits(m):
        cache = m.new_cache()
        m.run_layers(m.embed(torch.tensor([ids])), 0, m.num_layers, cache, 0)
        return torch.cat([m.exit_logits(m.run_layers(m.embed(torch.tensor([[t]])), 0, m.num_layers, cache,
                                                     len(ids) + i))[0].float() for i, t in enumerate(toks)])

    ref = logits(fp32)
    m = bf16_native
    m.use_core("lean")
    assert m.lean().layers[0].native_layer
    native = (logits(m) - ref).abs().mean()
    m.use_core("lean-library")
    library = (logits(m) - ref).abs().mean()
    m.use_core("lean")
    assert native < 0.2 and native <= 1.25 * library, (float(native), float(library))


@needs_native
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@torch.inference_mode()
def test_other_architectures_in_bf16_odd_shapes_and_biases(arch):
    """Tiny random models whose shapes are not the tiles' (hidden 72, head_dim 24: the AVX512 kernel and masked
    tails), Qwen2's q/k/v biases, and Qwen3's q/k norms (products native, the layer through torch's operators):
    close to the library path, and speculative output equal to autoregressive."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

    from harness.model import LayeredModel

    small = dict(vocab_size=160, hidden_size=72, intermediate_size=136, num_hidden_layers=4, num_attention_heads=3,
                 num_key_value_heads=1, max_position_embeddings=256, eos_token_id=0)
    torch.manual_seed(0)
    cfg = {"llama": lambda: LlamaConfig(**small), "qwen2": lambda: Qwen2Config(**small),
           "qwen3": lambda: Qwen3Config(**small, head_dim=24)}[arch]()
    hf = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval().to(torch.bfloat16)

    class Tok:
        eos_token_id = 0
        chat_template = None

        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    m = LayeredModel(hf, Tok(), name=arch)
    assert m.lean().native and m.lean().layers[0].native_layer == (arch != "qwen3")
    ids = torch.randint(1, 160, (1, 30))

    def logits():
        cache = m.new_cache()
        m.run_layers(m.embed(ids[:, :20]), 0, 4, cache, 0)
        return torch.cat([m.exit_logits(m.run_layers(m.embed(ids[:, p:p + 1]), 0, 4, cache, p))
                          for p in range(20, 30)], 1).float()

    native = logits()
    m.use_core("lean-library")
    library = logits()
    m.use_core("lean")
    assert torch.allclose(native, library, atol=0.1 * float(library.abs().max())), arch
    prompt = ids[0, :20].tolist()
    stop = StopCondition(m, 12, eos_ids=set())
    ar = build_generator(m, GenerationConfig()).generate(prompt, stop)
    ss = build_generator(m, GenerationConfig(generation_strategy="self_speculative", exit_layer=2,
                                             num_speculations=3)).generate(prompt, stop)
    assert ss.tokens == ar.tokens and (ss.verify_passes or 0) > 0
