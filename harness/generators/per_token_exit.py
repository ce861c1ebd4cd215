"""Per-token early exit: run one layer at a time and stop at the first depth whose exit rule fires.

Shared by `calm` and `dynamic`; they differ in `should_exit` and in the first depth they check. Rotary
embeddings are computed once per token position and reused by every layer (`LayeredModel.rope`).
KV policy (both): a token that exits at depth e gets K/V for layers e..L-1 by **state copying** (CALM,
Schuster et al. 2022, Sec. 3.3 / `LayeredModel.fill_kv`): the exited hidden state is projected by each
skipped layer's own K/V weights. So every layer holds every position before a later token reads it (no
KV holes), at the price of approximate deep K/V for exited positions; that approximation is the
method's, and a test recomputes it from the layer weights. A token whose rule never fires runs every
layer up to the cap (all L by default) and is chosen by the full-vocabulary head there, which makes
never-firing rules reproduce autoregressive decoding exactly.
"""
from __future__ import annotations

from abc import abstractmethod
from typing import Optional, Sequence

import torch

from ..config import UsageError
from .base import GenerationResult, Generator, Output, StopCondition, TokenCallback
from .exit_probe import ExitProbe


class PerTokenExit(Generator):
    """Base class: the layer-by-layer loop, state copying and bookkeeping."""

    default_confidence = "softmax"
    caps_depth = False  # whether --exit_layer E caps the depth (dynamic: the fork's layers[:exit_layer])

    def validate(self) -> None:
        L = self.model.num_layers
        m = self.config.min_exit_layer
        if m is not None and not 1 <= m < L:
            raise UsageError(f"--min_exit_layer {m} is outside 1..{L - 1} for this model")
        if self.config.exit_layer is not None and not self.caps_depth:
            raise UsageError(f"--exit_layer does not apply to {self.name} (it chooses the exit per token)")
        self.cap = self.config.exit_layer or L
        self.min_exit = m or 1
        self.measure = self.config.confidence or self.default_confidence
        self.first_exit = self.first_check()

    def first_check(self) -> int:
        """First depth whose exit is considered."""
        return self.min_exit

    @abstractmethod
    def should_exit(self, depth: int, probe: ExitProbe, step: int, max_steps: int) -> bool:
        """Whether the token may leave at `depth` (first_exit <= depth < cap); `step` = tokens emitted so far."""

    @torch.inference_mode()
    def generate(self, prompt_ids: Sequence[int], stop: StopCondition,
                 on_tokens: Optional[TokenCallback] = None) -> GenerationResult:
        m, L = self.model, self.model.num_layers
        cache, token, t0, t1 = self.prefill(prompt_ids)
        out, pos, conf_flops = Output(stop, on_tokens), len(prompt_ids), 0.0
        depth = L
        timer = self.timer  # components: layers / confidence (exit rule) / head (the chosen token) / state_copy
        while not out.add([token], [depth]):
            probe = ExitProbe(m, self.config, self.first_exit, self.measure)
            with timer("layers"):
                h = probe.hidden[0] = m.embed(self.ids([token]))
                rope = m.rope(h, pos)  # once per position, shared by every layer and the state copying below
            depth = self.cap
            for layer in range(self.cap):
                with timer("layers"):
                    h = probe.hidden[layer + 1] = m.run_layers(h, layer, layer + 1, cache, pos, rope=rope)
                d = layer + 1
                if self.first_exit <= d < self.cap:
                    with timer("confidence"):
                        fire = self.should_exit(d, probe, len(out.tokens), stop.max_steps)
                    if fire:
                        depth = d
                        break
            with timer("head"):
                if depth < self.cap:
                    token = probe.pick(depth, self.sampler)
                else:  # no rule fired: the full head at the cap (the last layer unless --exit_layer caps it)
                    token = self.sampler.pick(m.exit_logits(h, layer=self.cap))
            if depth < L:
                with timer("state_copy"):
                    m.fill_kv(h, depth, L, cache, pos, rope=rope)
            conf_flops += probe.confidence_flops
            pos += 1
        return self.result(out, t0, t1, self.clock(), confidence_flops=conf_flops)
