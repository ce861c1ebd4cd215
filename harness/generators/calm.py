"""CALM (Schuster et al., NeurIPS 2022): exit at the first layer whose confidence beats a threshold.

Confidence (--confidence): softmax = top-1 minus top-2 probability (default; FREE's CALM code
util/skip_conf.py 7-16), max_prob, hidden_state (cosine of consecutive layers' states, CALM's state
saturation), or contrastive / jsd_contrastive (top-1 minus top-2 of the contrastive distribution of the
vocabulary-reduction fork of FREE, Confidently_Exiting util/skip_conf.py 124-135 / 159-170). The token exits
when confidence > threshold (util/skip_conf.py 76). The threshold may decay over the generated position t
(--threshold_decay tau, N = the generation's max_steps) in the CALM paper's form or in FREE's code's form
(--threshold_decay_form). classifier = CALM's trained early-exit classifier: sigmoid(w_i . h_i + b_i), one
linear layer per exit depth i on that depth's hidden state, predicting whether the exit's top-1 agrees with the
last layer's; it is read from the attached exit artifact (train it with `python -m harness.train --recipe calm`),
costs 2 * hidden FLOPs per check, and depths without one are never exits. Skipped layers get state-copied K/V
(see per_token_exit.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .. import exit_rules
from ..config import UsageError, knob
from .base import register
from .exit_probe import ExitProbe, classifier_at, classifier_depths
from .per_token_exit import PerTokenExit

DEFAULT_THRESHOLD = 0.9


@dataclass
class CalmOptions(exit_rules.VocabReductionOptions, exit_rules.MinExitOption, exit_rules.ThresholdOption,
                  exit_rules.ConfidenceOptions):  # bases in reverse: a dataclass lists the last base's fields first
    """CALM's decaying threshold; its other knobs are the shared exit-rule knobs it inherits"""

    threshold_decay: Optional[float] = knob(
        None,
        "calm: decay the threshold over the generated position t with temperature tau (N = the generation's "
        "max_steps); omitted = constant threshold",
        range=(0.0, None, True))
    threshold_decay_form: str = knob(
        "calm_paper",
        "calm --threshold_decay: calm_paper = clip(0.9*lambda + 0.1*exp(-tau*t/N)) (CALM paper, "
        "Schuster et al. 2022), free_code = lambda*exp(-tau*t/N)/10 + 9*lambda/10 (FREE's CALM code, "
        "util/skip_conf.py 58-63)",
        choices=("calm_paper", "free_code"),
        when=(lambda c: c.threshold_decay is not None, "with --threshold_decay"))


@register("calm")
class Calm(PerTokenExit):
    """CALM: per-token exit when confidence > (decaying) threshold; state copying for skipped layers."""

    short, family = "CALM", "per-token early exit"
    label_knobs = ("threshold",)
    calibratable = ((None, ("threshold",), 1.0, 0.0),)
    in_all = 2
    options = CalmOptions

    def validate(self) -> None:
        super().validate()
        self.threshold = DEFAULT_THRESHOLD if self.config.threshold is None else self.config.threshold
        self.decay = exit_rules.DECAY_FORMS[self.config.threshold_decay_form]
        if self.measure == "classifier":
            self.check_classifier()

    def check_classifier(self) -> None:
        """--confidence classifier needs the trained classifier in the attached exit artifact, at usable depths."""
        m = self.model
        depths = [d for d in classifier_depths(m) if self.min_exit <= d < self.cap]
        if not depths:
            where = "no exit artifact is attached" if m.exits is None else \
                f"the attached exit artifact has no CALM classifier at layers {self.min_exit}..{self.cap - 1}"
            raise UsageError(f"--confidence classifier: {where}; train one with `python -m harness.train --recipe "
                             "calm` and pass --exits <its exits.safetensors>")
        for d in depths:
            w, b = classifier_at(m, d)
            if w.numel() != m.hidden_size or b.numel() != 1:
                raise UsageError(f"--confidence classifier: the classifier at layer {d} has {w.numel()} weights, "
                                 f"this model's hidden size is {m.hidden_size}")
        self.classifier_layers = depths
        self.first_exit = max(self.first_exit, depths[0])  # nothing to check below the first classifier

    def first_check(self) -> int:
        # the amateur layer must exist: i//2 >= 1 for contrastive, a layer in 2..i-1 for jsd_contrastive
        return max(self.min_exit, exit_rules.CONTRASTIVE_MIN_DEPTH.get(self.measure, 1))

    def knobs(self) -> dict:
        c = self.config
        decay = {"threshold_decay": c.threshold_decay, "threshold_decay_form": c.threshold_decay_form} \
            if c.threshold_decay is not None else {"threshold_decay": None}
        clf = {"classifier_layers": self.classifier_layers} if self.measure == "classifier" else {}
        return {"confidence": self.measure, "threshold": self.threshold, **decay, "min_exit_layer": self.min_exit,
                **clf, **exit_rules.reduction_knobs(c)}

    def threshold_at(self, step: int, max_steps: int) -> float:
        """Threshold for the token at 1-based position t = step + 1 (FREE: pos_time = past length + 1)."""
        if self.config.threshold_decay is None:
            return self.threshold
        return self.decay(self.threshold, step + 1, max_steps, self.config.threshold_decay)

    def should_exit(self, depth: int, probe: ExitProbe, step: int, max_steps: int) -> bool:
        return exit_rules.exit_fires(probe.confidence(depth, self.measure), self.threshold_at(step, max_steps))
