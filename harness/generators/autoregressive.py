"""Autoregressive decoding: one token per step through the first E layers (E = L by default).

With --exit_layer E < L this is *static exit*: every token uses only the first E layers and the
shared exit head; deeper layers are never run, so their cache is never read and stays empty.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .base import GenerationResult, Generator, Output, StopCondition, TokenCallback, register, top2_gap


@register("autoregressive")
class Autoregressive(Generator):
    """Plain greedy/sampled decoding; the baseline every speedup is measured against."""

    short, family = "AR", "autoregressive / static exit"
    in_all = 0  # the baseline
    baseline = True

    def records_gaps(self, depth: Optional[int]) -> bool:
        """Greedy full-depth decoding logs its top-2 logit gaps: it is the reference every lossless method's output is
        compared with, and a mismatch is classified by the gap where it starts (harness.exactness)."""
        return self.sampler.greedy and depth in (None, self.model.num_layers)

    @torch.inference_mode()
    def generate(self, prompt_ids: Sequence[int], stop: StopCondition,
                 on_tokens: Optional[TokenCallback] = None) -> GenerationResult:
        m = self.model
        depth = self.config.exit_layer or m.num_layers
        cache, token, t0, t1 = self.prefill(prompt_ids, depth)
        out, pos = Output(stop, on_tokens), len(prompt_ids)
        gaps = self.gaps
        while not out.add([token], [depth]):
            h = m.run_layers(m.embed(self.ids([token])), 0, depth, cache, pos)
            logits = m.exit_logits(h, layer=depth)
            token = self.sampler.pick(logits)
            if gaps is not None:
                gaps.append(top2_gap(logits))
            pos += 1
        t2 = self.clock()
        keep = out.done[0]
        return self.result(out, t0, t1, t2, verify_passes=max(keep - 1, 0) if depth == m.num_layers else None,
                           top2_gaps=gaps[:keep] if gaps is not None else None)
