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
from typing import Optional, Sequence

import torch

from ..config import UsageError, knob
from .base import GenerationResult, Generator, Output, StopCondition, TokenCallback, register
from .proposers import LOOKUP_MATCHES, EarlyExitProposer, LookupProposer, ModelProposer, Proposal, Scored

# The model drafters a self-speculation loop can ask after prompt lookup: name -> factory(generator) -> proposer.
# "exit" is LayerSkip's early exit (below); trained drafters register theirs from their own method files
# (kangaroo.py, eagle.py), so self_speculative:drafter=kangaroo is LayerSkip's loop with Kangaroo's adapter.
MODEL_DRAFTERS: dict = {}
# What one forward of each of those drafters streams, for the report's oracle speedup (harness/oracle.py):
# name -> fn(run.json model record, run knobs) -> oracle.DraftShape, or None when the record lacks a figure.
DRAFTER_SHAPES: dict = {}


def draft_rows(model: dict, knobs: dict) -> int:
    """Vocabulary rows of a draft readout: the run's draft_vocab (the candidate rows), else the full head."""
    return int(knobs.get("draft_vocab") or model["vocab_size"])


def early_exit_shape(model: dict, knobs: dict, module_weights: float):
    """A drafter that runs the first E (exit_layer) trunk layers and then a module of `module_weights` parameters,
    whose layer-E states verification resumes from; None when the records lack a figure."""
    from ..oracle import DraftShape, layer_weights

    E, per = knobs.get("exit_layer"), layer_weights(model)
    if E is None or per is None:
        return None
    return DraftShape(layers=E + module_weights / per, head_rows=draft_rows(model, knobs), verify_from=E)


def exit_shape(model: dict, knobs: dict):
    """LayerSkip's early exit: plus the trained adapter's two products (hidden x width each) where an attached
    artifact has one at E (model.exit_logits reads it there)."""
    exits = model.get("exits") or {}
    adapter = 2 * model.get("hidden_size", 0) * exits["adapter_width"] \
        if knobs.get("exit_layer") in (exits.get("adapter_layers") or ()) and exits.get("adapter_width") else 0.0
    return early_exit_shape(model, knobs, adapter)


DRAFTER_SHAPES["exit"] = exit_shape

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
class DrafterChoice:
    """which model drafter the loop asks"""

    drafter: str = knob(
        "exit",
        "self_speculative, hybrid_speculative: the model drafter: exit = the early exit after --exit_layer layers "
        "(LayerSkip; through its stateless adapter when trained exits are attached); kangaroo = the early exit "
        "through the trained Kangaroo adapter (attention + norms, its own K/V) at the layer it was trained for; "
        "eagle = the trained EAGLE head (one decoder layer over the last layer's features). Trained drafters need an "
        "exit artifact holding them (--exits; make exits ships them)")


@dataclass
class SelfSpeculativeOptions(DrafterChoice, DraftOptions):
    """self-speculation's drafting knobs"""


@register("self_speculative")
class SelfSpeculative(Generator):
    """LayerSkip self-speculation: draft with E layers, verify with the rest in one pass (lossless)."""

    drafters: tuple = ("exit",)  # its proposers, asked in order ("lookup": prompt lookup, "exit": the early exit)
    lossless = True
    short, family = "SS", "speculative (lossless)"
    label_knobs = ("num_speculations",)
    in_all = 1
    options = SelfSpeculativeOptions
    sweep_knobs = ("exit_layer", "num_speculations")
    draft_stop = "drop"  # the confidence rule (proposers.ModelProposer.chain): the LayerSkip fork drops an unsure draft
    draft_depth = True

    def artifact_key(self) -> str:
        """The early exit's recommendation is fitted to it: another drafter in the same loop has its own key."""
        drafter = getattr(self.config, "drafter", None) or "exit"
        return "self_speculative" if drafter == "exit" else f"self_speculative:drafter={drafter}"

    @classmethod
    def spec_defaults(cls, base, over: dict, num_layers: int, exits) -> dict:
        if (over.get("drafter") or getattr(base, "drafter", None) or "exit") != "exit":
            return {}  # a trained drafter's depth is its own
        return super().spec_defaults(base, over, num_layers, exits)

    def validate(self) -> None:
        self.proposers = []
        if "lookup" in self.drafters:
            self.proposers.append(self.lookup_proposer())
        if "exit" in self.drafters:
            self.proposers.append(self.model_proposer())
        self.keep_layer = next((p.keep_layer for p in self.proposers if getattr(p, "keep_layer", None)), None)
        self.stats = {}

    def drafter_name(self) -> str:
        """Which MODEL_DRAFTERS entry drafts (the `drafter` knob where the method has it)."""
        return getattr(self.config, "drafter", None) or "exit"

    def model_proposer(self) -> ModelProposer:
        name = self.drafter_name()
        if name == "exit":
            return self.exit_proposer()
        from . import load_all

        load_all()  # the trained drafters register from their method files
        if name not in MODEL_DRAFTERS:
            raise UsageError(f"--drafter {name!r}: choose one of exit, {', '.join(sorted(MODEL_DRAFTERS))}")
        return MODEL_DRAFTERS[name](self)

    def draft_settings(self) -> None:
        """num_speculations, draft_vocab and draft_threshold, checked: self.k, self.rows, self.threshold."""
        m, c = self.model, self.config
        k = c.num_speculations
        if k is not None and k < 1:
            raise UsageError(f"--num_speculations must be >= 1, got {k}")
        self.k = k or self.default_speculations()
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
        self.threshold = self.default_threshold() if c.draft_threshold is None else c.draft_threshold
        if not 0.0 <= self.threshold <= 1.0:
            raise UsageError(f"--draft_threshold must be in [0, 1], got {self.threshold}")

    def default_speculations(self) -> int:
        """num_speculations when neither the user nor the artifact sets it."""
        return DEFAULT_SPECULATIONS

    def default_threshold(self) -> float:
        """draft_threshold when neither the user nor the artifact sets it."""
        return 0.0

    def exit_proposer(self) -> EarlyExitProposer:
        m, c = self.model, self.config
        L, e = m.num_layers, c.exit_layer
        if e is None:
            from ..speedup_model import predicted, recommendation

            rec = recommendation(m.exits) if m.exits is not None and self.artifact_key() == "self_speculative" \
                else None
            if rec is not None and not rec["speculate"]:  # the exits were given, and their verdict here is "don't"
                raise UsageError(f"{self.name}: the exit artifact's recommender predicts no setting clearly above 1.0x "
                                 f"on this {m.device.type} in {str(m.dtype).removeprefix('torch.')} (best "
                                 f"{predicted(rec.get('best', {}))}): don't speculate; pass --exit_layer E to run it "
                                 "anyway")
            raise UsageError(f"{self.name} needs --exit_layer E (the draft depth, 1..L-1), or trained exits that "
                             "recommend one (--exits)")
        if e >= L:
            raise UsageError(f"{self.name} needs --exit_layer below the model's {L} layers, got {e}")
        self.draft_settings()
        return EarlyExitProposer(m, e, self.k, self.rows, self.threshold, self.sampler, self.ids, self.draft_stop)

    def lookup_proposer(self) -> LookupProposer:
        c = self.config
        if c.lookup_ngram < 1 or c.lookup_tokens < 1:
            raise UsageError("--lookup_ngram and --lookup_tokens must be >= 1")
        if c.lookup_match not in LOOKUP_MATCHES:
            raise UsageError(f"--lookup_match must be one of {', '.join(LOOKUP_MATCHES)}, got {c.lookup_match!r}")
        return LookupProposer(c.lookup_ngram, c.lookup_tokens, c.lookup_match, self.model.num_layers)

    def knobs(self) -> dict:
        out = {"exit_layer": self.config.exit_layer, "num_speculations": self.k,
               "draft_vocab": 0 if self.rows is None else len(self.rows), "draft_threshold": self.threshold}
        if hasattr(self.config, "drafter") and "exit" in self.drafters:
            out["drafter"] = self.drafter_name()
        if "lookup" in self.drafters:
            out.update(lookup_ngram=self.config.lookup_ngram, lookup_tokens=self.config.lookup_tokens,
                       lookup_match=self.config.lookup_match)
        return out

    def log_state(self) -> Optional[dict]:
        return dict(self.stats) if self.stats else None

    # -- proposers: the first one with a draft wins -----------------------------------------
    def propose(self, context: list[int], token: int, pos: int, room: int, cache, eos: set[int]) -> Proposal:
        """The step's drafts: a lookup copy if there is one, else the early exit's (components timed apart)."""
        for proposer in self.proposers:
            if isinstance(proposer, LookupProposer):
                if room <= 0:
                    continue
                with self.timer("lookup"):
                    found = proposer.propose(context, room, eos)
                if found is not None:
                    return found
            else:
                with self.timer("draft"):
                    return proposer.propose(token, pos, room, cache, eos)
        return Proposal([], depth=self.model.num_layers, source="none")  # one plain step

    # -- scorer -----------------------------------------------------------------------------
    def score(self, p: Proposal, token: int, pos: int, cache) -> torch.Tensor:
        """Full-model logits at positions pos..pos+len(drafts) (`token` sits at `pos`). Early-exit drafts resume
        at layer E from their kept states, so layers 1..E are never recomputed; other drafts (and none) go
        through all L layers in one pass. What the pass computed is kept in self.scored for the drafters."""
        m, L = self.model, self.model.num_layers
        if p.depth >= L:
            h = m.embed(self.ids([token] + p.tokens))
            kept = None
            if self.keep_layer is not None:  # a drafter reads these positions' states at its layer
                rope = m.rope(h, pos)
                kept = h = m.run_layers(h, 0, self.keep_layer, cache, pos, rope=rope)
                h = m.run_layers(h, self.keep_layer, L, cache, pos, rope=rope)
            else:
                h = m.run_layers(h, 0, L, cache, pos)
            self.scored = Scored(h, kept)
            return m.exit_logits(h)[0]
        E, states = p.depth, p.states
        if len(states) <= len(p.tokens):  # the last draft's input has not been through layers 0..E yet
            last = m.run_layers(m.embed(self.ids((p.tokens or [token])[-1:])), 0, E, cache, pos + len(p.tokens))
            states = states + [last]
        kept = torch.cat(states, dim=1)
        h = m.run_layers(kept, E, L, cache, pos)
        self.scored = Scored(h, kept if E == self.keep_layer else None)
        return m.exit_logits(h)[0]

    # -- verifier ---------------------------------------------------------------------------
    def verify(self, p: Proposal, logits: torch.Tensor) -> tuple[int, int]:
        """(accepted drafts, the full model's next token)."""
        if not p.tokens:
            return 0, self.sampler.pick(logits[-1:])
        if self.sampler.greedy:
            return verify_greedy(p.tokens, logits)
        q = p.probs or [torch.nn.functional.one_hot(torch.tensor(t, device=logits.device), self.model.vocab_size)
                        .to(logits.dtype) for t in p.tokens]  # a copied draft is certain: q is a point mass
        return verify_sampling(p.tokens, torch.stack(q), self.sampler.probs(logits), self.sampler.rng)

    @torch.inference_mode()
    def generate(self, prompt_ids: Sequence[int], stop: StopCondition,
                 on_tokens: Optional[TokenCallback] = None) -> GenerationResult:
        m, L = self.model, self.model.num_layers
        cache, token, t0, t1 = self.prefill(prompt_ids, keep=self.keep_layer)
        if self.keep_layer is not None:  # draft modules read the prompt (part of the prefill's time)
            for proposer in self.proposers:
                if isinstance(proposer, ModelProposer):
                    proposer.start(prompt_ids, token, self.prefill_states)
            self.prefill_states = None
            t1 = self.clock()
            m.reset_counters()
        out, pos = Output(stop, on_tokens), len(prompt_ids)  # `token` sits at `pos`, not yet processed
        stats = {"drafted": 0, "accepted": 0, "lookup_steps": 0, "lookup_drafted": 0, "lookup_accepted": 0,
                 "steps": 0, "draft_passes": 0}
        emitted, offered = [], []  # per verification pass: tokens it emitted, tokens drafted before it
        finished = out.add([token], [L])
        # components: lookup (n-gram search) / draft (layers 0..E-1 + exit head, per draft) / verify (layers E..L-1,
        # or all L for other drafts, over the drafts + 1, and the full head) / accept (verifier + cache crop)
        while not finished:
            # a+1 tokens come out of a step (accepted drafts + the verifier's token): draft at most one
            # fewer than may still be emitted, so no token past max_steps is ever produced or counted
            room = stop.remaining(len(out.tokens)) - 1
            eos = set() if stop.fixed_length else stop.eos_ids
            p = self.propose(list(prompt_ids) + out.tokens, token, pos, room, cache, eos)
            stats["draft_passes"] += p.passes
            with self.timer("verify"):
                logits = self.score(p, token, pos, cache)
            with self.timer("accept"):
                a, nxt = self.verify(p, logits)
                m.crop(cache, pos + a + 1)  # keep x, y1..ya; their K/V are now the full model's at every layer
                for proposer in self.proposers:
                    if isinstance(proposer, ModelProposer):
                        proposer.accepted(p, a, nxt, pos, self.scored)
            pos += a + 1
            token = nxt
            before = len(out.tokens)
            finished = out.add(p.tokens[:a] + [nxt], [p.depth] * a + [L])
            # accepted drafts cut off by a stop (EOS / stop string inside the chunk) are not counted
            kept = min(a, (out.done[0] if finished else len(out.tokens)) - before)
            emitted.append((out.done[0] if finished else len(out.tokens)) - before)
            offered.append(len(p.tokens))
            prefix = "lookup_" if p.source == "lookup" else ""
            stats[prefix + "drafted"] += len(p.tokens)
            stats[prefix + "accepted"] += kept
            stats["lookup_steps"] += p.source == "lookup"
            stats["steps"] += 1
        self.stats = stats if "lookup" in self.drafters else {"steps": stats["steps"]}
        return self.result(out, t0, t1, self.clock(), drafted=stats["drafted"] + stats["lookup_drafted"],
                           accepted=stats["accepted"] + stats["lookup_accepted"], verify_passes=stats["steps"],
                           draft_passes=stats["draft_passes"], accept_lengths=emitted, step_drafts=offered)


class TrainedDrafter(SelfSpeculative):
    """A method whose drafter is a trained module of the exit artifact (kangaroo.py, eagle.py): its own name is its
    drafter, its artifact key and its place in `all` (only when the artifact holds the module, `marker`); it keeps
    the reference's confidence rule (Kangaroo's keep) and has no shared draft depth."""

    options = DraftOptions
    sweep_knobs = ()
    draft_stop = "keep"
    draft_depth = False  # the drafter's depth is the module's, not a shared --exit_layer's
    label_knobs = ("num_speculations", "draft_threshold")
    marker: str = ""  # a tensor key the artifact holds when it holds this drafter

    @classmethod
    def all_specs(cls, base, exits) -> list[dict]:
        return [{}] if exits is not None and cls.marker in exits.tensors else []

    @classmethod
    def spec_defaults(cls, base, over: dict, num_layers: int, exits) -> dict:
        return {}

    def artifact_key(self) -> str:
        return self.name

    def drafter_name(self) -> str:
        return self.name
