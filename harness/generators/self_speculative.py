"""Self-speculative decoding (LayerSkip, Elhoushi et al. 2024, arXiv 2404.16710).

Split as in vLLM's speculative decoding:
  proposer  draft k tokens with the first E layers and the shared exit head;
  scorer    run layers E..L-1 once over the k+1 positions, starting from the layer-E hidden states kept
            while drafting, so layers 1..E are never recomputed (LayerSkip's KV + exit-query reuse);
  verifier  greedy: accept the longest prefix equal to the full model's argmax, plus its next token;
            sampling: exact speculative sampling (accept y with prob min(1, p/q), else resample from
            norm(max(0, p - q))), which leaves the full model's distribution unchanged.
Rejected positions are cropped from every layer's cache, so the cache always equals the full model's.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..config import UsageError
from .base import GenerationResult, Generator, Output, StopCondition, TokenCallback, register

DEFAULT_SPECULATIONS = 6


def verify_greedy(draft: list[int], target_logits: torch.Tensor) -> tuple[int, int]:
    """(accepted count, next token) for greedy decoding; target_logits has len(draft) + 1 rows."""
    targets = target_logits.argmax(-1).tolist()
    a = 0
    while a < len(draft) and draft[a] == targets[a]:
        a += 1
    return a, targets[a]


def verify_sampling(draft: list[int], draft_probs: torch.Tensor, target_probs: torch.Tensor,
                    rng: torch.Generator) -> tuple[int, int]:
    """(accepted count, next token) by speculative sampling (Leviathan et al. 2023; Chen et al. 2023).

    draft_probs: (k, V) distributions the draft tokens were sampled from; target_probs: (k + 1, V).
    """
    for i, y in enumerate(draft):
        p, q = target_probs[i], draft_probs[i]
        u = torch.rand((), generator=rng, device=p.device)
        if u * q[y] < p[y]:  # accept with probability min(1, p(y) / q(y))
            continue
        residual = (p - q).clamp_min(0)
        total = residual.sum()
        dist = residual / total if total > 0 else p
        return i, int(torch.multinomial(dist, 1, generator=rng))
    return len(draft), int(torch.multinomial(target_probs[len(draft)], 1, generator=rng))


@register("self_speculative")
class SelfSpeculative(Generator):
    """LayerSkip self-speculation: draft with E layers, verify with the rest in one pass (lossless)."""

    def validate(self) -> None:
        L = self.model.num_layers
        e = self.config.exit_layer
        if e is None:
            raise UsageError("self_speculative needs --exit_layer E (the draft depth, 1..L-1)")
        if e >= L:
            raise UsageError(f"self_speculative needs --exit_layer below the model's {L} layers, got {e}")
        k = self.config.num_speculations
        if k is not None and k < 1:
            raise UsageError(f"--num_speculations must be >= 1, got {k}")
        self.k = k or DEFAULT_SPECULATIONS

    def knobs(self) -> dict:
        return {"exit_layer": self.config.exit_layer, "num_speculations": self.k}

    # -- proposer ---------------------------------------------------------------------------
    def draft(self, token: int, pos: int, k: int, cache, eos: set[int]):
        """k draft tokens after `token` (at `pos`); keeps each layer-E state for the scorer."""
        m, E = self.model, self.config.exit_layer
        states, drafted, probs = [], [], []
        for i in range(k):
            h = m.run_layers(m.embed(self.ids([token])), 0, E, cache, pos + i)
            states.append(h)
            logits = m.exit_logits(h)[0, -1]
            if self.sampler.greedy:
                token = int(logits.argmax())
            else:
                q = self.sampler.probs(logits)
                token = int(torch.multinomial(q, 1, generator=self.sampler.rng))
                probs.append(q)
            drafted.append(token)
            if token in eos:  # nothing useful can follow an end of sequence
                break
        return states, drafted, probs

    # -- scorer -----------------------------------------------------------------------------
    def score(self, states: list, drafted: list[int], token: int, pos: int, cache) -> torch.Tensor:
        """Full-model logits at positions pos..pos+len(drafted), reusing the drafts' layer-E states.

        `token` sits at `pos`; with no drafts the pass is one plain full-depth step for it.
        """
        m, E = self.model, self.config.exit_layer
        last = m.run_layers(m.embed(self.ids((drafted or [token])[-1:])), 0, E, cache, pos + len(drafted))
        h = m.run_layers(torch.cat(states + [last], dim=1), E, m.num_layers, cache, pos)
        return m.exit_logits(h)[0]

    @torch.inference_mode()
    def generate(self, prompt_ids: Sequence[int], stop: StopCondition,
                 on_tokens: Optional[TokenCallback] = None) -> GenerationResult:
        m, L, E = self.model, self.model.num_layers, self.config.exit_layer
        cache, token, t0, t1 = self.prefill(prompt_ids)
        out, pos = Output(stop, on_tokens), len(prompt_ids)  # `token` sits at `pos`, not yet processed
        drafted_total = accepted_total = 0
        finished = out.add([token], [L])
        while not finished:
            # a+1 tokens come out of a step (accepted drafts + the verifier's token): draft at most one
            # fewer than may still be emitted, so no token past max_steps is ever produced or counted
            k = min(self.k, stop.remaining(len(out.tokens)) - 1)
            eos = set() if stop.fixed_length else stop.eos_ids
            states, drafted, q = self.draft(token, pos, k, cache, eos) if k > 0 else ([], [], [])
            logits = self.score(states, drafted, token, pos, cache)
            if not drafted:
                a, nxt = 0, self.sampler.pick(logits[-1:])
            elif self.sampler.greedy:
                a, nxt = verify_greedy(drafted, logits)
            else:
                a, nxt = verify_sampling(drafted, torch.stack(q), self.sampler.probs(logits), self.sampler.rng)
            m.crop(cache, pos + a + 1)  # keep x, y1..ya; their K/V are now the full model's at every layer
            pos += a + 1
            token = nxt
            before = len(out.tokens)
            finished = out.add(drafted[:a] + [nxt], [E] * a + [L])
            drafted_total += len(drafted)
            # accepted drafts cut off by a stop (EOS / stop string inside the chunk) are not counted
            accepted_total += min(a, (out.done[0] if finished else len(out.tokens)) - before)
        return self.result(out, t0, t1, self.clock(), drafted=drafted_total, accepted=accepted_total)
