"""Exit measures and rules: pure functions on tensors, shared by calm, free and dynamic.

Each reference formula names the file and lines it was re-derived from (read with the search tool):
  FREE            raymin0223/fast_robust_early_exit: util/skip_conf.py, util/bmm.py, models/deploying_t5.py
  vocab/contrast  joanvelja/Confidently_Exiting (fork of FREE): util/skip_conf.py, models/deploying_t5.py
  dynamic         Amir-Voloshin/DynamicEarlyExit (fork of LayerSkip): self_speculation/llama_early_exit_utils.py,
                  self_speculation/llama_model_utils.py, self_speculation/generator_base.py
`probs`/`logits` are one position's exit distribution/logits, shape (V,) or (k,) on a reduced vocabulary.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F

from .config import knob

CONFIDENCES = ("softmax", "max_prob", "hidden_state", "contrastive", "jsd_contrastive", "classifier")
VOCAB_REDUCTIONS = ("none", "fixed", "decaying", "adaptive")
CONTRASTIVE = ("contrastive", "jsd_contrastive")


# -- the exit-rule knobs calm, free and dynamic share (each declared once; a method's options inherit them) ------
@dataclass
class ConfidenceOptions:
    """the confidence an exit reads"""

    confidence: Optional[str] = knob(
        None,
        "confidence measure: softmax = top-1 minus top-2 probability (calm's and free's default: FREE "
        "util/skip_conf.py 7-16, its scripts' --shallow2deep_conf_type softmax), max_prob = top-1 probability, "
        "hidden_state = cosine of consecutive layers' states (CALM's state saturation; calm only), contrastive | "
        "jsd_contrastive = top-1 minus top-2 of the contrastive distribution against the amateur layer i//2 | "
        "the layer of largest JSD/(i-l) in 2..i-1 (Confidently_Exiting util/skip_conf.py 124-135 | 159-170). With "
        "dynamic, contrastive* replaces the softmax that max_probability, entropy_based and convergence read. "
        "classifier = sigmoid of CALM's trained early-exit classifier on the layer's hidden state (calm only; needs "
        "an exit artifact from `python -m harness.train --recipe calm`; depths without a classifier never exit)",
        choices=CONFIDENCES,
        when=(lambda c: (c.confidence != "classifier" or c.generation_strategy == "calm") and (
            c.generation_strategy != "dynamic" or (c.confidence in CONTRASTIVE and c.criteria in (
                "max_probability", "entropy_based", "convergence"))),
            ("with dynamic only as contrastive or jsd_contrastive, and only for max_probability, entropy_based or "
             "convergence; as classifier only with calm")))
    contrastive_alpha: float = knob(
        0.1,
        "contrastive confidence: plausibility mask keeps tokens with p >= alpha * max p of the expert layer "
        "(Confidently_Exiting: alpha = 0.1 at every call)",
        when=(lambda c: c.confidence in CONTRASTIVE, "with --confidence contrastive or jsd_contrastive"),
        range=(0.0, 1.0, True))


@dataclass
class ThresholdOption:
    """the exit threshold"""

    threshold: Optional[float] = knob(
        None,
        "calm/free: exit when confidence > threshold (FREE util/skip_conf.py 76); omitted = 0.9 (our "
        "default; a value >= 1 never exits)",
        range=(0.0, None, True))


@dataclass
class MinExitOption:
    """the first depth an exit may be taken at"""

    min_exit_layer: Optional[int] = knob(
        None,
        "calm/dynamic: first layer whose exit may be taken, 1..L-1; omitted = 1 (FREE's CALM code checks "
        "from the first layer; contrastive needs >= 2, jsd_contrastive >= 3, dynamic cosine_similarity starts "
        "at 2 and convergence at 3, as the references do)",
        range=(1, None, True))


@dataclass
class VocabReductionOptions:
    """scoring later exits on a reduced vocabulary"""

    vocab_reduction: str = knob(
        "none",
        "calm/dynamic: score exits after the first one considered on rows of its full head, ranked by "
        "logit: fixed = its top k = max(vocab_k_min, vocab_k/(1 + (vocab_k-vocab_k_min)/vocab_k_min * i/L)) rows, "
        "decaying = the top k_i of them with that k at each layer i, adaptive = the top V*(1 - 0.9*confidence of "
        "the previous layer) (Confidently_Exiting models/deploying_t5.py ~751-752, ~1008-1066)",
        choices=VOCAB_REDUCTIONS,
        when=(lambda c: c.confidence not in ("hidden_state", "classifier") and c.criteria != "cosine_similarity",
              "where exits read the exit head (not with --confidence hidden_state or classifier, or --criteria "
              "cosine_similarity)"))
    vocab_k: int = knob(
        35000,
        "--vocab_reduction fixed/decaying: k_max of that schedule (fork's maximum_k_size)",
        when=(lambda c: c.vocab_reduction in ("fixed", "decaying"),
                                        "with --vocab_reduction fixed or decaying"),
        range=(1, None, True))
    vocab_k_min: int = knob(
        250,
        "--vocab_reduction fixed/decaying: k_min of that schedule (fork's minimum_k_size)",
        when=(lambda c: c.vocab_reduction in ("fixed", "decaying"),
                                            "with --vocab_reduction fixed or decaying"),
        range=(1, None, True))


def reduction_knobs(config: Any) -> dict:
    """Vocabulary-reduction and contrastive knobs, only where they change behaviour (for run logs)."""
    out: dict[str, Any] = {}
    if getattr(config, "vocab_reduction", "none") != "none":
        out["vocab_reduction"] = config.vocab_reduction
        if config.vocab_reduction != "adaptive":
            out.update(vocab_k=config.vocab_k, vocab_k_min=config.vocab_k_min)
    if config.confidence in CONTRASTIVE:
        out["contrastive_alpha"] = config.contrastive_alpha
    return out


# -- confidence measures -----------------------------------------------------------------------------
def softmax_margin(probs: torch.Tensor) -> float:
    """Top-1 minus top-2 probability. FREE util/skip_conf.py 7-16 (`softmax_confidence`, CALM's softmax
    measure); the forks use the same margin on their contrastive distributions."""
    top = probs.topk(2).values
    return float(top[0] - top[1])


def max_prob(probs: torch.Tensor) -> float:
    """Top-1 probability (ours for calm/free; the fork's max_probability criterion reads it)."""
    return float(probs.max())


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two hidden states (on one device: layers may sit on different ones)."""
    return float(F.cosine_similarity(a.reshape(-1).float(), b.reshape(-1).float().to(a.device), dim=0))


def exit_fires(confidence: float, threshold: float) -> bool:
    """FREE util/skip_conf.py 76: mask = 0 (keep going) where conf <= threshold, so exit only when conf > it."""
    return confidence > threshold


# -- CALM's decaying threshold, both published forms ------------------------------------------------
def calm_paper_threshold(lam: float, t: int, n: int, tau: float) -> float:
    """CALM paper (Schuster et al. 2022): lambda_t = clip_[0,1](0.9*lambda + 0.1*exp(-tau*t/N))."""
    return min(max(0.9 * lam + 0.1 * math.exp(-tau * t / n), 0.0), 1.0)


def free_code_threshold(lam: float, t: int, n: int, tau: float) -> float:
    """FREE's CALM code, util/skip_conf.py 58-63: lambda*exp(-tau*t/N)/10 + 9*lambda/10 (no clip)."""
    return lam * math.exp(-tau * t / n) / 10 + 9 * lam / 10


DECAY_FORMS = {"calm_paper": calm_paper_threshold, "free_code": free_code_threshold}


# -- Dynamic Early Exit fork criteria (self_speculation/llama_early_exit_utils.py) -------------------
def fork_schedule(layer_idx: int, num_layers: int, initial: float, final: float, power: float) -> float:
    """initial*r^p + final*(1 - r^p), r = (L - l)/L with l the 0-based layer index.

    max_probability: lines 220-222 (p = `scale`, 0.75 at the call site, llama_model_utils.py ~275);
    entropy_based: lines 293-295 (p = `steepness` 0.5).
    """
    r = (num_layers - layer_idx) / num_layers
    return initial * r ** power + final * (1 - r ** power)


ENTROPY_STEEPNESS = 0.5  # llama_early_exit_utils.py 293: dynamic_threshold(..., steepness=0.5), never overridden


def fork_entropy(logits: torch.Tensor, temperature: float) -> float:
    """llama_early_exit_utils.py 305-314: entropy of softmax((z - max z)/T), probabilities clamped at 1e-12."""
    z = logits.float()
    p = torch.softmax((z - z.max()) / temperature, dim=-1).clamp(min=1e-12)
    return float(-(p * p.log()).sum())


def entropy(probs: torch.Tensor) -> float:
    """Entropy (nats) of a given distribution (dynamic entropy_based on a contrastive distribution)."""
    p = probs.float().clamp(min=1e-12)
    return float(-(p * p.log()).sum())


def token_repeat_count(count: int, previous: int | None, current: int) -> int:
    """llama_early_exit_utils.py 54-57: +1 when this layer's argmax equals the previous layer's, else 0.
    The token exits when the count reaches `repeats` (line 60), i.e. repeats+1 equal layers."""
    return count + 1 if previous is not None and current == previous else 0


def convergence_fires(p_max: float, p_max_prev: float, delta: float) -> bool:
    """llama_early_exit_utils.py 173-179: |maxprob_l - maxprob_l-1| <= delta (checked from layer index 2)."""
    return abs(p_max - p_max_prev) <= delta


# -- contrastive confidence (Confidently_Exiting util/skip_conf.py) -----------------------------------
def plausible(probs: torch.Tensor, alpha: float) -> torch.Tensor:
    """Adaptive plausibility mask: p >= alpha * max p (lines 125 and 159)."""
    return probs >= alpha * probs.max()


def contrastive_distribution(p_exp: torch.Tensor, p_am: torch.Tensor, alpha: float) -> torch.Tensor:
    """Lines 124-129 (`reweight_contrastive_confidence`): plausible tokens get
    softmax(log p_exp - log p_am) * sum(p_exp[plausible]); the others get 0."""
    mask = plausible(p_exp, alpha)
    s = torch.zeros_like(p_exp)
    s[mask] = torch.softmax(p_exp[mask].log() - p_am[mask].log(), dim=-1) * p_exp[mask].sum()
    return s


def jsd_contrastive_distribution(p_exp: torch.Tensor, p_am: torch.Tensor, alpha: float) -> torch.Tensor:
    """Lines 165-169 (`JSD_contrastive_confidence`): plausible tokens get
    softmax(log p_exp - log p_am) * sum(p_exp) (the whole sum, as written); the others keep p_exp."""
    mask = plausible(p_exp, alpha)
    s = p_exp.clone()
    s[mask] = torch.softmax(p_exp[mask].log() - p_am[mask].log(), dim=-1) * p_exp.sum()
    return s


def masked_jsd(p: torch.Tensor, q: torch.Tensor, mask: torch.Tensor) -> float:
    """The fork's JSD module (lines 10-21) on p[mask], q[mask], in float64, without renormalizing:
    0.5*sum p(log p - log m) + 0.5*sum q(log q - log m), m = (p + q)/2."""
    p, q = p[mask].double(), q[mask].double()
    m = 0.5 * (p + q)
    return float(0.5 * torch.xlogy(p, p / m).sum() + 0.5 * torch.xlogy(q, q / m).sum())


def jsd_amateur(p_exp: torch.Tensor, amateurs: Mapping[int, torch.Tensor], layer_exp: int, alpha: float) -> int:
    """Lines 159-164: the amateur layer l in 2..layer_exp-1 maximizing JSD(p_exp, p_l)/(layer_exp - l), both on
    the expert's plausible tokens; ties go to the shallowest layer (Python max over an ordered dict)."""
    mask = plausible(p_exp, alpha)
    scores = {a: masked_jsd(p_exp, amateurs[a], mask) / (layer_exp - a) for a in range(2, layer_exp)}
    return max(scores, key=scores.get)


CONTRASTIVE_MIN_DEPTH = {"contrastive": 2, "jsd_contrastive": 3}  # amateur i//2 >= 1; JSD needs a layer in 2..i-1


# -- vocabulary reduction (Confidently_Exiting models/deploying_t5.py) --------------------------------
def decaying_k(layer: int, num_layers: int, k_max: int = 35000, k_min: int = 250) -> int:
    """`func_inverse`: max(k_min, int(k_max / (1 + (k_max - k_min)/k_min * i/L))), i.e. 35000/(1 + 139*i/L)
    with the fork's constants (deploying_t5.py ~751-752, used ~1008-1066)."""
    return max(k_min, int(k_max / (1 + (k_max - k_min) / k_min * layer / num_layers)))


def adaptive_k(vocab: int, confidence: float, scale: float = 0.9) -> int:
    """deploying_t5.py ~1008-1066 `adaptive`: int(V * (1 - 0.9 * confidence of the previous layer))."""
    return int(vocab * (1 - confidence * scale))


# -- FREE's adaptive threshold: supervised Beta mixture (util/bmm.py) ---------------------------------
def fit_beta_weighted(x: torch.Tensor, w: torch.Tensor) -> tuple[float, float]:
    """util/bmm.py 6-15: weighted moments -> (alpha, beta). Degenerate data give inf/nan, as there."""
    x, w = x.double(), w.double()
    x_bar = float((w * x).sum() / w.sum())
    s2 = float((w * (x - x_bar) ** 2).sum() / w.sum())
    alpha = x_bar * (x_bar * (1 - x_bar) / s2 - 1) if s2 > 0 else math.inf
    beta = alpha * (1 - x_bar) / x_bar if x_bar > 0 else math.nan
    return alpha, beta


def supervised_weights(agree: torch.Tensor, lam_r: float = 0.8, eps: float = 1e-4) -> torch.Tensor:
    """util/bmm.py 49-59 with labels: r = (1 - lam_r) * onehot(y) (line 54 overwrites the likelihood term),
    entries <= eps raised to eps, columns normalized. Rows: 0 = disagree, 1 = agree."""
    y = agree.long()
    r = (1 - lam_r) * F.one_hot(y, 2).double().T
    r[r <= eps] = eps
    return r / (r.sum(dim=0) + 1e-12)


def beta_pdf(x: torch.Tensor, a: float, b: float) -> torch.Tensor:
    """scipy.stats.beta.pdf in float64 (nan for invalid parameters)."""
    a_, b_ = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    log = (a_ - 1) * x.log() + (b_ - 1) * (1 - x).log() - (torch.lgamma(a_) + torch.lgamma(b_) - torch.lgamma(a_ + b_))
    return log.exp()


BMM_GRID = (0.3, 0.9, 10)  # deploying_t5.py ~1212: predict_proba(0.3, 0.9); bmm.py 27: lookup_resolution = 10
BMM_ZETA = 0.4  # bmm.py 31


def bmm_threshold(confidences: Sequence[float], agree: Sequence[bool], xmin: float = BMM_GRID[0],
                  xmax: float = BMM_GRID[1], resolution: int = BMM_GRID[2], zeta: float = BMM_ZETA) -> float:
    """FREE's threshold from (shallow confidence, shallow == deep) pairs.

    Fit (bmm.py 64-84): confidences clipped to [1e-4, 1 - 1e-4]; one Beta per class by weighted moments
    with `supervised_weights`. Threshold (bmm.py 110-116): on linspace(xmin, xmax, 10), the component with
    the higher mean plays "agree"; pred = pdf_agree / (pdf_agree + pdf_other) > zeta (equal priors: the
    mixture weights are not used); the threshold is grid[min(max(0, 10 - #pred), 9)], so always in [xmin, xmax].
    """
    x = torch.tensor(list(confidences), dtype=torch.float64).clamp(1e-4, 1 - 1e-4)
    r = supervised_weights(torch.tensor(list(agree), dtype=torch.bool))
    params = [fit_beta_weighted(x, r[c]) for c in (0, 1)]
    means = torch.tensor([a / (a + b) for a, b in params], dtype=torch.float64)
    i = int(means.argmax())
    grid = torch.linspace(xmin, xmax, resolution, dtype=torch.float64)
    pos, neg = beta_pdf(grid, *params[i]), beta_pdf(grid, *params[1 - i])
    pred = pos / (pos + neg) > zeta  # nan (0/0, invalid fits) compares False, as numpy does
    idx = min(max(0, resolution - int(pred.sum())), resolution - 1)
    return float(grid[idx])


def posterior_threshold(confidences: Sequence[float], agree: Sequence[bool], tolerance: float,
                        lo: float = BMM_GRID[0], hi: float = BMM_GRID[1]) -> float:
    """Our earlier estimator (--adaptive_estimator posterior), not FREE's: moment-fitted Betas with weak priors,
    mixed by the observed agreement rate; the threshold is the smallest c from which P(disagree | c) <=
    tolerance on a fine grid. Clipped to FREE's range [0.3, 0.9] so it can never stick at 1.0."""
    ag = [c for c, a in zip(confidences, agree) if a]
    dis = [c for c, a in zip(confidences, agree) if not a]

    def moments(xs: list, prior: tuple[float, float]) -> tuple[float, float]:
        if len(xs) < 2:
            return prior
        t = torch.tensor(xs, dtype=torch.float64).clamp(1e-4, 1 - 1e-4)
        mean, var = float(t.mean()), float(t.var())
        common = mean * (1 - mean) / var - 1 if var > 1e-8 else 100.0
        return (max(mean * common, 1e-3), max((1 - mean) * common, 1e-3)) if common > 0 else prior

    a1, b1 = moments(ag, (5.0, 1.0))
    a0, b0 = moments(dis, (1.0, 5.0))
    pi = (len(ag) + 1) / (len(ag) + len(dis) + 2)
    grid = torch.linspace(0.005, 0.995, 199, dtype=torch.float64)
    la = math.log(pi) + beta_pdf(grid, a1, b1).clamp_min(1e-300).log()
    ld = math.log(1 - pi) + beta_pdf(grid, a0, b0).clamp_min(1e-300).log()
    bad = (torch.sigmoid(ld - la) > tolerance).nonzero()
    top_bad = int(bad.max()) if len(bad) else -1
    value = float(grid[top_bad + 1]) if top_bad + 1 < len(grid) else hi
    return min(max(value, lo), hi)
