"""EAGLE (Li et al. 2024, arXiv 2401.15077): drafts from a trained head over the model's own last-layer features.

The head is one decoder layer fed fc([embedding of token t+1; feature at t]) and trained to predict the feature
at t+1, read out by the model's shared lm_head (EAGLE-1, SafeAILab/EAGLE branch v1 at 4a9cf3a:
eagle/model/cnets.py:492 (fc, with bias), :593 (concatenation order), :385-386 (its only layer has no input
norm), :636-654 (no norm before the head)). Features are the last layer's states after the final norm
(ea_model.py:124-132). The head keeps its own K/V cache: after each verification it is cropped to the positions
whose features were true and catches up on the accepted ones with the full model's features, as EAGLE re-feeds
the verified features.

Deviation, on purpose: EAGLE-1 drafts a static tree of 25 nodes (mc_sim_7b_63, model/choices.py:1-4, top_k 10,
no confidence threshold). Here drafts are chains of at most `num_speculations` tokens, ended after the first
draft below `draft_threshold` (Kangaroo's rule), because the harness's verifier is a chain verifier and on this
CPU a verification pass costs more per extra position than a GPU's (see docs/drafters.md). The defaults without a
recommendation are a chain of 5 (EAGLE-1's tree depth) and no threshold. Verification is the shared scorer's full
pass, so greedy output equals autoregressive output.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from ..config import UsageError
from ..draft_layer import DraftLayer
from ..lean_layers import LayerKV
from .base import register
from .proposers import ModelProposer, Proposal, Scored
from .self_speculative import DRAFTER_SHAPES, MODEL_DRAFTERS, SelfSpeculative, TrainedDrafter, draft_rows

PREFIX = "eagle."  # the head's tensors in an exit artifact
EAGLE_CHAIN = 5


class EagleHead(nn.Module):
    """(token embedding at t+1, feature at t) -> predicted feature at t+1."""

    def __init__(self, layer: DraftLayer, hidden: int):
        super().__init__()
        self.fc = nn.Linear(2 * hidden, hidden, bias=True)
        self.layer = layer

    @classmethod
    def like(cls, model) -> "EagleHead":
        """Starts as the identity on the feature: fc = [0, I] and the layer's output projections (o_proj, down_proj)
        zero, so training begins from "the next feature is this one"; the layer's other weights are the model's
        last layer's."""
        out = cls(DraftLayer.like(model, model.num_layers - 1, input_norm=False, mlp=True), model.hidden_size)
        with torch.no_grad():
            d = model.hidden_size
            out.fc.weight.zero_()
            out.fc.weight[:, d:] = torch.eye(d)
            out.fc.bias.zero_()
            out.layer.o_proj.weight.zero_()
            out.layer.down_proj.weight.zero_()
        return out

    def pack(self, native: bool = False) -> "EagleHead":
        """For inference: packed products, native where `native` (DraftLayer.pack)."""
        from ..lean_layers import PackedLinear, pack_layers

        self.layer.pack(native)
        self._fc = PackedLinear(self.fc.weight, self.fc.bias, pack_layers(self.fc.weight.dtype, self.fc.weight.device),
                                native=native)
        return self

    def forward(self, emb: torch.Tensor, feat: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv: Optional[LayerKV] = None) -> torch.Tensor:
        x = torch.cat([emb, feat], dim=-1)
        fc = getattr(self, "_fc", None)
        x = fc(x) if fc is not None and not torch.is_grad_enabled() else self.fc(x)
        return self.layer(x, cos, sin, kv)

    def flops(self) -> int:
        return 2 * self.fc.weight.numel() + self.layer.flops()


def stored(model) -> Optional[EagleHead]:
    """The attached artifact's EAGLE head in the model's dtype, or None."""
    art = getattr(model, "exits", None)
    if art is None or PREFIX + "fc.weight" not in art.tensors:
        return None
    return art.built(PREFIX, model, lambda: _build(model, art))


def _build(model, art) -> EagleHead:
    state = art.part(PREFIX)
    layer = DraftLayer.from_state(state, "layer.", getattr(model.config, "rms_norm_eps", 1e-5),
                                  model.layers[0].self_attn.head_dim)
    head = EagleHead(layer, model.hidden_size)
    head.fc.load_state_dict({"weight": state["fc.weight"], "bias": state["fc.bias"]})
    return head.to(device=model.head_device, dtype=model.dtype).eval().requires_grad_(False).pack(model.native_products())


class EagleProposer(ModelProposer):
    """Chain drafts from the EAGLE head. Its K/V cache holds head positions 1..n (position j's input is the
    feature at j-1 and token j; EAGLE drops the first token: cnets.py:766), index j-1."""

    def __init__(self, model, head: EagleHead, k: int, rows, threshold: float, sampler, ids, stop: str):
        super().__init__(model, k, rows, threshold, sampler, ids, stop)
        self.head, self.keep_layer = head, model.num_layers
        self.kv = LayerKV()
        self.pending: list = []  # [(features (1, q, d), tokens)] verified but not yet through the head
        self.last: Optional[torch.Tensor] = None  # the head's output at the current token's position

    def run_head(self, feat: torch.Tensor, tokens: Sequence[int], pos: int) -> torch.Tensor:
        """The head at positions pos..pos+q-1 (feature at j-1, token j), appended to its cache; last output."""
        if self.kv.length != pos - 1:
            raise RuntimeError(f"EAGLE head cache holds {self.kv.length} positions, input starts at {pos}")
        m = self.model
        emb = m.embed(self.ids(tokens))
        cos, sin = m.rotary(emb, pos - 1)
        m.counters.adapter_flops += self.head.flops() * len(tokens)
        return self.head(emb, feat.to(emb.dtype), cos, sin, self.kv)[:, -1:]

    def catch_up(self) -> None:
        if self.pending:
            feat = torch.cat([f for f, _ in self.pending], dim=1)
            tokens = [t for _, ts in self.pending for t in ts]
            self.last = self.run_head(feat, tokens, self.kv.length + 1)
            self.pending = []

    def start(self, prompt_ids: Sequence[int], token: int, states: Optional[torch.Tensor]) -> None:
        self.kv, self.last = LayerKV(), None
        self.pending = [(self.model.norm(states), list(prompt_ids[1:]) + [token])]
        self.catch_up()

    def propose(self, token: int, pos: int, room: int, cache, eos) -> Proposal:
        drafted, probs, confs = [], [], []
        if room <= 0:
            return Proposal(drafted, depth=self.model.num_layers, source="eagle")
        self.catch_up()
        f = self.last

        def step(i: int, tok: int) -> torch.Tensor:
            nonlocal f
            if i > 0:  # the previous draft at pos+i, with the head's own predicted feature at pos+i-1
                f = self.run_head(f, [tok], pos + i)
            return self.model.head(f, self.rows)[0, -1]

        passes = self.chain(step, token, room, eos, drafted, probs, confs)
        return Proposal(drafted, depth=self.model.num_layers, source="eagle", probs=probs, passes=passes, confs=confs)

    def accepted(self, p: Proposal, a: int, nxt: int, pos: int, scored: Scored) -> None:
        """Drop the head's positions past `pos` (made from its own predicted features) and queue the verified ones:
        positions pos+1..pos+a+1, from the full model's features at pos..pos+a."""
        self.kv.crop(pos)
        self.pending.append((self.model.norm(scored.final[:, :a + 1]), p.tokens[:a] + [nxt]))


def proposer(gen: SelfSpeculative) -> EagleProposer:
    head = stored(gen.model)
    if head is None:
        raise UsageError(f"{gen.name} needs a trained EAGLE head: pass --exits with an artifact holding one "
                         "(python -m harness.train --recipe eagle; make exits ships one)")
    if gen.config.exit_layer is not None and "exit_layer" in gen.config.set_by_user():
        raise UsageError("--exit_layer does not apply to EAGLE drafts (they read the last layer's features)")
    gen.draft_settings()
    return EagleProposer(gen.model, head, gen.k, gen.rows, gen.threshold, gen.sampler, gen.ids, gen.draft_stop)


def shape(model: dict, knobs: dict):
    """For the oracle: one decoder layer of the trunk's shape plus the input projection fc (2 hidden x hidden, and
    its bias); it reads the last layer's features, so verification runs at full depth."""
    from ..oracle import DraftShape, layer_weights

    per, h = layer_weights(model), model.get("hidden_size")
    if per is None or not h:
        return None
    return DraftShape(layers=1 + (2 * h * h + h) / per, head_rows=draft_rows(model, knobs), verify_from=0)


MODEL_DRAFTERS["eagle"] = proposer
DRAFTER_SHAPES["eagle"] = shape


@register("eagle")
class Eagle(TrainedDrafter):
    """EAGLE-style drafts: a trained head over the last layer's features, chains verified in one pass; lossless."""

    short = "eagle"
    marker = PREFIX + "fc.weight"
    in_all, all_note = 12, "with a trained EAGLE head"

    def default_speculations(self) -> int:
        return EAGLE_CHAIN
