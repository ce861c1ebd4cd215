"""Per-token early exit: run one layer at a time and stop at the first depth whose exit rule fires.

Shared by `calm` and `dynamic`; they differ only in `should_exit`. KV policy (both): a token that exits
at depth e gets K/V for layers e..L-1 by **state copying** (CALM, Schuster et al. 2022, Sec. 3.3 /
`LayeredModel.fill_kv`): the exited hidden state is projected by each skipped layer's own K/V weights.
So every layer holds every position before a later token reads it (no KV holes), at the price of
approximate deep K/V for exited positions; that approximation is the method's, and a test checks that
exactly this is applied. The last layer is never skipped silently: a token whose rule never fires runs
all L layers and is chosen by the full-vocabulary head, which makes never-firing rules reproduce
autoregressive decoding exactly.
"""
from __future__ import annotations

from abc import abstractmethod
from typing import Optional, Sequence

import torch

from ..config import UsageError
from .base import GenerationResult, Generator, Output, StopCondition, TokenCallback
from .probe import TokenProbe


class LayerwiseExit(Generator):
    """Base class: the layer-by-layer loop, state copying and bookkeeping."""

    default_confidence = "softmax"

    def validate(self) -> None:
        L = self.model.num_layers
        m = self.config.min_exit_layer
        if m is not None and not 1 <= m < L:
            raise UsageError(f"--min_exit_layer {m} is outside 1..{L - 1} for this model")
        if self.config.exit_layer is not None:
            raise UsageError(f"--exit_layer does not apply to {self.name} (it chooses the exit per token)")
        if self.config.vocab_k < 1:
            raise UsageError(f"--vocab_k must be >= 1, got {self.config.vocab_k}")
        self.min_exit = m or 1
        self.measure = self.config.confidence or self.default_confidence

    @abstractmethod
    def should_exit(self, depth: int, probe: TokenProbe, step: int) -> bool:
        """Whether the token may leave at `depth` (1 <= depth < L)."""

    def token_confidence(self, probe: TokenProbe, depth: int) -> Optional[float]:
        """Confidence carried to the next token (adaptive vocabulary reduction)."""
        return None

    @torch.inference_mode()
    def generate(self, prompt_ids: Sequence[int], stop: StopCondition,
                 on_tokens: Optional[TokenCallback] = None) -> GenerationResult:
        m, L = self.model, self.model.num_layers
        cache, token, t0, t1 = self.prefill(prompt_ids)
        out, pos, conf_flops, prev_conf = Output(stop, on_tokens), len(prompt_ids), 0.0, None
        depth = L
        while not out.add([token], [depth]):
            probe = TokenProbe(m, self.config, self.min_exit, prev_conf)
            h = m.embed(self.ids([token]))
            probe.hidden[0] = h
            depth = L
            for layer in range(L):
                h = m.run_layers(h, layer, layer + 1, cache, pos)
                probe.hidden[layer + 1] = h
                if self.min_exit <= layer + 1 < L and self.should_exit(layer + 1, probe, len(out.tokens)):
                    depth = layer + 1
                    break
            if depth < L:
                token = probe.pick(depth, self.sampler)
                prev_conf = self.token_confidence(probe, depth)
                m.fill_kv(h, depth, L, cache, pos)
            else:
                token = self.sampler.pick(m.exit_logits(h))
            conf_flops += probe.confidence_flops
            pos += 1
        return self.result(out, t0, t1, self.clock(), confidence_flops=conf_flops)
