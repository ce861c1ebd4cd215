"""One trainable decoder layer for draft modules (Kangaroo's adapter, EAGLE's head), with a K/V cache of its own.

The trunk's layers run through harness.lean_layers, which packs frozen weights for inference; a draft layer is
trained here, so it is a plain `nn.Module` whose one forward serves both uses: over whole sequences with causal
attention (training, `kv=None`) and position by position on a `LayerKV` (drafting). Its K/V follows the trunk's
contract: positions are appended in order, never skipped, and cropped on rejection (`LayerKV.crop`).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import native_bf16
from .lean_layers import LayerKV, rotate_half


class DraftLayer(nn.Module):
    """A Llama-style layer: [RMSNorm] -> attention (rotary, GQA) -> residual [-> RMSNorm -> gated MLP -> residual].

    input_norm: Kangaroo's adapter keeps the layer's input norm (kangaroo/adapter.py:262-313 at 4f0949d); EAGLE-1's
    head drops it from its only layer (eagle/model/cnets.py:385-386, :414-415 at 4a9cf3a, branch v1).
    mlp_width: 0 = attention only (Kangaroo's adapter), else the gated MLP's width (EAGLE: the model's).
    """

    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, mlp_width: int, eps: float,
                 input_norm: bool):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.input_layernorm = nn.RMSNorm(hidden, eps=eps) if input_norm else None
        self.q_proj = nn.Linear(hidden, heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=False)
        self.mlp_width = mlp_width
        if mlp_width:
            self.post_attention_layernorm = nn.RMSNorm(hidden, eps=eps)
            self.gate_proj = nn.Linear(hidden, mlp_width, bias=False)
            self.up_proj = nn.Linear(hidden, mlp_width, bias=False)
            self.down_proj = nn.Linear(mlp_width, hidden, bias=False)

    @classmethod
    def like(cls, model, layer: int, input_norm: bool, mlp: bool) -> "DraftLayer":
        """A draft layer shaped like the model's layer `layer` and initialised from its weights (training starts
        from a layer that already reads this model's hidden states)."""
        src = model.layers[layer]
        attn = src.self_attn
        head_dim = attn.head_dim
        width = src.mlp.gate_proj.weight.shape[0] if mlp else 0
        out = cls(model.hidden_size, attn.q_proj.weight.shape[0] // head_dim, attn.k_proj.weight.shape[0] // head_dim,
                  head_dim, width, getattr(model.config, "rms_norm_eps", 1e-5), input_norm)
        names = ["q_proj", "k_proj", "v_proj", "o_proj"]
        with torch.no_grad():
            for n in names:
                getattr(out, n).weight.copy_(getattr(attn, n).weight.float())
            if input_norm:
                out.input_layernorm.weight.copy_(src.input_layernorm.weight.float())
            if mlp:
                out.post_attention_layernorm.weight.copy_(src.post_attention_layernorm.weight.float())
                for n in ("gate_proj", "up_proj", "down_proj"):
                    getattr(out, n).weight.copy_(getattr(src.mlp, n).weight.float())
        return out

    @classmethod
    def from_state(cls, state: dict, prefix: str, eps: float, head_dim: int) -> "DraftLayer":
        """Rebuild from a state dict (shapes read off its tensors)."""
        q, k = state[prefix + "q_proj.weight"], state[prefix + "k_proj.weight"]
        width = state[prefix + "gate_proj.weight"].shape[0] if prefix + "gate_proj.weight" in state else 0
        out = cls(q.shape[1], q.shape[0] // head_dim, k.shape[0] // head_dim, head_dim, width, eps,
                  prefix + "input_layernorm.weight" in state)
        out.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        return out

    def pack(self, native: bool = False) -> "DraftLayer":
        """For inference: projections through lean_layers.PackedLinear, oneDNN-packed where that pays (bf16 on a
        CPU: a one-position product costs a third less), and on the native bf16 product for drafting's few
        positions where `native` (the trunk's core runs it: lean_layers.native_products). Training (autograd on)
        always uses the modules."""
        from .lean_layers import PackedLinear, pack_layers

        w = self.q_proj.weight
        do = pack_layers(w.dtype, w.device)
        self._packed = {n: PackedLinear(m.weight, m.bias, do, native=native) for n, m in self.named_children()
                        if isinstance(m, nn.Linear)}
        self._native = native and w.dtype == torch.bfloat16 and w.device.type == "cpu" and self.head_dim <= 256
        return self

    def proj(self, name: str, x: torch.Tensor) -> torch.Tensor:
        packed = getattr(self, "_packed", None)
        if packed is not None and not torch.is_grad_enabled():
            return packed[name](x)
        return getattr(self, name)(x)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv: Optional[LayerKV] = None) -> torch.Tensor:
        """h (b, q, hidden) at positions whose rotary (cos, sin) are (b, q, head_dim). With `kv`, the new positions
        are appended to it and attend over every cached one; without, attention is causal over h alone."""
        b, q, _ = h.shape
        x = self.input_layernorm(h) if self.input_layernorm is not None else h
        qs = self.proj("q_proj", x).view(b, q, self.heads, self.head_dim).transpose(1, 2)
        ks = self.proj("k_proj", x).view(b, q, self.kv_heads, self.head_dim).transpose(1, 2)
        vs = self.proj("v_proj", x).view(b, q, self.kv_heads, self.head_dim).transpose(1, 2)
        c, s = cos.unsqueeze(1).to(h.dtype), sin.unsqueeze(1).to(h.dtype)
        qs = qs * c + rotate_half(qs) * s
        ks = ks * c + rotate_half(ks) * s
        past = 0
        if kv is not None:
            past = kv.length
            ks, vs = kv.append(ks, vs)
            if getattr(self, "_native", False) and b == 1 and q <= native_bf16.ROWS and not torch.is_grad_enabled():
                # drafting: the native attention over the cache (torch's SDPA for one query over ~600 cached
                # positions cost ~1 ms here, as much as the rest of the draft step)
                a = native_bf16.attention(qs, kv.k, kv.v, kv.length, self.head_dim ** -0.5)
                return self._rest(h, a)
        groups = self.heads // self.kv_heads
        if groups > 1:
            ks, vs = ks.repeat_interleave(groups, dim=1), vs.repeat_interleave(groups, dim=1)
        if q == 1 or past == 0:
            a = F.scaled_dot_product_attention(qs, ks, vs, is_causal=q > 1)
        else:  # a chunk after cached positions: causal, aligned to the bottom right
            allowed = torch.arange(past + q, device=h.device)[None, :] <= past + torch.arange(q, device=h.device)[:, None]
            a = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=allowed)
        return self._rest(h, a.transpose(1, 2).reshape(b, q, -1))

    def _rest(self, h: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """After attention (a: (b, q, heads * head_dim)): the output projection, residual and the MLP if any."""
        h = h + self.proj("o_proj", a)
        if self.mlp_width:
            x = self.post_attention_layernorm(h)
            h = h + self.proj("down_proj", F.silu(self.proj("gate_proj", x)) * self.proj("up_proj", x))
        return h

    def flops(self) -> int:
        """Multiply-adds x2 per position (projections only; attention over the cache is not counted)."""
        return 2 * sum(p.numel() for n, p in self.named_parameters() if n.endswith("proj.weight"))
