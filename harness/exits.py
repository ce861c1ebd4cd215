"""Exit measures and rules: pure functions on tensors, shared by calm, free and dynamic.

Logits here are one position's exit-head output, shape (V,) or (k,) on a reduced vocabulary.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F


def softmax_margin(probs: torch.Tensor) -> float:
    """CALM's softmax confidence: top-1 minus top-2 probability."""
    top = probs.topk(2).values
    return float(top[0] - top[1])


def max_prob(probs: torch.Tensor) -> float:
    return float(probs.max())


def entropy(logits: torch.Tensor, temperature: float = 1.0) -> float:
    """Entropy (nats) of softmax(logits / T)."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    return float(-(logp.exp() * logp).sum())


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two hidden states (CALM's state saturation)."""
    return float(F.cosine_similarity(a.reshape(-1).float(), b.reshape(-1).float(), dim=0))


def jsd(p: torch.Tensor, q: torch.Tensor) -> float:
    """Jensen-Shannon divergence between two distributions (nats)."""
    m = 0.5 * (p + q)
    kl = lambda a, b: float((a * (a.clamp_min(1e-12).log() - b.clamp_min(1e-12).log())).sum())  # noqa: E731
    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def contrastive_probs(expert_logits: torch.Tensor, amateur_logits: torch.Tensor, alpha: float = 0.1) -> torch.Tensor:
    """Distribution of contrastive scores log p_expert - log p_amateur over the plausible tokens.

    Plausible = p_expert >= alpha * max p_expert (the adaptive plausibility constraint of contrastive
    decoding); the others get probability 0. Its max is the contrastive confidence.
    """
    lp_e = F.log_softmax(expert_logits.float(), dim=-1)
    lp_a = F.log_softmax(amateur_logits.float(), dim=-1)
    plausible = lp_e >= lp_e.max() + math.log(alpha)
    scores = torch.where(plausible, lp_e - lp_a, torch.full_like(lp_e, float("-inf")))
    return torch.softmax(scores, dim=-1)


def interpolate(layer: int, first: int, last: int, start: float, end: float) -> float:
    """Linear schedule over depth: `start` at layer `first`, `end` at layer `last`."""
    if last <= first:
        return end
    t = min(max((layer - first) / (last - first), 0.0), 1.0)
    return start + t * (end - start)


def decayed_threshold(threshold: float, step: int, max_steps: int, tau: float) -> float:
    """CALM's decaying threshold: clip(0.9 * lambda + 0.1 * exp(-tau * t / N), 0, 1)."""
    return min(max(0.9 * threshold + 0.1 * math.exp(-tau * step / max(max_steps, 1)), 0.0), 1.0)


def reduced_k(mode: str, vocab: int, k: int, layer: int, first: int, last: int,
              prev_confidence: Optional[float]) -> int:
    """Rows kept by vocabulary reduction at `layer` (fixed / decaying / adaptive)."""
    if mode == "fixed":
        return min(k, vocab)
    if mode == "decaying":
        return max(1, min(vocab, round(interpolate(layer, first, last, k, k / 10))))
    if mode == "adaptive":
        c = prev_confidence if prev_confidence is not None else 0.0
        return max(2, min(vocab, round(vocab * (1 - 0.9 * c))))
    raise ValueError(mode)


# -- FREE's adaptive threshold ---------------------------------------------------------------------
def _beta_moments(xs: list[float], prior: tuple[float, float]) -> tuple[float, float]:
    """Method-of-moments Beta fit, falling back towards `prior` when data are scarce or degenerate."""
    if len(xs) < 2:
        return prior
    t = torch.tensor(xs, dtype=torch.float64).clamp(1e-4, 1 - 1e-4)
    mean, var = float(t.mean()), float(t.var())
    common = mean * (1 - mean) / var - 1 if var > 1e-8 else 100.0
    if common <= 0:
        return prior
    return max(mean * common, 1e-3), max((1 - mean) * common, 1e-3)


def _beta_logpdf(x: torch.Tensor, a: float, b: float) -> torch.Tensor:
    return ((a - 1) * x.log() + (b - 1) * (1 - x).log()
            - (math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)))


@dataclass
class BetaMixtureThreshold:
    """FREE's adaptive threshold estimator (Bae et al. 2023, Sec. 4.3), as we read it.

    Pairs (shallow confidence c, shallow prediction == deep prediction) come for free from the
    synchronized parallel passes. Confidences of agreeing and disagreeing pairs are each modelled by a
    Beta distribution (moment fits, with a weak prior), mixed by the observed agreement rate. The
    threshold is the smallest confidence whose posterior P(disagree | c) is at most `tolerance`.
    """

    initial: float  # threshold used until enough pairs are seen
    tolerance: float = 0.1  # accepted posterior probability that a shallow exit disagrees with the deep model
    min_pairs: int = 8  # pairs needed before the estimate replaces `initial`
    agree: list = field(default_factory=list)
    disagree: list = field(default_factory=list)

    def __post_init__(self) -> None:
        self.value = self.initial

    def update(self, confidence: float, agreed: bool) -> float:
        (self.agree if agreed else self.disagree).append(confidence)
        if len(self.agree) + len(self.disagree) >= self.min_pairs:
            self.value = self.estimate()
        return self.value

    def estimate(self) -> float:
        a1, b1 = _beta_moments(self.agree, (5.0, 1.0))  # prior: agreement at high confidence
        a0, b0 = _beta_moments(self.disagree, (1.0, 5.0))  # prior: disagreement at low confidence
        n = len(self.agree) + len(self.disagree)
        pi = (len(self.agree) + 1) / (n + 2)
        grid = torch.linspace(0.005, 0.995, 199, dtype=torch.float64)
        la = math.log(pi) + _beta_logpdf(grid, a1, b1)
        ld = math.log(1 - pi) + _beta_logpdf(grid, a0, b0)
        p_disagree = torch.sigmoid(ld - la)
        ok = (p_disagree <= self.tolerance).nonzero()
        # smallest c from which every larger c is also acceptable (monotone region at the top)
        if len(ok) == 0:
            return 1.0
        bad = (p_disagree > self.tolerance).nonzero()
        top_bad = int(bad.max()) if len(bad) else -1
        return float(grid[top_bad + 1]) if top_bad + 1 < len(grid) else 1.0
