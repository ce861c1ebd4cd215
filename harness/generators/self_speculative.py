"""Self-speculative decoding (LayerSkip, Elhoushi et al. 2024, arXiv 2404.16710), and a hybrid drafter.

Split as in vLLM's speculative decoding:
  proposer  draft up to k tokens with the first E layers and the shared exit head (through the exit's trained
            adapter when an exit artifact is attached; optionally on its candidate rows only, and stopping at the
            first unsure draft: Kangaroo's adaptive draft length, arXiv 2404.18911). `hybrid_speculative` first
            looks the last n-gram up in the prompt and the text so far (prompt lookup decoding) and proposes the
            tokens that followed its earliest occurrence (--lookup_match, as transformers' prompt lookup), cut
            before an end of sequence; only without a match does it draft with the early exit;
  scorer    run layers E..L-1 once over the drafted positions + 1, starting from the layer-E hidden states kept
            while drafting, so layers 1..E are never recomputed (LayerSkip's KV + exit-query reuse); lookup drafts
            have no layer-E states and go through all L layers in one pass;
  verifier  greedy: accept the longest prefix equal to the full model's argmax, plus its next token;
            sampling: exact speculative sampling (accept y with prob min(1, p/q), else resample from
            norm(max(0, p - q))), which leaves the full model's distribution unchanged (a lookup draft's q is a
            point mass).
Verification always uses the full model and full head, so greedy output equals autoregressive output whatever
the drafts are. Rejected positions are cropped from every layer's cache, so the cache always equals the full
model's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Collection, Optional, Sequence

import torch

from ..config import UsageError, knob
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


LOOKUP_MATCHES = ("earliest", "latest")


@dataclass
class DraftLength:
    """the draft length"""

    num_speculations: Optional[int] = knob(
        None,
        "self_speculative: tokens drafted per step, >= 1; omitted = the attached exit artifact's recommendation, "
        "else 6 (LayerSkip's num_speculations). "
        "hf_prompt_lookup: transformers' prompt_lookup_num_tokens; omitted = 10",
        range=(1, None, True))


@dataclass
class DraftOptions(DraftLength):
    """the early-exit drafter"""

    draft_vocab: Optional[int] = knob(
        None,
        "self_speculative: draft with the exit head on this many candidate rows: 0 = the full vocabulary, N = "
        "the attached exit artifact's candidate vocabulary (its size N); omitted = the artifact's recommendation, "
        "else 0. Verification always uses the full head, so greedy output is unchanged",
        range=(0, None, True))
    draft_threshold: Optional[float] = knob(
        None,
        "self_speculative: stop drafting at the first draft whose top-1 probability is below this (adaptive "
        "draft length, Kangaroo arXiv 2404.18911); 0 = always draft num_speculations; omitted = the artifact's "
        "recommendation, else 0",
        range=(0.0, 1.0, True))


@dataclass
class LookupOptions:
    """prompt lookup's n-gram matching"""

    lookup_ngram: int = knob(
        3,
        "hybrid_speculative: longest n-gram matched against the prompt and the text so far (prompt lookup "
        "decoding); a match proposes the tokens that followed it, else the early exit drafts (prompt_lookup: else one "
        "plain step)",
        range=(1, None, True))
    lookup_tokens: int = knob(
        10,
        "hybrid_speculative: most tokens proposed by one prompt-lookup match (transformers' "
                                "prompt_lookup_num_tokens default)",
        range=(1, None, True))
    lookup_match: str = knob(
        "earliest",
        "hybrid_speculative: which earlier occurrence of the n-gram proposes the draft: earliest = the "
        "first, as transformers' prompt lookup (PromptLookupCandidateGenerator.get_candidates, "
        "transformers/generation/candidate_generator.py:1080-1102 in 5.24) and hf_prompt_lookup; latest = the most "
        "recent (ours before, kept to compare: the nearest context is often the one that repeats)",
        choices=("earliest", "latest"))



def lookup(tokens: Sequence[int], max_ngram: int, count: int, match: str = "latest",
           eos: Collection[int] = ()) -> list[int]:
    """Prompt lookup decoding: the tokens after an earlier occurrence of the longest suffix n-gram.

    Tries n = max_ngram .. 1 and takes, for the first n with a match, the `match` one: earliest = the first
    occurrence, as transformers' PromptLookupCandidateGenerator.get_candidates (transformers/generation/
    candidate_generator.py:1080-1102, v5.24) does; latest = the most recent. Returns at most `count` tokens, cut
    before the first token of `eos` (as transformers' :1133-1141; nothing left = no draft), or [] without a match.
    The hybrid generator passes --lookup_match (default earliest).
    """
    if match not in LOOKUP_MATCHES:
        raise ValueError(f"unknown lookup match {match!r}")
    seq = list(tokens)
    for n in range(min(max_ngram, len(seq) - 1), 0, -1):
        tail = seq[-n:]
        starts = range(len(seq) - n)  # every occurrence but the suffix itself; the next token always exists
        for start in (starts if match == "earliest" else reversed(starts)):
            if seq[start:start + n] == tail:
                found = seq[start + n:start + n + count]
                cut = next((i for i, t in enumerate(found) if t in eos), len(found))
                return found[:cut]
    return []


@register("self_speculative")
class SelfSpeculative(Generator):
    """LayerSkip self-speculation: draft with E layers, verify with the rest in one pass (lossless)."""

    use_lookup = False
    lossless = True
    short, family = "SS", "speculative (lossless)"
    label_knobs = ("num_speculations",)
    in_all = 1
    options = DraftOptions
    sweep_knobs = ("exit_layer", "num_speculations")
    draft_depth = True

    def artifact_key(self) -> str:
        return "self_speculative"

    def validate(self) -> None:
        m, c = self.model, self.config
        L, e = m.num_layers, c.exit_layer
        if e is None:
            raise UsageError(f"{self.name} needs --exit_layer E (the draft depth, 1..L-1), or trained exits that "
                             "recommend one (--exits)")
        if e >= L:
            raise UsageError(f"{self.name} needs --exit_layer below the model's {L} layers, got {e}")
        k = c.num_speculations
        if k is not None and k < 1:
            raise UsageError(f"--num_speculations must be >= 1, got {k}")
        self.k = k or DEFAULT_SPECULATIONS
        self.rows = None
        if c.draft_vocab:
            vocab = m.exits.vocab if m.exits is not None else None
            if vocab is None:
                raise UsageError("--draft_vocab needs an exit artifact with a candidate vocabulary (--exits); "
                                 "train one with python -m harness.train --recipe exit_adapters")
            if c.draft_vocab != len(vocab):
                raise UsageError(f"--draft_vocab is 0 (full head) or the artifact's {len(vocab)} candidate rows, "
                                 f"got {c.draft_vocab}")
            self.rows = m.exit_vocab if m.exit_vocab is not None else vocab.to(m.head_device)
        self.threshold = c.draft_threshold or 0.0
        if not 0.0 <= self.threshold <= 1.0:
            raise UsageError(f"--draft_threshold must be in [0, 1], got {self.threshold}")
        if self.use_lookup:
            self.validate_lookup()
        self.stats = {}

    def validate_lookup(self) -> None:
        c = self.config
        if c.lookup_ngram < 1 or c.lookup_tokens < 1:
            raise UsageError("--lookup_ngram and --lookup_tokens must be >= 1")
        if c.lookup_match not in LOOKUP_MATCHES:
            raise UsageError(f"--lookup_match must be one of {', '.join(LOOKUP_MATCHES)}, got {c.lookup_match!r}")

    def knobs(self) -> dict:
        out = {"exit_layer": self.config.exit_layer, "num_speculations": self.k,
               "draft_vocab": 0 if self.rows is None else len(self.rows), "draft_threshold": self.threshold}
        if self.use_lookup:
            out.update(lookup_ngram=self.config.lookup_ngram, lookup_tokens=self.config.lookup_tokens,
                       lookup_match=self.config.lookup_match)
        return out

    def log_state(self) -> Optional[dict]:
        return dict(self.stats) if self.stats else None

    # -- proposer ---------------------------------------------------------------------------
    def draft(self, token: int, pos: int, k: int, cache, eos: set[int]):
        """Up to k draft tokens after `token` (at `pos`); keeps each layer-E state for the scorer.

        Returns (states, drafted, probs): states[i] is the layer-E state of the input at pos+i. A draft below
        the confidence threshold is dropped and drafting stops; its input's state is kept (the scorer needs it).
        """
        m, E = self.model, self.config.exit_layer
        states, drafted, probs = [], [], []
        for i in range(k):
            h = m.run_layers(m.embed(self.ids([token])), 0, E, cache, pos + i)
            states.append(h)
            logits = m.exit_logits(h, self.rows, layer=E)[0, -1]
            if self.sampler.greedy:
                j = int(logits.argmax())
                conf = float(torch.softmax(logits.float(), -1)[j]) if self.threshold > 0 else 1.0
            else:
                q = self.sampler.probs(logits)
                j = int(torch.multinomial(q, 1, generator=self.sampler.rng))
                conf = float(q.max())
                if self.rows is not None:  # the draft distribution over the whole vocabulary (0 off the rows)
                    q = torch.zeros(m.vocab_size, dtype=q.dtype, device=q.device).index_copy_(0, self.rows, q)
            if conf < self.threshold:
                break
            token = int(self.rows[j]) if self.rows is not None else j
            drafted.append(token)
            if not self.sampler.greedy:
                probs.append(q)
            if token in eos:  # nothing useful can follow an end of sequence
                break
        return states, drafted, probs

    # -- scorer -----------------------------------------------------------------------------
    def score(self, states: list, drafted: list[int], token: int, pos: int, cache) -> torch.Tensor:
        """Full-model logits at positions pos..pos+len(drafted), reusing the drafts' layer-E states.

        `token` sits at `pos`; with no drafts the pass is one plain full-depth step for it.
        """
        m, E = self.model, self.config.exit_layer
        if len(states) <= len(drafted):  # the last draft's input has not been through layers 0..E yet
            last = m.run_layers(m.embed(self.ids((drafted or [token])[-1:])), 0, E, cache, pos + len(drafted))
            states = states + [last]
        h = m.run_layers(torch.cat(states, dim=1), E, m.num_layers, cache, pos)
        return m.exit_logits(h)[0]

    def score_full(self, drafted: list[int], token: int, pos: int, cache) -> torch.Tensor:
        """Full-model logits for `token` and lookup drafts (no layer-E states): all layers, one pass."""
        m = self.model
        return m.exit_logits(m.run_layers(m.embed(self.ids([token] + drafted)), 0, m.num_layers, cache, pos))[0]

    @torch.inference_mode()
    def generate(self, prompt_ids: Sequence[int], stop: StopCondition,
                 on_tokens: Optional[TokenCallback] = None) -> GenerationResult:
        m, L, E = self.model, self.model.num_layers, self.config.exit_layer
        cache, token, t0, t1 = self.prefill(prompt_ids)
        out, pos = Output(stop, on_tokens), len(prompt_ids)  # `token` sits at `pos`, not yet processed
        stats = {"drafted": 0, "accepted": 0, "lookup_steps": 0, "lookup_drafted": 0, "lookup_accepted": 0,
                 "steps": 0, "draft_passes": 0}
        finished = out.add([token], [L])
        # components: lookup (hybrid: n-gram search) / draft (layers 0..E-1 + exit head, per draft) / verify (layers
        # E..L-1, or all L for lookup drafts, over the drafts + 1, and the full head) / accept (verifier + cache crop)
        timer = self.timer
        while not finished:
            # a+1 tokens come out of a step (accepted drafts + the verifier's token): draft at most one
            # fewer than may still be emitted, so no token past max_steps is ever produced or counted
            room = stop.remaining(len(out.tokens)) - 1
            eos = set() if stop.fixed_length else stop.eos_ids
            found = []
            if self.use_lookup and room > 0:
                with timer("lookup"):
                    found = lookup(list(prompt_ids) + out.tokens, self.config.lookup_ngram,
                                   min(self.config.lookup_tokens, room), self.config.lookup_match, eos)
            if found:
                drafted, depth = found, L
                with timer("verify"):
                    logits = self.score_full(drafted, token, pos, cache)
                q = [torch.nn.functional.one_hot(torch.tensor(t, device=logits.device), m.vocab_size).to(logits.dtype)
                     for t in drafted] if not self.sampler.greedy else []
            else:
                k = min(self.k, room)
                with timer("draft"):
                    states, drafted, q = self.draft(token, pos, k, cache, eos) if k > 0 else ([], [], [])
                stats["draft_passes"] += len(states)  # one state per draft forward (an unsure, dropped one too)
                with timer("verify"):
                    logits = self.score(states, drafted, token, pos, cache)
                depth = E
            with timer("accept"):
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
            finished = out.add(drafted[:a] + [nxt], [depth] * a + [L])
            # accepted drafts cut off by a stop (EOS / stop string inside the chunk) are not counted
            kept = min(a, (out.done[0] if finished else len(out.tokens)) - before)
            prefix = "lookup_" if found else ""
            stats[prefix + "drafted"] += len(drafted)
            stats[prefix + "accepted"] += kept
            stats["lookup_steps"] += bool(found)
            stats["steps"] += 1
        self.stats = stats if self.use_lookup else {"steps": stats["steps"]}
        return self.result(out, t0, t1, self.clock(), drafted=stats["drafted"] + stats["lookup_drafted"],
                           accepted=stats["accepted"] + stats["lookup_accepted"], verify_passes=stats["steps"],
                           draft_passes=stats["draft_passes"])
