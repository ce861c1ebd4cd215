"""Autoregressive decoding: one token per step through the first E layers (E = L by default).

With --exit_layer E < L this is *static exit*: every token uses only the first E layers and the
shared exit head; deeper layers are never run, so their cache is never read and stays empty.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .base import GenerationResult, Generator, StopCondition, TokenCallback, register


@register("autoregressive")
class Autoregressive(Generator):
    """Plain greedy/sampled decoding; the baseline every speedup is measured against."""

    @torch.inference_mode()
    def generate(self, prompt_ids: Sequence[int], stop: StopCondition,
                 on_tokens: Optional[TokenCallback] = None) -> GenerationResult:
        m = self.model
        depth = self.config.exit_layer or m.num_layers
        cache = m.new_cache()
        t0 = self.clock()
        h = m.run_layers(m.embed(self.ids(prompt_ids)), 0, depth, cache, 0)
        token = self.sampler.pick(m.exit_logits(h[:, -1:]))
        t1 = self.clock()
        m.reset_counters()  # decode-only accounting from here
        tokens = [token]
        pos = len(prompt_ids)
        if on_tokens:
            on_tokens([token])
        done = stop.check(tokens)
        while done is None:
            h = m.run_layers(m.embed(self.ids([token])), 0, depth, cache, pos)
            token = self.sampler.pick(m.exit_logits(h))
            pos += 1
            tokens.append(token)
            if on_tokens:
                on_tokens([token])
            done = stop.check(tokens)
        t2 = self.clock()
        keep, reason = done
        return self.result(tokens[:keep], [depth] * keep, t0, t1, t2, reason)
