"""Per-token view of the intermediate exits, shared by calm, free and dynamic.

A `TokenProbe` holds one token's hidden state at every depth it reached and evaluates the exit head
lazily, at most once per depth, on the full vocabulary or on the rows kept by vocabulary reduction.
It also computes the contrastive distributions and tallies the FLOPs spent on confidence estimation.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import exits
from ..config import GenerationConfig
from ..model import LayeredModel


class TokenProbe:
    """Hidden states, exit logits and exit distributions of one token, by depth (0 = embeddings)."""

    def __init__(self, model: LayeredModel, config: GenerationConfig, first_exit: int,
                 prev_confidence: Optional[float] = None):
        self.model = model
        self.config = config
        self.first_exit = first_exit  # first depth whose exit is considered (vocab reduction starts here)
        self.prev_confidence = prev_confidence  # adaptive vocab reduction reads the previous token's confidence
        self.hidden: dict[int, torch.Tensor] = {}
        self._logits: dict[int, tuple[torch.Tensor, Optional[torch.Tensor]]] = {}  # depth -> (logits, rows)
        self.rows: Optional[torch.Tensor] = None  # vocabulary rows for the next evaluation (None = all)
        self.confidence_flops = 0.0

    def logits(self, depth: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(logits, vocabulary ids of their columns or None for the full vocabulary) at `depth`."""
        if depth not in self._logits:
            rows = self.rows
            out = self.model.exit_logits(self.hidden[depth], rows).reshape(-1)
            self.confidence_flops += self.model.head_flops(out.numel())
            self._logits[depth] = (out, rows)
            self._shrink(depth, out, rows)
        return self._logits[depth]

    def _shrink(self, depth: int, logits: torch.Tensor, rows: Optional[torch.Tensor]) -> None:
        mode = self.config.vocab_reduction
        if mode == "none":
            return
        k = exits.reduced_k(mode, self.model.vocab_size, self.config.vocab_k, depth, self.first_exit,
                            self.model.num_layers, self.prev_confidence)
        k = min(k, logits.numel())
        top = logits.topk(k).indices
        self.rows = top if rows is None else rows[top]

    def probs(self, depth: int, temperature: float = 1.0) -> torch.Tensor:
        """The distribution exit rules read: softmax of the exit logits, or the contrastive distribution."""
        logits, rows = self.logits(depth)
        if self.config.confidence in ("contrastive", "jsd_contrastive"):
            amateur = self._amateur_logits(depth, rows)
            if amateur is not None:
                return exits.contrastive_probs(logits, amateur, self.config.contrastive_alpha)
        return torch.softmax(logits.float() / temperature, dim=-1)

    def _amateur_logits(self, depth: int, rows: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """Amateur layer on the expert's rows: depth // 2, or the earlier exit of largest JSD."""
        def on_rows(d: int) -> torch.Tensor:
            out = self.model.exit_logits(self.hidden[d], rows).reshape(-1)
            self.confidence_flops += self.model.head_flops(out.numel())
            return out

        if self.config.confidence == "contrastive":
            d = depth // 2
            return on_rows(d) if d >= 1 else None
        candidates = [d for d in range(max(1, self.first_exit - 1), depth) if d in self.hidden]
        if not candidates:
            return None
        expert = torch.softmax(self.logits(depth)[0].float(), -1)
        scored = [(exits.jsd(expert, torch.softmax(lg.float(), -1)), lg) for lg in map(on_rows, candidates)]
        return max(scored, key=lambda t: t[0])[1]

    def pick(self, depth: int, sampler) -> int:
        """The token chosen at an exit of `depth` (mapped back to vocabulary ids when reduced)."""
        logits, rows = self.logits(depth)
        i = sampler.pick(logits)
        return int(rows[i]) if rows is not None else i

    def top_token(self, depth: int) -> int:
        logits, rows = self.logits(depth)
        i = int(logits.argmax())
        return int(rows[i]) if rows is not None else i

    def confidence(self, depth: int, measure: str) -> float:
        """Confidence of the exit at `depth` under one of CONFIDENCES."""
        if measure == "hidden_state":
            return exits.cosine(self.hidden[depth], self.hidden[depth - 1])
        p = self.probs(depth)
        return exits.softmax_margin(p) if measure == "softmax" else exits.max_prob(p)
