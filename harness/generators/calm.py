"""CALM (Schuster et al., NeurIPS 2022): exit at the first layer whose confidence beats a threshold.

Confidence: softmax margin (top-1 minus top-2, the default), top-1 probability, hidden-state saturation
(cosine of consecutive layers), or contrastive / JSD-contrastive (with --vocab_reduction, the
vocabulary-reduction fork of FREE). The threshold may decay over the generated position
(--threshold_decay tau, CALM eq. 4 as implemented in FREE's CALM code). A trained confidence classifier
is not available for decoder-only models here; it is not offered. Skipped layers get state-copied K/V
(see layerwise.py).
"""
from __future__ import annotations

from .. import exits
from .base import register
from .layerwise import LayerwiseExit
from .probe import TokenProbe

DEFAULT_THRESHOLD = 0.9


@register("calm")
class Calm(LayerwiseExit):
    """CALM: per-token exit when confidence >= (decaying) threshold; state copying for skipped layers."""

    def validate(self) -> None:
        super().validate()
        self.threshold = DEFAULT_THRESHOLD if self.config.threshold is None else self.config.threshold
        self.max_steps = self.config.max_steps or 128

    def knobs(self) -> dict:
        c = self.config
        return {"confidence": self.measure, "threshold": self.threshold, "threshold_decay": c.threshold_decay,
                "min_exit_layer": self.min_exit, **c.reduction_knobs()}

    def threshold_at(self, step: int) -> float:
        if self.config.threshold_decay is None:
            return self.threshold
        return exits.decayed_threshold(self.threshold, step, self.max_steps, self.config.threshold_decay)

    def should_exit(self, depth: int, probe: TokenProbe, step: int) -> bool:
        return probe.confidence(depth, self.measure) >= self.threshold_at(step)

    def token_confidence(self, probe: TokenProbe, depth: int) -> float:
        return probe.confidence(depth, self.measure)
