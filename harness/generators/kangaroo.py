"""Kangaroo (Liu et al. 2024, arXiv 2404.18911): self-speculative decoding with a trained adapter on a shallow exit.

The drafter is the model's first E layers, then an adapter of one attention layer with its own K/V cache and two
norms (input norm, attention, residual, final norm: kangaroo/adapter.py:262-313, :323, :455 at 4f0949d), read out
by the model's shared lm_head. Drafting stops after the first draft whose top-1 probability is below the threshold
(that draft is still verified: inference_kangaroo.py:74), at most `num_speculations` drafts. Verification runs
layers E..L-1 from the drafts' kept layer-E states (inference_kangaroo.py:89), exactly as LayerSkip's loop does
(self_speculative.py), so greedy output equals autoregressive output.

Defaults are the reference's: 6 drafts (--steps, inference_kangaroo.py:195-199) and threshold 0.6 (the README's
command and kangaroo_forward's default, inference_kangaroo.py:15; its CLI default is 0.4, :184-188), unless the
exit artifact recommends a setting fitted on this model (harness/train/kangaroo.py). The exit layer is the one the
adapter was trained at (the reference's is 2 of Vicuna-7B's 32). The adapter comes from the exit artifact
(`kangaroo.*` tensors), written by `python -m harness.train --recipe kangaroo`.

`self_speculative:drafter=kangaroo` is LayerSkip's loop (its draft length, its drop-the-unsure-draft rule) with
this adapter as its draft exit: it tells how much of Kangaroo's result comes from the adapter and how much from the
loop.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from ..config import UsageError
from ..draft_layer import DraftLayer
from ..lean_layers import LayerKV
from .base import register
from .proposers import EarlyExitProposer, Proposal, Scored
from .self_speculative import DRAFTER_SHAPES, MODEL_DRAFTERS, SelfSpeculative, TrainedDrafter, early_exit_shape

PREFIX = "kangaroo."  # the adapter's tensors in an exit artifact
KANGAROO_STEPS, KANGAROO_THRESHOLD = 6, 0.6


class KangarooAdapter(nn.Module):
    """Hidden state after E layers -> [norm -> attention -> residual] -> norm: what the shared lm_head reads."""

    def __init__(self, layer: DraftLayer, hidden: int, eps: float):
        super().__init__()
        self.layer = layer
        self.norm = nn.RMSNorm(hidden, eps=eps)

    @classmethod
    def like(cls, model, exit_layer: int) -> "KangarooAdapter":
        """Initialised from the trunk layer after the exit (its attention and input norm) and the final norm."""
        eps = getattr(model.config, "rms_norm_eps", 1e-5)
        out = cls(DraftLayer.like(model, exit_layer, input_norm=True, mlp=False), model.hidden_size, eps)
        with torch.no_grad():
            out.norm.weight.copy_(model._norm.weight.float())
        return out

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv: Optional[LayerKV] = None) -> torch.Tensor:
        return self.norm(self.layer(h, cos, sin, kv))

    def flops(self) -> int:
        return self.layer.flops()


def stored(model) -> Optional[tuple[KangarooAdapter, int]]:
    """The attached artifact's Kangaroo adapter in the model's dtype and its exit layer, or None."""
    art = getattr(model, "exits", None)
    if art is None or PREFIX + "exit_layer" not in art.tensors:
        return None
    return art.built(PREFIX, model, lambda: _build(model, art))


def _build(model, art) -> tuple[KangarooAdapter, int]:
    state = art.part(PREFIX)
    eps = getattr(model.config, "rms_norm_eps", 1e-5)
    head_dim = model.layers[0].self_attn.head_dim
    layer = DraftLayer.from_state(state, "layer.", eps, head_dim)
    adapter = KangarooAdapter(layer, model.hidden_size, eps)
    adapter.norm.load_state_dict({"weight": state["norm.weight"]})
    E = int(art.tensors[PREFIX + "exit_layer"])
    adapter = adapter.to(device=model.layer_devices[E - 1], dtype=model.dtype).eval().requires_grad_(False)
    adapter.layer.pack(model.native_products())
    return adapter, E


class KangarooProposer(EarlyExitProposer):
    """The first E layers, then the adapter on its own K/V cache, then the shared head (on `rows` if given)."""

    def __init__(self, model, adapter: KangarooAdapter, exit_layer: int, k: int, rows, threshold: float, sampler,
                 ids, stop: str):
        super().__init__(model, exit_layer, k, rows, threshold, sampler, ids, stop)
        self.adapter, self.keep_layer = adapter, exit_layer
        self.kv = LayerKV()

    def run_adapter(self, h: torch.Tensor, pos: int) -> torch.Tensor:
        """The adapter over states of positions pos.. (appended to its cache: no hole, checked)."""
        if self.kv.length != pos:
            raise RuntimeError(f"Kangaroo adapter cache holds {self.kv.length} positions, input starts at {pos}")
        cos, sin = self.model.rotary(h, pos)
        self.model.counters.adapter_flops += self.adapter.flops() * h.shape[1]
        return self.adapter(h, cos, sin, self.kv)

    def start(self, prompt_ids: Sequence[int], token: int, states: Optional[torch.Tensor]) -> None:
        self.kv = LayerKV()
        self.run_adapter(states, 0)

    def exit_head(self, h: torch.Tensor, pos: int) -> torch.Tensor:
        return self.model.head(self.run_adapter(h, pos), self.rows)[0, -1]

    def accepted(self, p: Proposal, a: int, nxt: int, pos: int, scored: Scored) -> None:
        """Keep the adapter's K/V of the verified inputs (pos..pos+a), computing those drafting did not reach."""
        self.kv.crop(pos + a + 1)
        if self.kv.length < pos + a + 1:
            self.run_adapter(scored.kept[:, self.kv.length - pos:a + 1], self.kv.length)


def proposer(gen: SelfSpeculative) -> KangarooProposer:
    """The Kangaroo drafter for a self-speculation loop: the artifact's adapter at its exit layer."""
    m, c = gen.model, gen.config
    found = stored(m)
    if found is None:
        raise UsageError(f"{gen.name} needs a trained Kangaroo adapter: pass --exits with an artifact holding one "
                         "(python -m harness.train --recipe kangaroo; make exits ships one)")
    adapter, E = found
    if c.exit_layer is not None and c.exit_layer != E and "exit_layer" in c.set_by_user():
        raise UsageError(f"--exit_layer {c.exit_layer}: the Kangaroo adapter was trained at exit layer {E}")
    c.exit_layer = E
    gen.draft_settings()
    return KangarooProposer(m, adapter, E, gen.k, gen.rows, gen.threshold, gen.sampler, gen.ids, gen.draft_stop)


def shape(model: dict, knobs: dict):
    """For the oracle: E trunk layers plus the adapter's attention (q, k, v, o counted as four hidden x hidden
    products, an upper bound under grouped K/V); verification resumes from layer E."""
    return early_exit_shape(model, knobs, 4 * model.get("hidden_size", 0) ** 2)


MODEL_DRAFTERS["kangaroo"] = proposer
DRAFTER_SHAPES["kangaroo"] = shape


@register("kangaroo")
class Kangaroo(TrainedDrafter):
    """Kangaroo: shallow exit + trained attention adapter drafts, stopped at the first unsure one; lossless."""

    short = "kangaroo"
    marker = PREFIX + "exit_layer"
    in_all, all_note = 11, "with a trained Kangaroo adapter"

    def default_speculations(self) -> int:
        return KANGAROO_STEPS

    def default_threshold(self) -> float:
        return KANGAROO_THRESHOLD
