"""ConsistentEE (Zeng et al., AAAI 2024, arXiv 2312.11882): learn a per-token exit policy with REINFORCE.

Reference: ZeroNLP/ConsistentEE at cd810c7 (HEAD), its decoder code ConsistentEE_LLM/llama/modeling_llama.py (the
encoder code ConsistentEE/run_glue.py differs where noted). Defaults follow the decoder code; what is ours is a
named option.

The trunk (and any exit adapters of the --exits artifact, which `model.exit_logits(h, layer=l)` applies) stays
frozen. Each exit layer l of --exit_layers gets a policy network pi_l on the final norm of h_l, giving P(exit after
l) (harness/generators/consistentee.py). `--consistentee_policy linear` (default): sigmoid(Linear(hidden, 1)), the
reference's `Policy_networks_{idx} = nn.Linear(config.hidden_size, 1)` (modeling_llama.py:526-557); `mlp`: ours,
Linear(hidden, --consistentee_hidden) -> ReLU -> Linear(., 1). Teacher-forced on training rows, every token walks
the exits in order and samples exit/continue from pi_l; the episode ends at the first exit taken, or at the last
layer L. Its reward is

    R = acc(d) - alpha * cost(d) * h(m)

  d        the depth the token left at (exit layer or L);
  acc(d)   --consistentee_reward: gold_log_prob (default) = log p_d(the text's next token), i.e. -CE against the
           label, the reference's `-loss` (modeling_llama.py:1356-1368, 1383); correct = 1 if the exit's top-1
           equals the last layer's, else 0; log_prob = log p_d(last layer's top-1);
  cost(d)  --consistentee_depth_cost: layers (default) = d, the reference's `layers[i] * alpha`
           (modeling_llama.py:1383); fraction = d / L;
  h(m)     1 by default, as the reference's active reward (modeling_llama.py:1383, and run_glue.py:445, where it is
           `-loss` alone; the hardness factor survives there only in comments); --consistentee_hardness: the
           paper's hardness-guided 1 - m / L, m = the token's memorized layer: the earliest depth from which its
           prediction stays consistent with the last layer's at every deeper exit (the last layer always is).

REINFORCE: loss = -mean[(R - b) * log pi(trajectory)], log pi = sum of the log-probabilities of the decisions
taken (continue at each exit before the one taken, exit at it); K = --consistentee_samples trajectories are
sampled per token (default 4, the reference decoder's `sample_K = 4`, modeling_llama.py:1377; the encoder's
run_glue.py:390 uses 8) and the baseline b is their mean reward, as the reference's (modeling_llama.py:1392-1402).
Logged every step on the sampled trajectories: reward, exit rate, mean exit layer, accuracy (consistency with the
last layer) of taken exits; every --log_every steps on the held-out rows, with the greedy policy (pi > 0.5): the
same plus consistency with the full model, and the exact expected reward of the stochastic policy.

Our options, and why one would take them (the shipped harness/data/exits artifact was trained with
`--consistentee_policy mlp --consistentee_reward correct --consistentee_depth_cost fraction --consistentee_hardness
true --consistentee_samples 8 --consistentee_alpha 2`: Makefile `exits`):
- correct: a decoder is judged at inference by agreement with the full model, not by the gold token, and under
  greedy decoding only the top-1 matters; with the 0/1 indicator the trade-off does not depend on the
  vocabulary's log-prob scale: leaving at d instead of L pays off iff P(consistent at d) > 1 - alpha * (cost(L) -
  cost(d)) * h(m);
- fraction: one alpha means the same on models of any depth (alpha = the reference's alpha x L);
- hardness (the paper's Eq.; --consistentee_memorized exits = m over the exit layers and L, free to compute;
  all = the paper's definition over every layer, one extra exit head per layer and token);
- mlp: a non-linear policy can separate tokens a single Linear cannot.

Deviations without an option:
- actions are sampled from pi (on-policy REINFORCE); the reference takes the greedy action with epsilon-random
  exploration while weighting log pi as if sampled (modeling_llama.py:796-832), keeps the first of its K copies
  from ever exiting (:820), and divides log pi by the number of layers run (:1339): each biases the gradient;
- the policy's last layer starts at zero (pi = 0.5 at every exit); the reference's Linear starts from the HF init
  normal(0, initializer_range) (modeling_llama.py:407-412) and is trained through LoRA adapters
  (ConsistentEE_LLM/finetune.py:106-115);
- policies only at the --exit_layers (the reference has one at every layer), over a frozen trunk and exits.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import UsageError, _f
from ..generators.consistentee import PREFIX, ExitPolicy, policy_tensors
from ..trained_exits import ExitArtifact
from . import recipe
from .common import Loop, TrainConfig, autocast, hidden_states, provenance, start_artifact, train_eval_split

REWARDS = ("gold_log_prob", "correct", "log_prob")
DEPTH_COSTS = ("layers", "fraction")
POLICIES = ("linear", "mlp")
REF = "ZeroNLP/ConsistentEE ConsistentEE_LLM/llama/modeling_llama.py"


@dataclass
class ConsistentEEOptions:
    """--recipe consistentee."""

    consistentee_policy: str = _f(
        "linear", f"policy network per exit: linear = sigmoid(Linear(hidden, 1)), the reference's ({REF}:526-557); "
        "mlp = ours, Linear(hidden, --consistentee_hidden) -> ReLU -> Linear(., 1), which can separate tokens a "
        "linear policy cannot (the shipped artifact's)", choices=POLICIES)
    consistentee_hidden: int = _f(64, "width of the mlp policy's hidden layer (with --consistentee_policy mlp)")
    consistentee_reward: str = _f(
        "gold_log_prob", f"accuracy term of the reward: gold_log_prob = log-probability the exit gives the text's "
        f"next token, the reference's -loss ({REF}:1368,1383); correct = 1 if the exit's top-1 equals the last "
        "layer's, else 0 (ours: a decoder is judged by agreement with the full model and greedy decoding reads only "
        "the top-1); log_prob = log-probability the exit gives the last layer's top-1", choices=REWARDS)
    consistentee_depth_cost: str = _f(
        "layers", f"depth term of the reward, times alpha: layers = the exit depth d, the reference's "
        f"layers[i] * alpha ({REF}:1383); fraction = d / L (ours: one alpha means the same at any depth)",
        choices=DEPTH_COSTS)
    consistentee_alpha: float = _f(
        1e-5, "alpha, the weight of the depth term (default: the reference's, ConsistentEE_LLM/finetune.py:102; its "
        "finetune.sh:9 passes 0). Larger = earlier exits; the shipped policies used 2 with --consistentee_depth_cost "
        "fraction")
    consistentee_hardness: bool = _f(
        False, f"scale the depth term by (1 - memorized layer / L), the paper's hardness-guided reward (hard tokens "
        f"pay less for depth, easy ones more); false = the reference code's active reward, which has no such "
        f"factor ({REF}:1383; ConsistentEE/run_glue.py:445)")
    consistentee_memorized: str = _f("exits", "memorized layer (with --consistentee_hardness) over: exits = the exit "
                                     "layers and L (free), all = every layer (the paper's definition; one exit head "
                                     "per layer and token)", choices=("exits", "all"))
    consistentee_samples: int = _f(
        4, f"trajectories sampled per token; the REINFORCE baseline is their mean reward (the reference decoder's "
        f"sample_K = 4, {REF}:1377; its encoder's run_glue.py:390 uses 8). More = a less noisy gradient per step")


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
                 hardness: bool = False, depth_cost: str = "layers") -> torch.Tensor:
    """R[n, j] = acc[n, j] - alpha * cost(depths[j]) * h(memorized[n]); cost(d) = d (`layers`) or d / L
    (`fraction`); h(m) = 1 - m / L with hardness, else 1."""
    weight = 1 - memorized.float() / num_layers if hardness else torch.ones_like(memorized, dtype=torch.float32)
    cost = depths.float() if depth_cost == "layers" else depths.float() / num_layers
    return acc.float() - alpha * cost[None, :] * weight[:, None]


def reward_formula(opts: ConsistentEEOptions) -> str:
    """The reward the options select, in words (recorded in the artifact's provenance)."""
    acc = {"gold_log_prob": "log p_d(next token)", "correct": "1[top1_d == top1_L]",
           "log_prob": "log p_d(top1_L)"}[opts.consistentee_reward]
    cost = "d" if opts.consistentee_depth_cost == "layers" else "(d/L)"
    return f"{acc} - alpha * {cost}" + (" * (1 - m/L)" if opts.consistentee_hardness else "")


@torch.no_grad()
def features(model, rows: torch.Tensor, layers: list[int], opts: ConsistentEEOptions) -> Features:
    """Teacher-forced pass over `rows`: each exit's correctness and reward, and the policies' inputs.

    With the gold_log_prob reward a position needs the token after it, so the last position of each row is left
    out (the reference's shift_logits / shift_labels, modeling_llama.py:1356-1357)."""
    dev, L = model.device, model.num_layers
    gold_reward = opts.consistentee_reward == "gold_log_prob"
    with autocast(dev):
        hs = hidden_states(model, rows)
        if gold_reward:
            hs = [h[:, :-1] for h in hs]
        final = model.lm_head(hs[-1]).float()  # hs[L] is already final-normed
    target = final.argmax(-1)
    gold = rows[:, 1:].to(target.device) if gold_reward else None

    def score(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-probability of the reward's target, consistency with the last layer's top-1), flattened."""
        logits = logits.float().to(target.device)
        want = gold if gold is not None else target
        logp = logits.gather(-1, want[..., None])[..., 0] - logits.logsumexp(-1)
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
    if opts.consistentee_hardness and opts.consistentee_memorized == "all":
        every = []
        for d in range(1, L):
            with autocast(dev):
                every.append(score(model.exit_logits(hs[d], layer=d))[1])
        memorized = memorized_layer(torch.stack(every + [ones], -1), torch.arange(1, L + 1, device=dev))
    else:
        memorized = memorized_layer(correct, depths)
    acc = correct.float() if opts.consistentee_reward == "correct" else torch.stack(logps + [logp_L], -1)
    reward = reward_table(acc, memorized, depths, L, opts.consistentee_alpha, opts.consistentee_hardness,
                          opts.consistentee_depth_cost)
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
    """ConsistentEE (arXiv 2312.11882): per-exit policy networks trained with REINFORCE (reference decoder code)."""
    t0 = time.perf_counter()
    L = model.num_layers
    layers = cfg.layers(L)
    if opts.consistentee_policy not in POLICIES:
        raise UsageError(f"--consistentee_policy must be one of {', '.join(POLICIES)}, got "
                         f"{opts.consistentee_policy!r}")
    if opts.consistentee_reward not in REWARDS or opts.consistentee_depth_cost not in DEPTH_COSTS:
        raise UsageError(f"--consistentee_reward must be one of {', '.join(REWARDS)} and --consistentee_depth_cost "
                         f"one of {', '.join(DEPTH_COSTS)}")
    if opts.consistentee_hidden < 1:
        raise UsageError(f"--consistentee_hidden must be >= 1, got {opts.consistentee_hidden}")
    if opts.consistentee_samples < 2:
        raise UsageError(f"--consistentee_samples must be >= 2 (the baseline is their mean), got "
                         f"{opts.consistentee_samples}")
    art = start_artifact(cfg, model)
    dev = model.device
    torch.manual_seed(cfg.seed)
    width = opts.consistentee_hidden if opts.consistentee_policy == "mlp" else 0  # 0: the reference's Linear
    policies = nn.ModuleDict({str(layer): ExitPolicy(model.hidden_size, width) for layer in layers}).to(dev)
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
        cfg, time.perf_counter() - t0, metrics, policy=opts.consistentee_policy, hidden=width, layers=layers,
        options=asdict(opts), before_training=before, reward=reward_formula(opts), adapters=sorted(art.adapters))
    _, out = cfg.paths()
    art.save(out)
    return art
