"""Golden tests: every criterion, confidence measure, threshold schedule, k schedule and the Beta-mixture
estimator against the reference formula, re-derived here from the reference file (cited per test) and
evaluated on fixed seeded tensors. No model is loaded: a tiny seeded final norm + exit head stands in.

References: FREE = raymin0223/fast_robust_early_exit; CE = joanvelja/Confidently_Exiting;
DEE = Amir-Voloshin/DynamicEarlyExit (self_speculation/llama_early_exit_utils.py).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from harness import exit_rules
from harness.config import GenerationConfig
from harness.generators.calm import Calm
from harness.generators.dynamic import Dynamic
from harness.generators.exit_probe import ExitProbe
from harness.generators.free import AdaptiveThreshold

L, D, V = 12, 16, 64


class TinyModel:
    """What ExitProbe and the generators' exit rules read: a seeded RMS final norm and exit head."""

    def __init__(self, seed: int = 0, scale: float = 1.0):
        g = torch.Generator().manual_seed(seed)
        self.num_layers, self.hidden_size, self.vocab_size = L, D, V
        self.device = self.head_device = torch.device("cpu")
        self.W = torch.randn(V, D, generator=g) * scale
        self.gamma = 0.5 + torch.rand(D, generator=g)

    def norm(self, h: torch.Tensor) -> torch.Tensor:
        return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * self.gamma

    def exit_logits(self, h: torch.Tensor, rows=None, layer=None) -> torch.Tensor:
        return F.linear(self.norm(h), self.W if rows is None else self.W[rows])

    def head_flops(self, rows: int) -> int:
        return 2 * D * rows


def stack(seed: int, decay: float = 0.75) -> list[torch.Tensor]:
    """Hidden states after 0..L layers: a random walk whose steps shrink with depth (states settle)."""
    g = torch.Generator().manual_seed(seed)
    hs = [torch.randn(1, 1, D, generator=g)]
    for d in range(1, L + 1):
        hs.append(hs[-1] + torch.randn(1, 1, D, generator=g) * decay ** d)
    return hs


def our_exit(gen, hs) -> int:
    """The per-token loop's decision (per_token_exit.py) on a given stack of states."""
    probe = ExitProbe(gen.model, gen.config, gen.first_exit, gen.measure)
    probe.hidden[0] = hs[0]
    for d in range(1, gen.cap):
        probe.hidden[d] = hs[d]
        if gen.first_exit <= d and gen.should_exit(d, probe, 0, 16):
            return d
    return gen.cap


# -- the Dynamic Early Exit fork, written out (DEE llama_early_exit_utils.py) -------------------------
def dee_exit(model: TinyModel, hs, criteria: str, repeats=4, conf=0.95, delta=0.01,
             mp=(0.99, 0.75, 0.75), ent=(11.0, 10.5, 3.0)) -> int:
    """Depth (layers run) at which the fork's forward_early loop exits; L if it never does below L."""
    prev_hidden, prev_token, token_repeats, layer_probs = None, None, 0, {}
    for layer_idx in range(L - 1):
        hidden = hs[layer_idx + 1]
        if criteria == "cosine_similarity":  # lines 104-123; the caller passes the raw previous state
            if prev_hidden is not None:
                cur = model.norm(hidden)
                cur = cur / cur.norm(dim=-1, keepdim=True)
                prev = prev_hidden / prev_hidden.norm(dim=-1, keepdim=True)
                if torch.all(torch.sum(cur * prev, dim=-1) > conf):
                    return layer_idx + 1
            prev_hidden = hidden
        elif criteria == "token_repeat":  # lines 44-77
            predicted = model.exit_logits(hidden).argmax(dim=-1)[:, -1]
            if prev_token is not None and (predicted == prev_token).all():
                token_repeats += 1
            else:
                token_repeats = 0
            if token_repeats >= repeats:
                return layer_idx + 1
            prev_token = predicted
        elif criteria == "convergence":  # lines 151-179
            if prev_hidden is None:
                prev_hidden = hidden
                continue
            p = F.softmax(model.exit_logits(hidden)[:, -1, :], dim=-1).max().item()
            layer_probs[layer_idx] = p
            if layer_idx >= 2 and abs(abs(p - layer_probs.get(layer_idx - 1, 0))) <= delta:
                return layer_idx + 1
            prev_hidden = hidden
        elif criteria == "max_probability":  # lines 220-248
            ratio = (L - layer_idx) / L
            thr = mp[0] * (ratio ** mp[2]) + mp[1] * (1 - ratio ** mp[2])
            probs = torch.clamp(torch.softmax(model.exit_logits(hidden)[:, -1, :], dim=-1), min=1e-12, max=1 - 1e-12)
            if probs.max().item() > thr:
                return layer_idx + 1
        elif criteria == "entropy_based":  # lines 293-317
            scale = (L - layer_idx) / L
            thr = ent[0] * (scale ** 0.5) + ent[1] * (1 - scale ** 0.5)
            logits = model.exit_logits(hidden)
            probs = torch.softmax((logits - logits.max(dim=-1, keepdim=True).values) / ent[2], dim=-1).float()
            probs = torch.clamp(probs, min=1e-12)
            if -torch.sum(probs * torch.log(probs), dim=-1).mean() < thr:
                return layer_idx + 1
    return L


DEE_CASES = [
    ("cosine_similarity", {}, {}),
    ("cosine_similarity", {"cosine_threshold": 0.9}, {"conf": 0.9}),
    ("token_repeat", {}, {}),
    ("token_repeat", {"token_repeats": 1}, {"repeats": 1}),
    ("convergence", {}, {}),
    ("convergence", {"convergence_delta": 0.05}, {"delta": 0.05}),
    ("max_probability", {}, {}),
    ("max_probability", {"max_prob_start": 0.9, "max_prob_end": 0.4, "max_prob_scale": 2.0}, {"mp": (0.9, 0.4, 2.0)}),
    ("entropy_based", {}, {}),
    ("entropy_based", {"entropy_start": 3.0, "entropy_end": 2.0, "entropy_temperature": 8.0}, {"ent": (3.0, 2.0, 8.0)}),
]


@pytest.mark.parametrize("criteria,ours,theirs", DEE_CASES)
def test_dynamic_criteria_exit_where_the_fork_exits(criteria, ours, theirs):
    got, want = [], []
    for seed in range(40):
        model = TinyModel(seed, scale=3.0)
        gen = Dynamic(model, GenerationConfig(criteria=criteria, **ours))
        hs = stack(1000 + seed)
        got.append(our_exit(gen, hs))
        want.append(dee_exit(model, hs, criteria, **theirs))
    assert got == want
    if (criteria, ours) != ("entropy_based", {}):  # on a 64-row head the default entropy threshold always fires
        assert len(set(want)) > 2, f"degenerate fixture: exits {sorted(set(want))}"


def test_dynamic_default_entropy_schedule_fires_at_the_first_layer_below_ln_v():
    # 11.0*sqrt(r) + 10.5*(1 - sqrt(r)) >= 10.5 > ln 64: the fork's defaults exit at once on a small vocabulary
    gen = Dynamic(TinyModel(0), GenerationConfig(criteria="entropy_based"))
    assert our_exit(gen, stack(0)) == 1
    assert exit_rules.fork_schedule(0, 30, 11.0, 10.5, 0.5) == 11.0
    assert abs(exit_rules.fork_schedule(20, 30, 11.0, 10.5, 0.5) - (10.5 + 0.5 * math.sqrt(10 / 30))) < 1e-12


def test_dynamic_exit_layer_caps_the_depth():
    model = TinyModel(3, scale=3.0)
    gen = Dynamic(model, GenerationConfig(criteria="cosine_similarity", cosine_threshold=2.0, exit_layer=5))
    assert our_exit(gen, stack(3)) == 5  # never fires: leaves at the cap, as layers[:exit_layer] does


# -- confidence measures --------------------------------------------------------------------------------
def fixtures(n=8):
    g = torch.Generator().manual_seed(7)
    return [torch.randn(V, generator=g) * s for s in torch.linspace(0.5, 6.0, n).tolist()]


def test_softmax_margin_and_max_prob_match_free():
    for logits in fixtures():
        probs = torch.softmax(logits, dim=-1)
        top_2 = torch.topk(probs, dim=-1, k=2)[0]  # FREE util/skip_conf.py 13-16
        assert exit_rules.softmax_margin(probs) == pytest.approx(float(top_2[..., 0] - top_2[..., 1]), abs=1e-7)
        assert exit_rules.max_prob(probs) == pytest.approx(float(probs.max()), abs=1e-7)


def test_exit_rule_is_strictly_above_the_threshold():
    for conf, thr in [(0.5, 0.5), (0.50001, 0.5), (0.2, 0.9)]:
        mask = torch.where(torch.tensor(conf) <= thr, 0., 1.).bool()  # FREE util/skip_conf.py 76
        assert exit_rules.exit_fires(conf, thr) == bool(mask.item())


def test_calm_decaying_threshold_both_forms():
    for lam in (0.5, 0.9, 0.99):
        for tau in (0.5, 4.0):
            for t in (1, 7, 48):
                n = 48
                free_code = lam * np.exp(-tau * t / n) / 10 + 9 * lam / 10  # FREE util/skip_conf.py 60-62
                paper = float(np.clip(0.9 * lam + 0.1 * np.exp(-tau * t / n), 0, 1))  # CALM paper
                assert exit_rules.free_code_threshold(lam, t, n, tau) == pytest.approx(free_code, abs=1e-12)
                assert exit_rules.calm_paper_threshold(lam, t, n, tau) == pytest.approx(paper, abs=1e-12)


def test_calm_threshold_uses_the_position_and_the_real_n():
    model = TinyModel(0)
    for form, ref in (("calm_paper", lambda lam, t, n, tau: min(max(0.9 * lam + 0.1 * math.exp(-tau * t / n), 0), 1)),
                      ("free_code", lambda lam, t, n, tau: lam * math.exp(-tau * t / n) / 10 + 9 * lam / 10)):
        gen = Calm(model, GenerationConfig(generation_strategy="calm", threshold=0.8, threshold_decay=3.0,
                                           threshold_decay_form=form))
        for step, n in ((1, 48), (10, 48), (10, 512)):  # t = step + 1: FREE's pos_time = past length + 1
            assert gen.threshold_at(step, n) == pytest.approx(ref(0.8, step + 1, n, 3.0), abs=1e-12)


def fork_jsd(p, q):
    """CE util/skip_conf.py 10-21 (the JSD module)."""
    kl = nn.KLDivLoss(reduction="batchmean", log_target=True)
    p, q = p.cpu().double(), q.cpu().double()
    p, q = p.view(-1, p.size(-1)), q.view(-1, q.size(-1))
    m = (0.5 * (p + q)).log()
    return 0.5 * (kl(m, p.log()) + kl(m, q.log()))


def fork_contrastive_conf(prev_probits: dict, layer_exp: int, alpha: float = 0.1) -> float:
    """CE util/skip_conf.py 111-135 (`reweight_contrastive_confidence`, layer_am = i//2)."""
    probits_exp, probits_am = prev_probits[layer_exp], prev_probits[layer_exp // 2]
    s = torch.zeros_like(probits_exp)
    mask = probits_exp >= alpha * torch.max(probits_exp)
    s[mask] = torch.softmax(torch.log(probits_exp[mask]) - torch.log(probits_am[mask]), dim=-1).mul_(
        torch.sum(probits_exp[mask]))
    top_2 = torch.topk(s, dim=-1, k=2)[0]
    return float(top_2[..., 0] - top_2[..., 1])


def fork_jsd_conf(prev_probits: dict, layer_exp: int, alpha: float = 0.1) -> float:
    """CE util/skip_conf.py 153-170 (`JSD_contrastive_confidence`)."""
    probits_exp = prev_probits[layer_exp]
    mask = probits_exp >= alpha * torch.max(probits_exp)
    jsds = {layer: fork_jsd(probits_exp[mask], prev_probits[layer][mask]) / (layer_exp - layer)
            for layer in np.arange(stop=layer_exp, start=2)}
    probits_am = prev_probits[max(jsds, key=jsds.get)]
    s = torch.zeros_like(probits_exp)
    s[mask] = torch.log(probits_exp[mask]) - torch.log(probits_am[mask])
    s[mask] = torch.softmax(s[mask], dim=-1).mul_(torch.sum(probits_exp))
    s[~mask] = probits_exp[~mask]
    top_2 = torch.topk(s, dim=-1, k=2)[0]
    return float(top_2[..., 0] - top_2[..., 1])


@pytest.mark.parametrize("measure,ref", [("contrastive", fork_contrastive_conf), ("jsd_contrastive", fork_jsd_conf)])
@pytest.mark.parametrize("alpha", [0.1, 0.01])
def test_contrastive_confidences_match_the_fork(measure, ref, alpha):
    for seed in range(6):
        model = TinyModel(seed, scale=2.0)
        hs = stack(seed)
        prev_probits = {d: torch.softmax(model.exit_logits(hs[d]).reshape(-1), dim=-1) for d in range(1, L)}
        probe = ExitProbe(model, GenerationConfig(generation_strategy="calm", confidence=measure,
                                                  contrastive_alpha=alpha), 3, measure)
        for d in range(L):
            probe.hidden[d] = hs[d]
        for d in range(3, L):
            assert probe.confidence(d, measure) == pytest.approx(ref(prev_probits, d, alpha), abs=1e-6)


def test_jsd_amateur_is_computed_once_per_layer():
    model = TinyModel(1)
    calls = []
    real = model.exit_logits
    model.exit_logits = lambda h, rows=None, layer=None: calls.append(1) or real(h, rows, layer)
    probe = ExitProbe(model, GenerationConfig(generation_strategy="calm", confidence="jsd_contrastive"), 3,
                      "jsd_contrastive")
    for d, h in enumerate(stack(1)):
        probe.hidden[d] = h
    for d in range(3, L):
        probe.confidence(d, "jsd_contrastive")
    assert len(calls) == L - 2  # depths 2..L-1 once each, not O(depth^2)


# -- vocabulary reduction k schedules (CE models/deploying_t5.py) ---------------------------------------
def func_inverse(i, k1, k2, num_layers):
    """CE models/deploying_t5.py `func_inverse` (smoothed pruning)."""
    return max(k2, int(k1 / (1 + (k1 - k2) / k2 * i / num_layers)))


def test_k_schedules_match_the_fork():
    for layers in (12, 24, 30):
        for i in range(1, layers):
            assert exit_rules.decaying_k(i, layers) == func_inverse(i, 35000, 250, layers)
            assert exit_rules.decaying_k(i, layers) == max(250, int(35000 / (1 + 139 * i / layers)))
    for conf in (0.0, 0.13, 0.5, 0.97, 1.0):
        assert exit_rules.adaptive_k(49152, conf) == int(49152 * (1 - conf * 0.9))


@pytest.mark.parametrize("mode", ["fixed", "decaying", "adaptive"])
def test_reduced_rows_are_prefixes_of_the_first_exits_ranking(mode):
    model = TinyModel(5, scale=2.0)
    kw = {} if mode == "adaptive" else {"vocab_k": 60, "vocab_k_min": 5}
    config = GenerationConfig(generation_strategy="calm", vocab_reduction=mode, **kw)
    probe = ExitProbe(model, config, 2, "softmax")
    hs = stack(5)
    for d in range(L):
        probe.hidden[d] = hs[d]
    full = {d: model.exit_logits(hs[d]).reshape(-1) for d in range(L)}
    k0 = min(V, func_inverse(2, 60, 5, L)) if mode != "adaptive" else min(V, func_inverse(2, 35000, 250, L))
    ranking = torch.topk(full[2], k0, largest=True, sorted=True)[1]  # by logit, highest first
    conf = {2: probe.confidence(2, "softmax")}
    assert torch.equal(probe.ranking, ranking) and probe.logits(2)[1] is None  # the first exit: full head
    for d in range(3, L):
        if mode == "fixed":
            k = k0
        elif mode == "decaying":
            k = min(k0, func_inverse(d, 60, 5, L))
        else:
            k = min(k0, max(2, int(V * (1 - conf[d - 1] * 0.9))))
        conf[d] = probe.confidence(d, "softmax")
        logits, kk = probe.logits(d)
        assert kk == k and torch.allclose(logits, full[d][ranking[:k]], atol=1e-6)
        assert probe.top_token(d) == int(ranking[:k][full[d][ranking[:k]].argmax()])


# -- FREE's Beta mixture (util/bmm.py), written out with numpy/scipy ---------------------------------------
def free_threshold(x, y, xmin=0.3, xmax=0.9):
    """FREE util/bmm.py 6-15, 49-84 (fit with labels, max_iters=1), 110-116 (predict_proba)."""
    stats = pytest.importorskip("scipy.stats")
    x = np.array(x, dtype=np.float64)
    eps = 1e-4
    x[x >= 1 - eps] = 1 - eps
    x[x <= eps] = eps
    r = (1 - 0.8) * np.eye(2)[np.array(y, dtype=int)].T
    r[r <= 1e-4] = 1e-4
    r /= (r.sum(axis=0) + 1e-12)
    alphas, betas = np.zeros(2), np.zeros(2)
    for c in (0, 1):
        x_bar = np.sum(r[c] * x) / np.sum(r[c])
        s2 = np.sum(r[c] * (x - x_bar) ** 2) / np.sum(r[c])
        alphas[c] = x_bar * ((x_bar * (1 - x_bar)) / s2 - 1)
        betas[c] = alphas[c] * (1 - x_bar) / x_bar
    grid = np.linspace(xmin, xmax, 10)
    i = (alphas / (alphas + betas)).argmax()
    lik = lambda c: stats.beta.pdf(grid, alphas[c], betas[c])  # noqa: E731
    pred = lik(i) / (lik(i) + lik(1 - i)) > 0.4
    return grid[min(max(0, 10 - sum(pred)), 9)]


def deep_token_pairs(seed: int, n: int, agree_rate: float, threshold: float):
    """Pairs as the generator feeds them: every token that reaches the deep layers (queued shallow exits
    above the threshold and the current deep token below it); agreeing tokens are more confident."""
    rng = np.random.default_rng(seed)
    agree = rng.random(n) < agree_rate
    conf = np.where(agree, rng.beta(5, 2, n), rng.beta(2, 4, n))
    return conf.tolist(), agree.tolist()


@pytest.mark.parametrize("seed,rate", [(0, 0.5), (1, 0.5), (2, 0.2), (3, 0.8), (4, 0.05)])
def test_beta_mixture_threshold_matches_free(seed, rate):
    conf, agree = deep_token_pairs(seed, 400, rate, 0.9)
    assert exit_rules.bmm_threshold(conf, agree) == pytest.approx(free_threshold(conf, agree), abs=1e-9)
    w = torch.rand(400, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x = torch.tensor(conf, dtype=torch.float64)
    x_bar = float((w * x).sum() / w.sum())
    s2 = float((w * (x - x_bar) ** 2).sum() / w.sum())
    a = x_bar * ((x_bar * (1 - x_bar)) / s2 - 1)
    assert exit_rules.fit_beta_weighted(x, w) == pytest.approx((a, a * (1 - x_bar) / x_bar), rel=1e-12)


def test_beta_mixture_never_sticks_at_one_with_half_agreement():
    """The generator's loop, simulated: a sequence's shallow exits are those above its threshold; pairs come
    from every deep-processed token (queued exits, flushed by the next deep token, and the deep token itself);
    the threshold is refit at each sequence start on all pairs so far."""
    rng = np.random.default_rng(0)
    for estimator in ("beta_mixture", "posterior"):
        est = AdaptiveThreshold(0.9, estimator)
        for _ in range(30):
            threshold = est.start_sequence()
            queue = []
            for _ in range(40):
                agreed = rng.random() < 0.5
                c = float(rng.beta(5, 2) if agreed else rng.beta(2, 4))
                if exit_rules.exit_fires(c, threshold):
                    queue.append((c, agreed))
                else:
                    for qc, qa in queue + [(c, agreed)]:
                        est.add(qc, qa)
                    queue = []
        values = [t["threshold"] for t in est.trajectory]
        assert values[0] == 0.9 and all(0.3 <= v <= 0.9 for v in values), (estimator, values)
        assert len(set(values)) > 1 and sum(est.agree) > 0 and len(est.agree) > sum(est.agree)
        pairs = [t["pairs"] for t in est.trajectory]
        assert est.refits == 29 and pairs == sorted(pairs) and pairs[-1] < len(est.confidences)  # accumulated


def test_beta_mixture_refits_stop_after_300_sequences():
    est = AdaptiveThreshold(0.9)
    conf, agree = deep_token_pairs(9, 50, 0.5, 0.9)
    for c, a in zip(conf, agree):
        est.add(c, a)
    for _ in range(305):
        est.start_sequence()
    assert est.refits == 300 and [t["refit"] for t in est.trajectory[-6:]] == [True] + [False] * 5
