"""ConsistentEE's learned exit policy (Zeng et al., AAAI 2024, arXiv 2312.11882), as a per-token exit generator.

Every exit layer l the policy was trained for has a policy network pi_l on the shared final norm of the layer's
hidden state, giving the probability of exiting after l. Two shapes, told apart by the artifact's tensor names:
- linear (`consistentee.<l>.linear.{weight,bias}`): sigmoid(Linear(hidden, 1)), the reference's
  `Policy_networks_{idx} = nn.Linear(config.hidden_size, 1)` (ZeroNLP/ConsistentEE
  ConsistentEE_LLM/llama/modeling_llama.py:526-557);
- mlp (`consistentee.<l>.fc1.*`, `.fc2.*`): sigmoid(Linear(width, 1)(relu(Linear(hidden, width)))), ours (the
  shipped harness/data/exits artifact holds these, width 64).
The reference applies its policy to the normed hidden state and exits when the sigmoid > 0.5
(modeling_llama.py:1088-1105, mode 6). At inference the policy is greedy: a token leaves at the first depth d that
has a policy network and pi_d(h_d) > --policy_threshold (0.5 by default, as the reference); layers without one are
never exit points; a token no policy lets go runs every layer and is chosen by the full head, so policies that
never fire reproduce autoregressive decoding exactly. Skipped layers get state-copied K/V (see per_token_exit.py),
as the reference's `calculate_k_v_state` does for its exited tokens.

The networks are trained by `python -m harness.train --recipe consistentee` (harness/train/consistentee.py,
`--consistentee_policy linear|mlp`) and live in the exit artifact as tensors `consistentee.<layer>.<param>`. Their
FLOPs (2 x weights per evaluation) are counted as confidence FLOPs, and also into exit_head_flops, of which
confidence FLOPs are a part.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from ..config import UsageError, knob
from .base import GenerationResult, StopCondition, TokenCallback, register
from .exit_probe import ExitProbe
from .per_token_exit import PerTokenExit

PREFIX = "consistentee."
TRAIN_COMMAND = "python -m harness.train --recipe consistentee"


@dataclass
class PolicyOptions:
    """ConsistentEE's exit rule"""

    policy_threshold: float = knob(
        0.5,
        "policy: exit at a layer that has a ConsistentEE policy network when its exit probability pi(h) > this "
        "(greedy policy; the reference code exits when pi > 0.5); 1.0 never exits, 0.0 exits at the first policy "
        "layer",
        range=(0.0, 1.0, True))


class ExitPolicy(nn.Module):
    """pi_l(x) = sigmoid(f(x)), x = the final norm of layer l's hidden state; forward returns the logit f(x).

    width 0: f = Linear(hidden, 1) (the reference's shape); width > 0: f = fc2(relu(fc1(x))), fc1 of that width
    (ours). The output layer starts at zero, so pi = 0.5 everywhere at start: REINFORCE explores both actions
    evenly.
    """

    def __init__(self, hidden_size: int, width: int = 0):
        super().__init__()
        self.width = width
        if width:
            self.fc1 = nn.Linear(hidden_size, width)
            self.fc2 = nn.Linear(width, 1)
            out = self.fc2
        else:
            self.linear = nn.Linear(hidden_size, 1)
            out = self.linear
        nn.init.zeros_(out.weight)
        nn.init.zeros_(out.bias)

    @property
    def shape(self) -> str:
        return "mlp" if self.width else "linear"

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.fc2(torch.relu(self.fc1(x))) if self.width else self.linear(x)
        return z.squeeze(-1)

    def prob(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self(x))

    def flops(self) -> int:
        """Multiply-adds x2 of one evaluation (one position)."""
        return 2 * sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))


def policy_tensors(policies: dict[int, ExitPolicy]) -> dict[str, torch.Tensor]:
    """Artifact tensors of the policies: `consistentee.<layer>.<param>` (artifact keys without the 't.' prefix)."""
    return {f"{PREFIX}{layer}.{k}": v.detach().float().cpu().contiguous()
            for layer, pol in policies.items() for k, v in pol.state_dict().items()}


def policies_from_tensors(tensors: dict[str, torch.Tensor], hidden_size: int,
                          device: Optional[torch.device] = None) -> dict[int, ExitPolicy]:
    """The policy networks held in an artifact's tensors (empty if it has none), fp32, eval mode, frozen."""
    states: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith(PREFIX):
            layer, name = key[len(PREFIX):].split(".", 1)
            states.setdefault(int(layer), {})[name] = value
    out = {}
    for layer, sd in sorted(states.items()):
        # the shape is read off the tensor names and shapes: linear.* = the reference's Linear, fc1/fc2 = our MLP
        if set(sd) == {"linear.weight", "linear.bias"}:
            width, hid = 0, sd["linear.weight"].shape[1]
        elif set(sd) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}:
            width, hid = sd["fc1.weight"].shape
        else:
            raise UsageError(f"exit artifact: policy tensors of layer {layer} are incomplete or unknown "
                             f"({sorted(sd)}); retrain them with `{TRAIN_COMMAND}`")
        if hid != hidden_size:
            raise UsageError(f"exit artifact: policy of layer {layer} reads hidden size {hid}, the model has "
                             f"{hidden_size}")
        pol = ExitPolicy(hidden_size, width)
        pol.load_state_dict(sd)
        out[layer] = pol.to(device=device, dtype=torch.float32).eval().requires_grad_(False)
    return out


@register("policy")
class Policy(PerTokenExit):
    """ConsistentEE: a learned policy network per exit layer; exit when pi_l(h_l) > --policy_threshold."""

    short, family = "policy", "per-token early exit"
    in_all, all_note = 7, "with ConsistentEE policies in the exit artifact"
    options = PolicyOptions

    @classmethod
    def all_specs(cls, base, exits) -> list[dict]:
        """In `all` only when the attached artifact holds ConsistentEE policies."""
        return [{}] if exits is not None and any(k.startswith(PREFIX) for k in exits.tensors) else []

    def validate(self) -> None:
        m = self.model
        art = m.exits
        self.policies = policies_from_tensors(art.tensors, m.hidden_size) if art is not None else {}
        if not self.policies:
            where = f"the exit artifact {art.path or '(in memory)'} has none" if art is not None else \
                "no exit artifact is attached"
            raise UsageError(f"policy needs ConsistentEE policy networks and {where}: train them with "
                             f"`{TRAIN_COMMAND}` and pass --exits <the artifact it writes>")
        bad = [layer for layer in self.policies if not 1 <= layer < m.num_layers]
        if bad:
            raise UsageError(f"exit artifact: policy layers {bad} are outside 1..{m.num_layers - 1} for this model")
        for layer, pol in self.policies.items():
            self.policies[layer] = pol.to(m.layer_devices[layer - 1])
        t = self.config.policy_threshold
        if not 0.0 <= t <= 1.0:
            raise UsageError(f"--policy_threshold must be in [0, 1] (a probability), got {t}")
        self.threshold = t
        self.policy_flops = 0.0
        super().validate()

    def first_check(self) -> int:
        return max(self.min_exit, min(self.policies))

    def knobs(self) -> dict:
        width = next(iter(self.policies.values())).width  # 0: the reference's single Linear
        return {"policy_threshold": self.threshold, "policy_layers": sorted(self.policies), "policy_hidden": width}

    def should_exit(self, depth: int, probe: ExitProbe, step: int, max_steps: int) -> bool:
        pol = self.policies.get(depth)
        if pol is None:
            return False
        self.policy_flops += pol.flops()
        x = self.model.norm(probe.hidden[depth]).to(pol.device, torch.float32)
        return float(pol.prob(x).reshape(())) > self.threshold

    def generate(self, prompt_ids: Sequence[int], stop: StopCondition,
                 on_tokens: Optional[TokenCallback] = None) -> GenerationResult:
        self.policy_flops = 0.0
        res = super().generate(prompt_ids, stop, on_tokens)
        res.confidence_flops += self.policy_flops  # spent only on deciding whether to exit
        res.exit_head_flops += self.policy_flops  # confidence FLOPs are part of exit_head_flops
        return res
