"""ConsistentEE (Zeng et al., AAAI 2024, arXiv 2312.11882): learn a per-token exit policy with REINFORCE.

The trunk (and any exit adapters of the --exits artifact, which `model.exit_logits(h, layer=l)` applies) stays
frozen. Each exit layer l of --exit_layers gets a policy network pi_l (harness/generators/policy.py: final norm of
h_l -> Linear(hidden, --consistentee_hidden) -> ReLU -> Linear(., 1) -> sigmoid = P(exit after l)). Teacher-forced
on training rows, every token walks the exits in order and samples exit/continue from pi_l; the episode ends at
the first exit taken, or at the last layer L. Its reward, following the paper (and the hardness-guided reward left
in the reference code, ConsistentEE/run_glue.py train_rl: `-loss - layers * alpha * (1 - memorized / L)`):

    R = acc(d) - alpha * (d / L) * (1 - m / L)

  d      the depth the token left at (exit layer or L);
  acc(d) how right the exit at d is, where right = consistent with the full model: its target is the last
         layer's top-1 (the paper scores against the gold label; a decoder without gold tokens at inference is
         judged by agreement with the full model). `correct` (default): 1 if the exit's top-1 equals the last
         layer's, else 0; `log_prob`: log p_d(top-1 of layer L), the paper's -CE against that target;
  m      the token's memorized layer: the earliest depth from which its prediction stays correct at every deeper
         exit (the last layer is always correct). Hard tokens (deep m) pay less for depth and so learn accuracy;
         easy ones (shallow m) pay more and learn to leave early. --no-consistentee_hardness drops the factor.

REINFORCE: loss = -mean[(R - b) * log pi(trajectory)], log pi = sum of the log-probabilities of the decisions
taken (continue at each exit before the one taken, exit at it); K = --consistentee_samples trajectories are
sampled per token and the baseline b is their mean reward (the reference's sample_K copies with the same mean
baseline; it is unbiased up to a factor (K-1)/K). Logged every step on the sampled trajectories: reward, exit rate,
mean exit layer, accuracy of taken exits; every --log_every steps on the held-out rows, with the greedy policy
(pi > 0.5): the same plus consistency with the full model, and the exact expected reward of the stochastic policy.

Deviations (named):
- correctness is consistency with the last layer's top-1, not the gold label (see acc above), and the default
  accuracy term is that indicator, not the paper's -CE (`--consistentee_reward log_prob`): under greedy decoding
  only the top-1 matters, and with the indicator the trade-off does not depend on the vocabulary's log-prob scale:
  leaving at d instead of L pays off iff P(consistent at d) > 1 - alpha * (1 - d/L) * (1 - m/L);
- the depth penalty uses d / L instead of the layer count d (`consistentee_alpha` = the reference's alpha x L), so
  one alpha means the same on models of any depth;
- --consistentee_memorized exits (default): m is taken over the layers the policy may exit at plus L, the depths
  that matter to it and free to compute; `all` is the paper's definition over every layer (one extra exit head per
  layer and token);
- actions are sampled from pi (on-policy REINFORCE); the reference takes the greedy action with epsilon-random
  exploration while weighting log pi as if sampled, and divides log pi by the number of layers run: we do neither;
- the policy's architecture (2-layer MLP, width --consistentee_hidden) is ours; its last layer starts at zero so
  every exit starts at pi = 0.5.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import UsageError, _f
from ..generators.policy import PREFIX, ExitPolicy, policy_tensors
from ..trained_exits import ExitArtifact
from . import recipe
from .common import Loop, TrainConfig, autocast, hidden_states, provenance, start_artifact, train_eval_split

REWARDS = ("correct", "log_prob")


@dataclass
class ConsistentEEOptions:
    """--recipe consistentee."""

    consistentee_hidden: int = _f(64, "width of each exit layer's policy MLP (norm(h_l) -> width -> 1)")
    consistentee_alpha: float = _f(1.0, "weight of the depth penalty alpha * (d/L) * (1 - m/L) in the reward "
                                        "(the reference's alpha times L)")
    consistentee_reward: str = _f("correct", "accuracy term of the reward: correct = 1 if the exit's top-1 equals "
                                  "the last layer's, else 0; log_prob = log-probability the exit gives the last "
                                  "layer's top-1 (the paper's -CE)", choices=REWARDS)
    consistentee_hardness: bool = _f(True, "scale the depth penalty by (1 - memorized layer / L) (the paper's "
                                           "hardness-guided reward); false: a plain alpha * d/L")
    consistentee_memorized: str = _f("exits", "memorized layer over: exits = the exit layers and L (free), all = "
                                     "every layer (the paper's definition; one exit head per layer and token)",
                                     choices=("exits", "all"))
    consistentee_samples: int = _f(8, "trajectories sampled per token; the REINFORCE baseline is their mean reward "
                                      "(the reference's sample_K = 8)")


@dataclass
class Features:
    """What the reward and the policies read for a set of tokens (N of them, flattened), on the model's device."""

    x: torch.Tensor  # (K, N, H) final norm of each exit layer's hidden state: the policies' input
    correct: torch.Tensor  # (N, K+1) bool: exit's top-1 == last layer's top-1 (column K, the last layer: True)
    reward: torch.Tensor  # (N, K+1) reward of leaving at each exit, or at the last layer (column K)
    memorized: torch.Tensor  # (N,) memorized layer
    depths: torch.Tensor  # (K+1,) exit layers and L


# -- the reward ---------------------------------------------------------------------------------------------------
def memorized_layer(correct: torch.Tensor, depths: torch.Tensor) -> torch.Tensor:
    """(N, D) correctness at increasing depths (the last column, the last layer, all True) -> (N,) the earliest
    depth from which every deeper one is correct."""
    stays = correct.flip(-1).long().cumprod(-1).flip(-1)  # 1 where this depth and all deeper ones are correct
    return depths[stays.argmax(-1)]  # first 1 (the last column is always 1)


def reward_table(acc: torch.Tensor, memorized: torch.Tensor, depths: torch.Tensor, num_layers: int, alpha: float,
                 hardness: bool = True) -> torch.Tensor:
    """R[n, j] = acc[n, j] - alpha * (depths[j] / L) * (1 - memorized[n] / L) (without hardness: the factor is 1)."""
    weight = 1 - memorized.float() / num_layers if hardness else torch.ones_like(memorized, dtype=torch.float32)
    return acc.float() - alpha * (depths.float() / num_layers)[None, :] * weight[:, None]


@torch.no_grad()
def features(model, rows: torch.Tensor, layers: list[int], opts: ConsistentEEOptions) -> Features:
    """Teacher-forced pass over `rows`: each exit's correctness and reward, and the policies' inputs."""
    dev, L = model.device, model.num_layers
    with autocast(dev):
        hs = hidden_states(model, rows)
        final = model.lm_head(hs[-1]).float()  # hs[L] is already final-normed
    target = final.argmax(-1)

    def score(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = logits.float().to(target.device)
        logp = logits.gather(-1, target[..., None])[..., 0] - logits.logsumexp(-1)
        return logp.reshape(-1).to(dev), (logits.argmax(-1) == target).reshape(-1).to(dev)

    logp_L, _ = score(final)
    del final
    logps, corrects, xs = [], [], []
    for layer in layers:
        with autocast(dev):
            lp, ok = score(model.exit_logits(hs[layer], layer=layer))
        logps.append(lp)
        corrects.append(ok)
        xs.append(model.norm(hs[layer]).float().reshape(-1, model.hidden_size).to(dev))
    ones = torch.ones_like(corrects[0]) if corrects else torch.ones_like(logp_L, dtype=torch.bool)
    correct = torch.stack(corrects + [ones], -1)
    depths = torch.tensor(layers + [L], device=dev)
    if opts.consistentee_memorized == "all":
        every = []
        for d in range(1, L):
            with autocast(dev):
                every.append(score(model.exit_logits(hs[d], layer=d))[1])
        memorized = memorized_layer(torch.stack(every + [ones], -1), torch.arange(1, L + 1, device=dev))
    else:
        memorized = memorized_layer(correct, depths)
    acc = torch.stack(logps + [logp_L], -1) if opts.consistentee_reward == "log_prob" else correct.float()
    reward = reward_table(acc, memorized, depths, L, opts.consistentee_alpha, opts.consistentee_hardness)
    return Features(torch.stack(xs), correct, reward, memorized, depths)


# -- the policy over a token's exits ---------------------------------------------------------------------------------
def policy_logits(policies: nn.ModuleDict, layers: list[int], x: torch.Tensor) -> torch.Tensor:
    """(K, N, H) inputs -> (N, K) exit logits, one column per exit layer in order."""
    return torch.stack([policies[str(layer)](x[k]) for k, layer in enumerate(layers)], -1)


def exit_distribution(z: torch.Tensor) -> torch.Tensor:
    """(N, K) exit logits -> (N, K+1) probability that the token leaves at each exit, or at the last layer."""
    p = torch.sigmoid(z)
    survive = torch.cumprod(1 - p, -1)  # P(continue at every exit up to k)
    before = torch.cat([torch.ones_like(p[:, :1]), survive[:, :-1]], -1)
    return torch.cat([p * before, survive[:, -1:]], -1)


def first_exit(decisions: torch.Tensor) -> torch.Tensor:
    """(..., K) bool exit decisions -> (...) index of the first exit taken, K where none is."""
    k = decisions.shape[-1]
    return torch.where(decisions.any(-1), decisions.float().argmax(-1), torch.full_like(decisions[..., 0], k,
                                                                                        dtype=torch.long))


def sample_trajectories(z: torch.Tensor, samples: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample exit/continue at each exit in order: (S, N) index of the exit taken (K = none) and the log-probability
    of the decisions taken (continue before it, exit at it; decisions after an exit are never made)."""
    u = torch.rand((samples,) + tuple(z.shape), generator=gen, device=z.device)
    act = u < torch.sigmoid(z.detach())
    taken = act.long().cumsum(-1)
    cont, ex = taken == 0, act & (taken == 1)
    logpi = (cont * F.logsigmoid(-z) + ex * F.logsigmoid(z)).sum(-1)
    return first_exit(act), logpi


def summary(f: Features, exit_index: torch.Tensor, prefix: str = "") -> dict:
    """Exit rate, mean exit layer, accuracy of the exits taken, consistency and reward of chosen exits."""
    K = f.depths.numel() - 1
    idx = exit_index.reshape(-1, f.correct.shape[0]) if exit_index.dim() > 1 else exit_index[None]
    early = idx < K
    correct = f.correct[None].expand(idx.shape[0], -1, -1).gather(-1, idx[..., None])[..., 0]
    reward = f.reward[None].expand(idx.shape[0], -1, -1).gather(-1, idx[..., None])[..., 0]
    n_early = int(early.sum())
    return {f"{prefix}reward": float(reward.mean()), f"{prefix}exit_rate": float(early.float().mean()),
            f"{prefix}mean_exit_layer": float(f.depths[idx].float().mean()),
            f"{prefix}exit_accuracy": float(correct[early].float().mean()) if n_early else None,
            f"{prefix}consistency": float(correct.float().mean())}


@torch.no_grad()
def evaluate_policies(policies: nn.ModuleDict, layers: list[int], f: Features, threshold: float = 0.5) -> dict:
    """Held-out metrics: the greedy policy (pi > threshold) as the `policy` strategy runs it, and the exact expected
    reward and depth of the stochastic policy (what REINFORCE maximizes)."""
    z = policy_logits(policies, layers, f.x)
    dist = exit_distribution(z)
    greedy = first_exit(torch.sigmoid(z) > threshold)
    out = summary(f, greedy, "eval_")
    counts = torch.bincount(greedy, minlength=len(layers) + 1).float() / greedy.numel()
    out.update({"eval_expected_reward": float((dist * f.reward).sum(-1).mean()),
                "eval_expected_exit_layer": float((dist * f.depths.float()).sum(-1).mean()),
                "eval_mean_memorized_layer": float(f.memorized.float().mean()),
                "eval_exit_share": {str(int(d)): round(float(c), 4) for d, c in zip(f.depths, counts)}})
    return out


# -- the recipe --------------------------------------------------------------------------------------------------------
@recipe("consistentee", ConsistentEEOptions)
def consistentee(cfg: TrainConfig, opts: ConsistentEEOptions, model) -> ExitArtifact:
    """ConsistentEE (arXiv 2312.11882): per-exit policy networks trained with REINFORCE, hardness-guided reward."""
    t0 = time.perf_counter()
    L = model.num_layers
    layers = cfg.layers(L)
    if opts.consistentee_hidden < 1:
        raise UsageError(f"--consistentee_hidden must be >= 1, got {opts.consistentee_hidden}")
    if opts.consistentee_samples < 2:
        raise UsageError(f"--consistentee_samples must be >= 2 (the baseline is their mean), got "
                         f"{opts.consistentee_samples}")
    art = start_artifact(cfg, model)
    dev = model.device
    torch.manual_seed(cfg.seed)
    policies = nn.ModuleDict({str(layer): ExitPolicy(model.hidden_size, opts.consistentee_hidden)
                              for layer in layers}).to(dev)
    train_rows, eval_rows = train_eval_split(cfg, model.tokenizer)
    held = [features(model, eval_rows[i:i + cfg.batch_size], layers, opts)
            for i in range(0, len(eval_rows), cfg.batch_size)]
    held_out = Features(torch.cat([h.x for h in held], 1), torch.cat([h.correct for h in held]),
                        torch.cat([h.reward for h in held]), torch.cat([h.memorized for h in held]), held[0].depths)

    def loss(rows: torch.Tensor, step: int) -> tuple[torch.Tensor, dict]:
        f = features(model, rows, layers, opts)
        z = policy_logits(policies, layers, f.x)
        gen = torch.Generator(device=dev).manual_seed(cfg.seed * 1_000_003 + step)  # resumable: a function of step
        exit_index, logpi = sample_trajectories(z, opts.consistentee_samples, gen)
        reward = f.reward.T.gather(0, exit_index)  # (S, N)
        advantage = reward - reward.mean(0, keepdim=True)  # baseline: mean over the token's sampled trajectories
        objective = -(advantage * logpi).mean()
        return objective, summary(f, exit_index)

    before = evaluate_policies(policies, layers, held_out)
    loop = Loop(cfg, {"consistentee": policies}, loss, lambda: evaluate_policies(policies, layers, held_out))
    metrics = loop.run(train_rows)
    art.tensors = {k: v for k, v in art.tensors.items() if not k.startswith(PREFIX)}  # retraining replaces them
    art.tensors.update(policy_tensors({int(k): p for k, p in policies.items()}))
    art.recommended["policy"] = {"policy_threshold": 0.5}
    art.provenance["consistentee"] = provenance(
        cfg, time.perf_counter() - t0, metrics, hidden=opts.consistentee_hidden, layers=layers,
        options=asdict(opts), before_training=before, reward="acc(d) - alpha * (d/L) * (1 - m/L)" if
        opts.consistentee_hardness else "acc(d) - alpha * d/L", adapters=sorted(art.adapters))
    _, out = cfg.paths()
    art.save(out)
    return art
