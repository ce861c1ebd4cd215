"""FREE (Bae et al., EMNLP 2023, arXiv 2310.05424), for decoder-only models.

Shallow-deep module: every token runs the first S = --shallow_exit_layer layers; if the shallow exit's
confidence (top-1 minus top-2 probability by default: FREE's `softmax` measure, util/skip_conf.py 7-16)
exceeds the threshold (util/skip_conf.py 76) the token is emitted from there, otherwise the remaining
layers run.
Synchronized parallel decoding: tokens that exited shallow are queued with their layer-S hidden states;
the next token that goes deep carries them through layers S..L-1 in the same pass, which fills their
deep K/V exactly (no approximation, no holes: deep layers are only read by deep tokens, and every deep
pass starts at the oldest queued position).
Adaptive threshold (--adaptive_threshold): every token that reaches the deep layers (the queued ones and
the current deep token, the only source of below-threshold confidences) gives a pair (shallow confidence,
shallow argmax == deep argmax). The pairs accumulate over the whole run on this generator object; at the
start of each new sequence, for at most 300 sequences, the threshold is refit on all of them (FREE
models/deploying_t5.py ~1049, ~1208-1214) with FREE's Beta mixture (exit_rules.bmm_threshold) or our posterior
rule (--adaptive_estimator posterior). `threshold_trajectory` lists the threshold used by each sequence.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from .. import exit_rules
from ..config import UsageError, knob
from .base import GenerationResult, Generator, Output, StopCondition, TokenCallback, register
from .exit_probe import ExitProbe

DEFAULT_THRESHOLD = 0.9
MAX_REFITS = 300  # deploying_t5.py ~1049: bmm_update_max_iter = 300


@dataclass
class FreeOptions(exit_rules.ThresholdOption, exit_rules.ConfidenceOptions):
    """FREE's shallow module and adaptive threshold; confidence and threshold are inherited"""

    shallow_exit_layer: Optional[int] = knob(
        None,
        "free: depth of the shallow module, 1..L-1; omitted = L // 4 (our default)",
        range=(1, None, True))
    adaptive_threshold: bool = knob(
        False,
        "free: refit the threshold at the start of every sequence (at most 300) on the (shallow "
        "confidence, shallow == deep) pairs of every deep-processed token so far in the run (FREE "
        "models/deploying_t5.py ~1049, ~1208-1214)")
    adaptive_estimator: str = knob(
        "beta_mixture",
        "free --adaptive_threshold: beta_mixture = FREE's per-class Beta fits by weighted moments, "
        "threshold where P(agree | confidence) > 0.4 on 10 points in [0.3, 0.9] (util/bmm.py 6-15, 49-84, "
        "110-116); posterior = our rule: smallest confidence with P(disagree | confidence) <= --adaptive_tolerance "
        "(clipped to [0.3, 0.9])",
        choices=("beta_mixture", "posterior"),
        when=(lambda c: c.adaptive_threshold, "with --adaptive_threshold"))
    adaptive_tolerance: float = knob(
        0.1,
        "free --adaptive_estimator posterior: exit when the estimated P(shallow != deep | confidence) <= this",
        when=(lambda c: c.adaptive_threshold and c.adaptive_estimator == "posterior",
                    "with --adaptive_threshold --adaptive_estimator posterior"),
        range=(0.0, 1.0, True))


@dataclass
class AdaptiveThreshold:
    """Pairs seen so far in the run and the threshold refit from them at each sequence start."""

    initial: float  # threshold until the first refit (FREE: the configured threshold while bmm_threshold is None)
    estimator: str = "beta_mixture"
    tolerance: float = 0.1  # posterior estimator only
    confidences: list = field(default_factory=list)
    agree: list = field(default_factory=list)
    refits: int = 0
    trajectory: list = field(default_factory=list)  # one entry per sequence: the threshold it used

    def __post_init__(self) -> None:
        self.value = self.initial

    def start_sequence(self) -> float:
        refit = bool(self.confidences) and self.refits < MAX_REFITS
        if refit:
            if self.estimator == "beta_mixture":
                self.value = exit_rules.bmm_threshold(self.confidences, self.agree)
            else:
                self.value = exit_rules.posterior_threshold(self.confidences, self.agree, self.tolerance)
            self.refits += 1
        self.trajectory.append({"sequence": len(self.trajectory), "pairs": len(self.confidences),
                                "agree": int(sum(self.agree)), "refit": refit, "threshold": self.value})
        return self.value

    def add(self, confidence: float, agreed: bool) -> None:
        self.confidences.append(confidence)
        self.agree.append(agreed)


@register("free")
class Free(Generator):
    """FREE: shallow-deep exit with synchronized parallel decoding and optional adaptive threshold."""

    short, family = "FREE", "per-token early exit"
    label_knobs = ("threshold",)
    calibratable = ((None, ("threshold",), 1.0, 0.0),)
    in_all = 3
    options = FreeOptions

    def validate(self) -> None:
        L, c = self.model.num_layers, self.config
        s = c.shallow_exit_layer
        if s is not None and not 1 <= s < L:
            raise UsageError(f"--shallow_exit_layer {s} is outside 1..{L - 1} for this model")
        if c.exit_layer is not None:
            raise UsageError("--exit_layer does not apply to free; use --shallow_exit_layer")
        if c.confidence == "hidden_state":
            raise UsageError("free needs a distribution-based --confidence (softmax, max_prob, contrastive, "
                             "jsd_contrastive)")
        if not 0 < c.adaptive_tolerance < 1:
            raise UsageError(f"--adaptive_tolerance must be in (0, 1), got {c.adaptive_tolerance}")
        self.S = s or max(1, L // 4)
        self.measure = c.confidence or "softmax"
        need = exit_rules.CONTRASTIVE_MIN_DEPTH.get(self.measure, 1)
        if self.S < need:
            raise UsageError(f"--confidence {self.measure} needs --shallow_exit_layer >= {need} (an amateur layer "
                             "below the shallow exit)")
        self.threshold = DEFAULT_THRESHOLD if c.threshold is None else c.threshold
        self.reset_state()

    def reset_state(self) -> None:
        """Start a new run: forget the adaptive estimator's pairs and trajectory (call after warm-up)."""
        c = self.config
        self.adaptive = AdaptiveThreshold(self.threshold, c.adaptive_estimator, c.adaptive_tolerance) \
            if c.adaptive_threshold else None
        self.threshold_trajectory: list = self.adaptive.trajectory if self.adaptive else []

    def log_state(self) -> Optional[dict]:
        """The adaptive threshold of the sequence just generated: {sequence, pairs, agree, refit, threshold}."""
        return dict(self.threshold_trajectory[-1]) if self.threshold_trajectory else None

    def knobs(self) -> dict:
        c = self.config
        adaptive = {"adaptive_estimator": c.adaptive_estimator} if c.adaptive_threshold else {}
        if c.adaptive_threshold and c.adaptive_estimator == "posterior":
            adaptive["adaptive_tolerance"] = c.adaptive_tolerance
        return {"shallow_exit_layer": self.S, "confidence": self.measure, "threshold": self.threshold,
                "adaptive_threshold": c.adaptive_threshold, **adaptive, **exit_rules.reduction_knobs(c)}

    def shallow(self, probe: ExitProbe, h: torch.Tensor, cache, pos: int) -> torch.Tensor:
        """Layers 0..S-1 for one token; every state is kept when contrastive confidence needs amateur layers."""
        m = self.model
        if probe.contrastive is None:
            return m.run_layers(h, 0, self.S, cache, pos)
        rope = m.rope(h, pos)
        for layer in range(self.S):
            h = probe.hidden[layer + 1] = m.run_layers(h, layer, layer + 1, cache, pos, rope=rope)
        return h

    @torch.inference_mode()
    def generate(self, prompt_ids: Sequence[int], stop: StopCondition,
                 on_tokens: Optional[TokenCallback] = None) -> GenerationResult:
        m, L, S = self.model, self.model.num_layers, self.S
        threshold = self.adaptive.start_sequence() if self.adaptive else self.threshold
        cache, token, t0, t1 = self.prefill(prompt_ids)
        out, pos, conf_flops = Output(stop, on_tokens), len(prompt_ids), 0.0
        queue: list[tuple[torch.Tensor, float, int]] = []  # (layer-S state, confidence, shallow argmax)
        depth = L
        # components: shallow (layers 0..S-1 + the shallow exit's confidence and pick) / deep (a deep pass of the
        # current token alone) / parallel (a deep pass that also carries queued shallow-exited positions)
        timer = self.timer
        while not out.add([token], [depth]):
            probe = ExitProbe(m, self.config, S, self.measure)
            with timer("shallow"):
                h = probe.hidden[0] = m.embed(self.ids([token]))
                h = probe.hidden[S] = self.shallow(probe, h, cache, pos)
                conf = probe.confidence(S, self.measure)
                shallow_top = probe.top_token(S)
                fire = exit_rules.exit_fires(conf, threshold)
                if fire:
                    token = probe.pick(S, self.sampler)
            if fire:
                queue.append((h, conf, shallow_top))
                depth = S
            else:  # deep token: carry every queued position through the deep layers in the same pass
                with timer("parallel" if queue else "deep"):
                    start = pos - len(queue)
                    states = torch.cat([q[0] for q in queue] + [h], dim=1)
                    deep = m.run_layers(states, S, L, cache, start, rope=m.rope(states, start))
                    if self.adaptive:  # pairs from every deep-processed token, the current one included
                        logits = m.exit_logits(deep)[0]
                        for (_, c, shallow), deep_top in zip(queue + [(h, conf, shallow_top)],
                                                             logits.argmax(-1).tolist()):
                            self.adaptive.add(c, shallow == deep_top)
                        conf_flops += m.head_flops(m.vocab_size) * len(queue)  # queued heads only feed the estimator
                        token = self.sampler.pick(logits[-1])
                    else:
                        token = self.sampler.pick(m.exit_logits(deep[:, -1:]))
                queue.clear()
                depth = L
            conf_flops += probe.confidence_flops
            pos += 1
        self.pending = len(queue)  # shallow positions whose deep K/V nobody needed before the end
        return self.result(out, t0, t1, self.clock(), confidence_flops=conf_flops)
