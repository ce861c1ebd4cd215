"""Draft proposers for speculative decoding, split as in vLLM (vllm/v1/spec_decode/ngram_proposer.py): a proposer
turns the text so far into a `Proposal`; self_speculative.py's one scorer and one verifier check it.

  LookupProposer     prompt lookup decoding (Saxena 2023): the tokens after an earlier occurrence of the last n-gram
                     of the prompt and the text so far; free to make, so its drafts have no layer states
  EarlyExitProposer  LayerSkip's self-speculative drafts: up to k tokens from the first E layers and the shared exit
                     head (through the exit's trained adapter when an artifact is attached; optionally on its
                     candidate rows only, and ended by a confidence rule, `drop` or Kangaroo's `keep`), keeping each
                     input's layer-E state for the scorer
  ModelProposer      their base: chains of model drafts with start / accepted hooks, through which a draft module
                     with a K/V cache of its own (kangaroo.py's adapter, eagle.py's head) follows the verified text
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Collection, Optional, Sequence

import torch

from ..config import knob

LOOKUP_MATCHES = ("earliest", "latest")


@dataclass
class Proposal:
    """Draft tokens, and what the scorer and the verifier need to know of how they were made."""

    tokens: list[int]  # the drafts (empty: the step is one plain full-depth token)
    depth: int  # layers behind each draft (its exit layer in the run log): E for an early exit, L for a copy
    source: str  # "exit" | "lookup" | "none": which drafter made it (and which counters it adds to)
    states: list = field(default_factory=list)  # early exit: each input's layer-E state (the scorer resumes at E)
    probs: list = field(default_factory=list)  # sampled early-exit drafts: each one's distribution (q)
    passes: int = 0  # drafter forwards spent, an unsure dropped draft's included
    confs: list = field(default_factory=list)  # model drafts: each kept draft's confidence (top-1 probability)


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
    LookupProposer passes --lookup_match (default earliest).
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


class LookupProposer:
    """Prompt lookup: an n-gram copy from the prompt and the text so far, or nothing."""

    def __init__(self, ngram: int, most: int, match: str, num_layers: int):
        self.ngram, self.most, self.match, self.num_layers = ngram, most, match, num_layers

    def propose(self, context: Sequence[int], room: int, eos: Collection[int]) -> Optional[Proposal]:
        """At most min(most, room) copied tokens, or None without a match (or without room)."""
        found = lookup(context, self.ngram, min(self.most, room), self.match, eos) if room > 0 else []
        return Proposal(found, depth=self.num_layers, source="lookup") if found else None


@dataclass
class Scored:
    """What the scorer's verification pass computed, for drafters that learn from it (proposer.accepted)."""

    final: torch.Tensor  # (1, n, d) last layer's hidden states (pre-norm) of positions pos..pos+n-1
    kept: Optional[torch.Tensor] = None  # (1, n, d) hidden states after `keep_layer` layers, where a drafter asked


class ModelProposer:
    """A drafter that runs part of the model or a module of its own, one draft at a time.

    The loop (self_speculative.py) calls `start` after the prefill, `propose` each step, and `accepted` after each
    verification (whichever proposer drafted), so that a draft module with a K/V cache of its own can crop it to
    the accepted positions and catch up on them. `keep_layer`: the depth whose hidden states `start` and `accepted`
    need (None: none).
    """

    keep_layer: Optional[int] = None
    STOPS = ("drop", "keep")

    def __init__(self, model, k: int, rows: Optional[torch.Tensor], threshold: float, sampler, ids: Callable,
                 stop: str = "drop"):
        if stop not in self.STOPS:
            raise ValueError(f"unknown draft stop rule {stop!r}")
        self.model, self.k, self.rows, self.threshold, self.stop = model, k, rows, threshold, stop
        self.sampler, self.ids = sampler, ids

    def start(self, prompt_ids: Sequence[int], token: int, states: Optional[torch.Tensor]) -> None:
        """A new generation: the prompt's hidden states after `keep_layer` layers; `token` sits at len(prompt)."""

    def accepted(self, p: Proposal, a: int, nxt: int, pos: int, scored: Scored) -> None:
        """The verifier kept p.tokens[:a] (at pos+1..pos+a) and then emitted `nxt` (at pos+a+1)."""

    def pick(self, logits: torch.Tensor) -> tuple[int, float, Optional[torch.Tensor]]:
        """(draft token, its confidence = top-1 probability on the draft head, its distribution q when sampling)."""
        m = self.model
        if self.sampler.greedy:
            j = int(logits.argmax())
            conf = float(torch.softmax(logits.float(), -1)[j]) if self.threshold > 0 else 1.0
            q = None
        else:
            q = self.sampler.probs(logits)
            j = int(torch.multinomial(q, 1, generator=self.sampler.rng))
            conf = float(q.max())
            if self.rows is not None:  # the draft distribution over the whole vocabulary (0 off the rows)
                q = torch.zeros(m.vocab_size, dtype=q.dtype, device=q.device).index_copy_(0, self.rows, q)
        return (int(self.rows[j]) if self.rows is not None else j), conf, q

    def chain(self, step: Callable[[int, int], torch.Tensor], token: int, room: int, eos: Collection[int],
              drafted: list, probs: list, confs: Optional[list] = None) -> int:
        """Draft up to min(k, room) tokens: step(i, input token) -> the draft head's logits for position i + 1.
        The confidence rule: `drop` (LayerSkip fork) drops the first draft below the threshold and stops; `keep`
        (Kangaroo, inference_kangaroo.py:74 at 4f0949d) keeps it, verifies it, and stops after it. Returns the
        draft passes spent."""
        passes = 0
        for i in range(min(self.k, room)):
            logits = step(i, token)
            passes += 1
            token, conf, q = self.pick(logits)
            unsure = conf < self.threshold
            if unsure and self.stop == "drop":
                break
            drafted.append(token)
            if confs is not None:
                confs.append(conf)
            if q is not None:
                probs.append(q)
            if unsure or token in eos:  # nothing useful can follow an end of sequence
                break
        return passes


class EarlyExitProposer(ModelProposer):
    """LayerSkip's drafter: the first `exit_layer` layers and the exit head, one token at a time."""

    def __init__(self, model, exit_layer: int, k: int, rows: Optional[torch.Tensor], threshold: float, sampler,
                 ids: Callable, stop: str = "drop"):
        super().__init__(model, k, rows, threshold, sampler, ids, stop)
        self.exit_layer = exit_layer

    def exit_head(self, h: torch.Tensor, pos: int) -> torch.Tensor:
        """The draft head on the layer-E state of position `pos`: the exit (through its stateless adapter)."""
        return self.model.exit_logits(h, self.rows, layer=self.exit_layer)[0, -1]

    def propose(self, token: int, pos: int, room: int, cache, eos: Collection[int]) -> Proposal:
        """Up to min(k, room) drafts after `token` (at `pos`). states[i] is the layer-E state of the input at pos+i
        (an unsure dropped draft's input included: the scorer needs it)."""
        m, E = self.model, self.exit_layer
        states, drafted, probs, confs = [], [], [], []

        def step(i: int, tok: int) -> torch.Tensor:
            h = m.run_layers(m.embed(self.ids([tok])), 0, E, cache, pos + i)
            states.append(h)
            return self.exit_head(h, pos + i)

        passes = self.chain(step, token, room, eos, drafted, probs, confs)
        return Proposal(drafted, depth=E, source="exit", states=states, probs=probs, passes=passes, confs=confs)
