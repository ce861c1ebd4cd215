"""One token's intermediate exits, shared by calm, free and dynamic.

An `ExitProbe` holds the token's hidden state at every depth it reached and evaluates the exit head
lazily, at most once per depth (as the expert whose exit is considered, or as an amateur layer for
contrastive confidence: the fork's `prev_probits` cache), on the full vocabulary or on the rows kept by
vocabulary reduction. It tallies the exit-head FLOPs spent only on deciding whether to exit: every
evaluation except the one whose logits pick the emitted token.

Vocabulary reduction (Confidently_Exiting models/deploying_t5.py ~751-752, ~1008-1066): the first exit
considered evaluates the full head and ranks its top k = decaying_k(first) rows by logit, highest first;
every later depth is scored on a prefix of that ranking: all of it (`fixed`), decaying_k(depth) rows
(`decaying`), or V*(1 - 0.9 * previous layer's confidence) rows (`adaptive`). Prefixes of a ranking
sorted by logit value are the rows the schedules mean; a ranking sorted by vocabulary index would keep
arbitrary rows. Every distribution of a depth is a softmax over the rows the expert is scored on.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch

from .. import exit_rules
from ..model import LayeredModel

if TYPE_CHECKING:  # assembled from the generators: not importable while they load
    from ..config import GenerationConfig

Logits = tuple[torch.Tensor, Optional[int]]  # (logits, k): columns are ranking[:k], or the full vocabulary if k is None

# CALM's trained early-exit classifier in an exit artifact (harness/train/calm.py writes it): one linear layer per
# exit depth on that depth's raw hidden state, tensors "<prefix><depth>.weight" (1, hidden) and ".bias" (1,).
CLASSIFIER_PREFIX = "calm.classifier."


def classifier_depths(model: LayeredModel) -> list[int]:
    """Depths 1..L-1 at which the attached exit artifact holds a CALM classifier (empty without one)."""
    art = model.exits
    if art is None:
        return []
    out = []
    for key in art.tensors:
        if key.startswith(CLASSIFIER_PREFIX) and key.endswith(".weight"):
            depth = key[len(CLASSIFIER_PREFIX):-len(".weight")]
            if depth.isdigit() and 1 <= int(depth) < model.num_layers:
                out.append(int(depth))
    return sorted(out)


def classifier_at(model: LayeredModel, depth: int) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """(weight (hidden,), bias ()) of the classifier at `depth`, fp32 on that layer's device, or None.

    Copies to the device are cached on the artifact and redone when its tensors are replaced or changed in place.
    """
    art = model.exits
    w = art.tensors.get(f"{CLASSIFIER_PREFIX}{depth}.weight") if art is not None else None
    b = art.tensors.get(f"{CLASSIFIER_PREFIX}{depth}.bias") if art is not None else None
    if w is None or b is None:
        return None
    cache = art.__dict__.setdefault("_classifier_cache", {})
    dev = model.layer_devices[depth - 1]
    hit = cache.get((depth, str(dev)))
    if hit is None or hit[0] is not w or hit[1] is not b or hit[2] != (w._version, b._version):
        hit = cache[(depth, str(dev))] = (w, b, (w._version, b._version),
                                          w.detach().reshape(-1).to(dev, torch.float32),
                                          b.detach().reshape(()).to(dev, torch.float32))
    return hit[3], hit[4]


class ExitProbe:
    """Hidden states, exit logits and exit distributions of one token, by depth (0 = embeddings)."""

    def __init__(self, model: LayeredModel, config: GenerationConfig, first_exit: int, measure: Optional[str] = None):
        self.model = model
        self.config = config
        self.first_exit = first_exit  # first depth whose exit is considered: the full head there starts the ranking
        self.contrastive = measure if measure in exit_rules.CONTRASTIVE_MIN_DEPTH else None
        self.hidden: dict[int, torch.Tensor] = {}
        self.ranking: Optional[torch.Tensor] = None  # vocabulary ids by the first exit's logits, descending
        self.layer_conf: dict[int, float] = {}  # confidence read at each depth (adaptive reduction uses depth-1)
        self.state: dict = {}  # per-token state of a criterion across depths (token_repeat's counter)
        self._expert: dict[int, Logits] = {}
        self._amateur: dict[int, Logits] = {}
        self._dist: dict[int, torch.Tensor] = {}
        self._expert_flops: dict[int, float] = {}
        self._flops = 0.0
        self._picked: Optional[int] = None

    # -- head evaluations ---------------------------------------------------------------------------
    def _head(self, depth: int, k: Optional[int]) -> torch.Tensor:
        rows = None if k is None else self.ranking[:k]
        out = self.model.exit_logits(self.hidden[depth], rows, layer=depth).reshape(-1)
        self._flops += self.model.head_flops(out.numel())
        return out

    def _rows(self, depth: int) -> Optional[int]:
        """Prefix length of the ranking scored at `depth` (None = full vocabulary)."""
        mode, c = self.config.vocab_reduction, self.config
        if mode == "none" or self.ranking is None:
            return None
        k0 = len(self.ranking)
        if mode == "fixed":
            return k0
        if mode == "decaying":
            return min(k0, exit_rules.decaying_k(depth, self.model.num_layers, c.vocab_k, c.vocab_k_min))
        prev = self.layer_conf.get(depth - 1)
        if prev is None and depth - 1 in self._expert:
            prev = self.record(depth - 1, exit_rules.max_prob(self.distribution(depth - 1)))
        return k0 if prev is None else min(k0, max(2, exit_rules.adaptive_k(self.model.vocab_size, prev)))

    def logits(self, depth: int) -> Logits:
        """The exit logits at `depth` as the expert (evaluated once)."""
        if depth not in self._expert:
            k = self._rows(depth)
            out = self._head(depth, k)
            self._expert_flops[depth] = self.model.head_flops(out.numel())
            self._expert[depth] = (out, k)
            c = self.config
            if c.vocab_reduction != "none" and self.ranking is None and depth >= self.first_exit:
                k0 = min(self.model.vocab_size,
                         exit_rules.decaying_k(depth, self.model.num_layers, c.vocab_k, c.vocab_k_min))
                self.ranking = out.topk(k0, sorted=True).indices  # by logit, highest first
        return self._expert[depth]

    def _amateur_logits(self, depth: int, k: Optional[int]) -> torch.Tensor:
        """Logits at `depth` on the rows ranking[:k], reused from any earlier evaluation that covers them."""
        for lg, kc in (e for e in (self._expert.get(depth), self._amateur.get(depth)) if e is not None):
            if kc is None:
                return lg if k is None else lg[self.ranking[:k]]
            if k is not None and kc >= k:
                return lg[:k]
        out = self._head(depth, k)
        self._amateur[depth] = (out, k)
        return out

    # -- what exit rules read -----------------------------------------------------------------------
    def distribution(self, depth: int) -> torch.Tensor:
        """softmax of the exit logits, or the contrastive distribution against the amateur layer."""
        if depth not in self._dist:
            logits, k = self.logits(depth)
            p = torch.softmax(logits.float(), dim=-1)
            if self.contrastive == "contrastive":  # amateur = depth // 2 (deploying_t5.py: layer_am = i//2)
                p_am = torch.softmax(self._amateur_logits(depth // 2, k).float(), dim=-1)
                p = exit_rules.contrastive_distribution(p, p_am, self.config.contrastive_alpha)
            elif self.contrastive == "jsd_contrastive":
                am = {d: torch.softmax(self._amateur_logits(d, k).float(), dim=-1) for d in range(2, depth)}
                best = exit_rules.jsd_amateur(p, am, depth, self.config.contrastive_alpha)
                p = exit_rules.jsd_contrastive_distribution(p, am[best], self.config.contrastive_alpha)
            self._dist[depth] = p
        return self._dist[depth]

    def record(self, depth: int, confidence: float) -> float:
        self.layer_conf.setdefault(depth, confidence)
        return confidence

    def confidence(self, depth: int, measure: str) -> float:
        """Confidence of the exit at `depth`: softmax margin, max prob, hidden-state cosine, or the margin of
        the contrastive distribution (Confidently_Exiting util/skip_conf.py 131, 170), or CALM's trained
        classifier sigmoid(w . h + b) (-inf where the artifact has none at `depth`: the token never exits there)."""
        if measure == "hidden_state":
            value = exit_rules.cosine(self.hidden[depth], self.hidden[depth - 1])
        elif measure == "classifier":
            clf = classifier_at(self.model, depth)
            if clf is None:
                value = float("-inf")
            else:
                h = self.hidden[depth].reshape(-1).to(clf[0].device, torch.float32)
                value = float(torch.sigmoid(h @ clf[0] + clf[1]))
                self._flops += 2 * self.model.hidden_size  # one dot product: tiny next to an exit head
        elif measure == "max_prob":
            value = exit_rules.max_prob(self.distribution(depth))
        else:
            value = exit_rules.softmax_margin(self.distribution(depth))
        return self.record(depth, value)

    def _id(self, depth: int, index: int) -> int:
        k = self.logits(depth)[1]
        return int(self.ranking[index]) if k is not None else index

    def top_token(self, depth: int) -> int:
        """The exit's argmax at `depth`, as a vocabulary id."""
        return self._id(depth, int(self.logits(depth)[0].argmax()))

    def pick(self, depth: int, sampler) -> int:
        """The token emitted from an exit at `depth` (the exit's own logits, mapped back to vocabulary ids)."""
        self._picked = depth
        return self._id(depth, sampler.pick(self.logits(depth)[0]))

    @property
    def confidence_flops(self) -> float:
        """FLOPs spent only on the exit decision: every head evaluation but the one that picked the token, plus
        2 * hidden per trained-classifier check."""
        return self._flops - (self._expert_flops.get(self._picked, 0.0) if self._picked is not None else 0.0)
