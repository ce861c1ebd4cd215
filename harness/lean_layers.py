"""The decode-time core: a preallocated KV cache, packed linear kernels and a lean decoder-layer forward.

Why it exists (measured on the team's 2-core AVX512-BF16 CPU; `bench/core_costs.py --cores transformers lean`):
- transformers' layer call costs ~0.7 ms per layer beyond its matrix products (module dispatch, kwargs plumbing,
  a `torch.cat` of the whole K/V per layer per step in DynamicCache): 30 layers add ~20 ms to a 42 ms fp32 step.
- `F.linear` in bf16 runs oneDNN without a pre-packed weight: the layers' products take 22 ms where the same
  weights pre-packed (`torch.ops.mkldnn._reorder_linear_weight`) take 15.5 ms, flat from 1 to 8 positions.
- fp32's MKL path is at the memory floor for one position (gemv) but not for 4-8 (35-43 ms vs 20); no library
  kernel was flat there (oneDNN packed: 28-34 ms at every M; MKL packed per batch size: 27 ms at M=4 only). The
  fp32 head alone (113 MB) is packed: 3.3 ms at M=1 and 4.7 at M=8, against 3.3 and 10.5 unpacked.

The lean forward reproduces transformers' Llama/Mistral/Qwen2/Qwen3 decoder layer operation by operation (the same
RMSNorm arithmetic, rotary convention, GQA handling and SDPA call), fusing q/k/v and gate/up into one product each.
It runs only where nothing needs transformers' modules: inference (no autograd), one device, plain `nn.Linear`
projections (no PEFT wrappers) and weights unchanged since they were packed (`LeanLayer.stale` checks versions; a changed layer is repacked).
Elsewhere `LayeredModel` calls transformers' layers on the same cache (`StaticKV.update` speaks their protocol).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import hugepages, native_bf16


# -- cache ----------------------------------------------------------------------
class LayerKV:
    """One layer's K/V in a preallocated buffer; `length` positions are valid, cropping just moves it."""

    __slots__ = ("k", "v", "length")

    def __init__(self):
        self.k: Optional[torch.Tensor] = None  # (batch, kv_heads, capacity, head_dim)
        self.v: Optional[torch.Tensor] = None
        self.length = 0  # valid positions

    def get_seq_length(self) -> int:
        return self.length

    @property
    def keys(self) -> Optional[torch.Tensor]:
        """The valid K (as DynamicCache's layers name it)."""
        return None if self.k is None else self.k[:, :, :self.length]

    @property
    def values(self) -> Optional[torch.Tensor]:
        """The valid V."""
        return None if self.v is None else self.v[:, :, :self.length]

    def crop(self, n: int) -> None:
        """transformers' semantics: n < 0 drops the last -n positions, n >= 0 keeps the first n."""
        self.length = max(0, self.length + n) if n < 0 else min(self.length, n)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write K/V of the new positions after the valid ones; return views of every valid position."""
        end = self.length + k.shape[2]
        if self.k is None or end > self.k.shape[2]:
            self._grow(k, v, end)
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def reserve(self, batch: int, heads: int, dim: int, dtype: torch.dtype, device, need: int) -> None:
        """Make room for `need` positions (the native layer writes K/V into the buffers itself)."""
        if self.k is None or need > self.k.shape[2]:
            empty = torch.empty((batch, heads, 0, dim), dtype=dtype, device=device)
            self._grow(empty, empty, need)

    def _grow(self, k: torch.Tensor, v: torch.Tensor, need: int) -> None:
        # Doubling keeps the copies amortized O(1) per position; 256 covers short prompts without a regrowth.
        cap = max(256, need, 2 * (self.k.shape[2] if self.k is not None else 0))
        new_k = k.new_empty((k.shape[0], k.shape[1], cap, k.shape[3]))
        new_v = v.new_empty((v.shape[0], v.shape[1], cap, v.shape[3]))
        if self.k is not None and self.length:
            new_k[:, :, :self.length] = self.k[:, :, :self.length]
            new_v[:, :, :self.length] = self.v[:, :, :self.length]
        self.k, self.v = new_k, new_v


class StaticKV:
    """Per-layer K/V buffers addressed like transformers' DynamicCache (`layers[i]`, `update`, `crop`)."""

    def __init__(self):
        self.layers: list[LayerKV] = []

    def layer(self, i: int) -> LayerKV:
        while len(self.layers) <= i:
            self.layers.append(LayerKV())
        return self.layers[i]

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        """transformers' cache protocol: append and return the layer's whole K/V."""
        return self.layer(layer_idx).append(key, value)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].length if layer_idx < len(self.layers) else 0

    def crop(self, length: int) -> None:
        for kv in self.layers:
            kv.crop(length)


# -- linear kernels ---------------------------------------------------------------
def _mkldnn_usable() -> bool:
    return hasattr(torch.ops, "mkldnn") and hasattr(torch.ops.mkldnn, "_reorder_linear_weight") \
        and torch.backends.mkldnn.is_available()


class PackedLinear:
    """y = x @ W.T (+ b): the native bf16 kernel for up to `native_bf16.ROWS` rows where `native` (CPU bf16), W
    pre-packed for oneDNN (CPU), or plain `F.linear` where packing does not pay."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], pack: bool,
                 packed_rows: tuple[int, int] = (1, 1 << 62), native: bool = False, native_f32: bool = False):
        self.weight = weight.detach()
        # fp32 decode passes (F32_MIN_ROWS..ROWS rows) on the native kernel, on the weight as it is (no copy)
        self.native_f32 = native_f32 and weight.dtype == torch.float32 and weight.device.type == "cpu" \
            and self.weight.is_contiguous() and (bias is None or bias.dtype == torch.float32)
        self.packed_rows = packed_rows  # input rows (positions) for which the packed kernel runs
        self.bias = bias.detach() if bias is not None else None
        self.packed = None
        self.native = None  # native_bf16.Weight: the weight made ready for the native kernel
        if native and weight.dtype == torch.bfloat16 and weight.device.type == "cpu":
            self.native = native_bf16.Weight(self.weight, self.bias)
        if pack and weight.device.type == "cpu" and _mkldnn_usable():
            try:
                packed = torch.ops.mkldnn._reorder_linear_weight(self.weight, 8)
                probe = torch.randn(3, weight.shape[1], dtype=weight.dtype)
                got = torch.ops.mkldnn._linear_pointwise(probe, packed, self.bias, "none", [], "")
                want = F.linear(probe, self.weight, self.bias)
                tol = 1e-3 if weight.dtype == torch.float32 else 5e-2
                if torch.allclose(got.float(), want.float(), rtol=tol, atol=tol * float(want.abs().max())):
                    self.packed = packed
            except (RuntimeError, NotImplementedError):  # a build without the op or this dtype: plain kernel
                self.packed = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.numel() // shape[-1]
        if self.native is not None and rows <= native_bf16.ROWS and x.dtype == torch.bfloat16:
            y = self.native(x.reshape(rows, shape[-1]).contiguous())
            return y.view(*shape[:-1], y.shape[-1])
        if self.native_f32 and F32_MIN_ROWS <= rows <= native_bf16.ROWS and x.dtype == torch.float32:
            y = native_bf16.linear_f32(x.reshape(rows, shape[-1]), self.weight,
                                       None if self.bias is None else self.bias.contiguous())
            return y.view(*shape[:-1], y.shape[-1])
        if self.packed is None or not self.packed_rows[0] <= rows <= self.packed_rows[1]:
            return F.linear(x, self.weight, self.bias)
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, shape[-1]), self.packed, self.bias, "none", [], "")
        return y.view(*shape[:-1], y.shape[-1])


F32_MIN_ROWS = 1  # fp32 passes of this many positions and up (to native_bf16.ROWS) run the native fp32 product


def pack_layers(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether decoder-layer products are packed: on CPU in bf16/fp16 (oneDNN's packed path is flat and faster);
    not in fp32, where MKL's unpacked gemv is already at the memory floor for one position."""
    return device.type == "cpu" and dtype in (torch.bfloat16, torch.float16)


def wants_native(dtype: torch.dtype, device: torch.device, core: str) -> bool:
    """Whether the core asks for the native bf16 kernels: CPU bf16 under --core lean."""
    return core == "lean" and device.type == "cpu" and dtype == torch.bfloat16


def native_products(dtype: torch.dtype, device: torch.device, core: str) -> bool:
    """Whether the native bf16 kernel runs the small products: where the core asks for it and it builds."""
    return wants_native(dtype, device, core) and native_bf16.library() is not None


def native_f32_products(dtype: torch.dtype, device: torch.device, core: str) -> bool:
    """Whether fp32 decode passes (1..native_bf16.ROWS positions) run the native fp32 product: CPU fp32 under
    --core lean where the kernels build. Prefill keeps MKL either way."""
    return core == "lean" and device.type == "cpu" and dtype == torch.float32 and native_bf16.library() is not None


def pack_head(dtype: torch.dtype, device: torch.device) -> bool:
    """The head is packed on CPU in every dtype: unpacked fp32 costs 3.2x at 8 positions what it costs at one."""
    return device.type == "cpu"


def head_packed_rows(dtype: torch.dtype) -> tuple[int, int]:
    """Positions for which the packed head runs. fp32: verification sizes only (2-16; where the native fp32
    product runs, it takes them first), so that a one-position step without it and a prefill keep MKL's exact
    arithmetic (greedy fp32 tokens stay those of transformers' forward); packed and unpacked fp32 logits differ by
    ~2e-6 relative."""
    return (2, 16) if dtype == torch.float32 else (1, 1 << 62)


# -- the lean layer -----------------------------------------------------------------
def _fused(linears: list[nn.Linear]):
    w = torch.cat([lin.weight.detach() for lin in linears], 0)
    biases = [lin.bias for lin in linears]
    if all(b is None for b in biases):
        return w, None
    return w, torch.cat([b.detach() if b is not None else w.new_zeros(lin.weight.shape[0])
                         for b, lin in zip(biases, linears)])


def lean_supported(layer: nn.Module) -> bool:
    """A layer the lean forward reproduces exactly: Llama-family attention + gated MLP, plain nn.Linear projections."""
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    names = ("q_proj", "k_proj", "v_proj", "o_proj")
    if attn is None or mlp is None or not all(type(getattr(attn, n, None)) is nn.Linear for n in names):
        return False
    if not all(type(getattr(mlp, n, None)) is nn.Linear for n in ("gate_proj", "up_proj", "down_proj")):
        return False
    norms = [layer.input_layernorm, layer.post_attention_layernorm]
    return all(hasattr(n, "weight") and hasattr(n, "variance_epsilon") for n in norms)


class LeanLayer:
    """One decoder layer's weights, fused and (maybe) packed, and its forward on a StaticKV."""

    def __init__(self, layer: nn.Module, index: int, pack: bool, native: bool = False, native_f32: bool = False):
        attn, mlp = layer.self_attn, layer.mlp
        self.head_dim = attn.head_dim
        self.q_dim = attn.q_proj.weight.shape[0]
        self.kv_dim = attn.k_proj.weight.shape[0]
        self.groups = self.q_dim // self.kv_dim
        self.scaling = attn.scaling
        self.in_w, self.in_eps = layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon
        self.post_w, self.post_eps = layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon
        self.q_norm = getattr(attn, "q_norm", None)  # Qwen3: per-head RMSNorm of queries and keys before rotary
        self.k_norm = getattr(attn, "k_norm", None)
        self.inter = mlp.gate_proj.weight.shape[0]
        # Fused products only where the weights are copied anyway (packing); otherwise the module's own tensors are
        # used as they are, so the lean core costs no memory (a GPU's 7B model is not duplicated).
        self.fused = pack
        self.native = native  # native bf16 products and attention for passes of <= native_bf16.ROWS positions
        if pack:
            self.qkv = PackedLinear(*_fused([attn.q_proj, attn.k_proj, attn.v_proj]), True, native=native)
            self.gate_up = PackedLinear(*_fused([mlp.gate_proj, mlp.up_proj]), True, native=native)
        else:
            self.q, self.k, self.v = (PackedLinear(p.weight, p.bias, False, native_f32=native_f32)
                                      for p in (attn.q_proj, attn.k_proj, attn.v_proj))
            self.gate, self.up = (PackedLinear(p.weight, p.bias, False, native_f32=native_f32)
                                  for p in (mlp.gate_proj, mlp.up_proj))
        self.o = PackedLinear(attn.o_proj.weight, attn.o_proj.bias, pack, native=native, native_f32=native_f32)
        self.down = PackedLinear(mlp.down_proj.weight, mlp.down_proj.bias, pack, native=native, native_f32=native_f32)
        self.act = mlp.act_fn
        if native:  # the layer's prepared weights in one huge-page arena: a decode step streams all of them
            native_bf16.rehome([lin.native for lin in self.linears() if lin.native is not None])
        # the whole layer in one native call: Llama's layer exactly (no q/k norms, SiLU, weights of the native kind)
        self.native_layer = native and pack and getattr(attn, "q_norm", None) is None \
            and type(mlp.act_fn).__name__ in ("SiLU", "SiLUActivation") \
            and all(lin.native is not None for lin in (self.qkv, self.o, self.gate_up, self.down))
        self.params = list(layer.parameters())
        self.versions = self._versions()

    def linears(self) -> list[PackedLinear]:
        """The layer's products."""
        names = ("qkv", "o", "gate_up", "down") if self.fused else ("q", "k", "v", "o", "gate", "up", "down")
        return [getattr(self, n) for n in names]

    def _versions(self) -> tuple:
        return tuple(_version(p) for p in self.params)

    def stale(self) -> bool:
        """Whether any weight changed (in place or replaced) since packing."""
        return self._versions() != self.versions

    @staticmethod
    def _rms(h: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        # transformers' LlamaRMSNorm arithmetic, step for step (fp32 variance, cast back, then the weight).
        x = h.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        return w * x.to(h.dtype)

    def forward(self, h: torch.Tensor, kv: LayerKV, cos: torch.Tensor, sin: torch.Tensor,
                mask: Optional[torch.Tensor]) -> torch.Tensor:
        b, q, _ = h.shape
        if self.native_layer and b == 1 and q <= native_bf16.ROWS:
            return native_bf16.layer(h, self, kv, cos, sin)
        qs, ks, vs = self._project(h, cos, sin)
        keys, values = kv.append(ks, vs)
        if self.native and b == 1 and q <= native_bf16.ROWS and self.head_dim <= 256:
            # batch-invariant attention: each query over its own prefix, as a one-position step computes it
            a = native_bf16.attention(qs, kv.k, kv.v, kv.length, self.scaling)
            h = h + self.o(a)
            return self._mlp(h)
        # As transformers' sdpa_attention_forward: GQA inside SDPA without a mask, repeated K/V with one.
        if mask is None:
            a = F.scaled_dot_product_attention(qs, keys, values, scale=self.scaling, is_causal=q > 1,
                                               enable_gqa=self.groups > 1)
        else:
            if self.groups > 1:
                keys = keys.repeat_interleave(self.groups, dim=1)
                values = values.repeat_interleave(self.groups, dim=1)
            a = F.scaled_dot_product_attention(qs, keys, values, attn_mask=mask, scale=self.scaling)
        h = h + self.o(a.transpose(1, 2).reshape(b, q, -1))
        return self._mlp(h)

    def _project(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Queries, keys and values of the new positions, rotated: (b, heads, q, head_dim) each."""
        b, q, _ = h.shape
        x = self._rms(h, self.in_w, self.in_eps)
        if self.fused:
            qs, ks, vs = self.qkv(x).split((self.q_dim, self.kv_dim, self.kv_dim), dim=-1)
        else:
            qs, ks, vs = self.q(x), self.k(x), self.v(x)
        qs = qs.view(b, q, -1, self.head_dim)
        ks = ks.view(b, q, -1, self.head_dim)
        if self.q_norm is not None:
            qs, ks = self.q_norm(qs), self.k_norm(ks)
        qs, ks, vs = qs.transpose(1, 2), ks.transpose(1, 2), vs.view(b, q, -1, self.head_dim).transpose(1, 2)
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        return qs * c + rotate_half(qs) * s, ks * c + rotate_half(ks) * s, vs

    def forward_static(self, h: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, cos: torch.Tensor,
                       sin: torch.Tensor, slots: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        """The same layer on fixed K/V buffers, every shape and address fixed (what a CUDA graph captures,
        harness.cuda_graphs): the new K/V go to `slots` (a device tensor of positions), and each query attends over
        every slot of the buffers, `masked` (True: a slot after the query's own position) left out.

        Attention as transformers' eager path computes it (scores in the model's dtype, softmax in fp32), with
        each K/V head's queries grouped into one product, so that no K/V is repeated. Why not SDPA: with its masked
        kernel over 4096 repeated slots, a graphed one-position pass cost 3.8 ms in bf16 and 17.2 ms in fp32 on an
        H200, where the weights stream in 0.1 ms (the first graphs check; docs/usage.md)."""
        b, q, _ = h.shape
        qs, ks, vs = self._project(h, cos, sin)
        k_buf.index_copy_(2, slots, ks)
        v_buf.index_copy_(2, slots, vs)
        kv_heads, dim = k_buf.shape[1], k_buf.shape[3]
        grouped = qs.reshape(b, kv_heads, self.groups * q, dim)  # query head kv*groups+g reads K/V head kv
        scores = torch.matmul(grouped, k_buf.transpose(2, 3)) * self.scaling
        scores = scores.masked_fill(masked, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(qs.dtype)
        a = torch.matmul(probs, v_buf).view(b, kv_heads * self.groups, q, dim)
        h = h + self.o(a.transpose(1, 2).reshape(b, q, -1))
        return self._mlp(h)

    def _mlp(self, h: torch.Tensor) -> torch.Tensor:
        x = self._rms(h, self.post_w, self.post_eps)
        if self.fused:
            g, u = self.gate_up(x).split((self.inter, self.inter), dim=-1)
        else:
            g, u = self.gate(x), self.up(x)
        return h + self.down(self.act(g) * u)


def _version(p: torch.Tensor) -> tuple[int, int]:
    """Where a weight lives and how often it was written in place (inference tensors carry no counter)."""
    return p.data_ptr(), (-1 if p.is_inference() else p._version)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Rotary helper shared by Llama, Mistral and Qwen2/3 (split-half convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class LeanCore:
    """Every decoder layer of a model in lean form, plus the packed full-vocabulary head (built once, on demand)."""

    def __init__(self, layers, lm_head: nn.Linear, dtype: torch.dtype, device: torch.device, core: str = "lean"):
        self.pack = pack_layers(dtype, device)
        self.pack_head = pack_head(dtype, device)
        self.native = native_products(dtype, device, core)
        self.native_f32 = native_f32_products(dtype, device, core)
        self.native_missing = wants_native(dtype, device, core) and not self.native  # asked for, could not build
        if self.native_missing:
            native_bf16.warn_unavailable()
        self.dtype, self.core = dtype, core
        self.layers = [LeanLayer(layer, i, self.pack, self.native, self.native_f32) for i, layer in enumerate(layers)]
        self.head = self.head_version = None
        self.full_head(lm_head)
        self.products: dict = {}  # id(weight) -> (its version, PackedLinear): small modules' products (product())
        self.graphs = None  # harness.cuda_graphs.GraphPool under --core lean-graphs (LayeredModel.lean sets it)

    def refresh(self, i: int, layer: nn.Module) -> LeanLayer:
        self.layers[i] = LeanLayer(layer, i, self.pack, self.native, self.native_f32)
        return self.layers[i]

    def full_head(self, lm_head: nn.Linear) -> PackedLinear:
        """The full-vocabulary head, repacked if its weight changed since it was packed."""
        version = _version(lm_head.weight)
        if version != self.head_version:
            self.head = PackedLinear(lm_head.weight, lm_head.bias, self.pack_head, head_packed_rows(self.dtype),
                                     native=self.native, native_f32=self.native_f32)
            if self.head.native is not None:
                native_bf16.rehome([self.head.native])
            self.head_version = version
        return self.head

    def product(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> Optional[PackedLinear]:
        """A small module's product beside the trunk (an exit adapter's, the candidate-row head) on the native
        kernel, prepared once per weight and again when the weight changes; None where the core runs no native
        products (the caller keeps torch's). Why: torch's bf16 product for one position cost 0.44 ms on the 8192
        candidate rows and 0.35 ms for an exit adapter, the native one 0.28 and 0.15 (medians of 30 interleaved
        repetitions on the team's AVX512-BF16 CPU), on a draft step of about 2.5 ms at exit 6."""
        if not self.native:
            return None
        version = _version(weight)
        got = self.products.get(id(weight))
        if got is None or got[0] != version:  # the entry keeps its weight's storage alive: no address is reused
            got = version, PackedLinear(weight, bias, False, native=True)
            self.products[id(weight)] = got
        return got[1]

    def describe(self) -> dict:
        layer = self.layers[0]
        library = {"layer_kernel": "onednn-packed" if layer.o.packed is not None else "torch.linear",
                   "head_kernel": "onednn-packed" if self.head.packed is not None else "torch.linear"}
        if self.native:  # batch-invariant native products for small passes, the library's above
            for key, lin in (("layer_kernel", layer.o), ("head_kernel", self.head)):
                library[key] = f"native-{lin.native.kind} (<= {native_bf16.ROWS} positions), {library[key]}"
            linears = [lin for lean in self.layers for lin in lean.linears()] + [self.head]
            prepared = [lin.native.data for lin in linears if lin.native is not None]
            huge, total = hugepages.backed(prepared)
            library["native_weights_in_huge_pages"] = f"{huge / 1e6:.0f} of {total / 1e6:.0f} MB"
        if self.native_f32:  # fp32 decode passes native, prefill the library's
            for key, lin in (("layer_kernel", layer.o), ("head_kernel", self.head)):
                library[key] = f"native-fp32 ({F32_MIN_ROWS}-{native_bf16.ROWS} positions), {library[key]}"
        out = {"core": self.core, **library, "kv_cache": "preallocated"}
        if self.graphs is not None:
            out.update(self.graphs.describe())
        if self.native_missing:
            out["native_kernel"] = native_bf16.status()  # why it is not running
        return out
