"""Dynamic early exit with the criteria of the Dynamic Early Exit fork of LayerSkip.

--criteria:
  cosine_similarity  cos(norm(h_l), norm(h_l-1)) > --cosine_threshold (0.95); no exit head needed
  token_repeat       the exit argmax is the same for --token_repeats (3) consecutive layers
  convergence        |maxprob_l - maxprob_l-1| <= --convergence_delta (0.01)
  max_probability    maxprob_l > threshold interpolated over depth from --max_prob_start (0.99) at
                     --min_exit_layer to --max_prob_end (0.75) at the last layer
  entropy_based      entropy(softmax(logits_l / T)) < threshold interpolated from --entropy_start (0.5)
                     to --entropy_end (2.0) nats (the fork's exact entropy schedule is our choice here)

Unlike the fork, skipped layers get state-copied K/V (no holes; see layerwise.py) and a token whose
criterion never fires runs all layers.
"""
from __future__ import annotations

from .. import exits
from ..config import UsageError
from .base import register
from .layerwise import LayerwiseExit
from .probe import TokenProbe


@register("dynamic")
class Dynamic(LayerwiseExit):
    """Dynamic early exit: --criteria cosine_similarity|token_repeat|entropy_based|max_probability|convergence."""

    default_confidence = "max_prob"

    def validate(self) -> None:
        super().validate()
        if self.config.confidence in ("softmax", "hidden_state"):
            raise UsageError("dynamic reads its own criterion; --confidence may only be contrastive or jsd_contrastive")
        if self.config.token_repeats < 1:
            raise UsageError(f"--token_repeats must be >= 1, got {self.config.token_repeats}")
        self.check = getattr(self, f"_{self.config.criteria}")

    def knobs(self) -> dict:
        c = self.config
        per = {"cosine_similarity": {"cosine_threshold": c.cosine_threshold},
               "token_repeat": {"token_repeats": c.token_repeats},
               "convergence": {"convergence_delta": c.convergence_delta},
               "max_probability": {"max_prob_start": c.max_prob_start, "max_prob_end": c.max_prob_end},
               "entropy_based": {"entropy_temperature": c.entropy_temperature, "entropy_start": c.entropy_start,
                                 "entropy_end": c.entropy_end}}[c.criteria]
        return {"criteria": c.criteria, "min_exit_layer": self.min_exit, "confidence": c.confidence,
                **c.reduction_knobs(), **per}

    def should_exit(self, depth: int, probe: TokenProbe, step: int) -> bool:
        return self.check(depth, probe)

    def _schedule(self, depth: int, start: float, end: float) -> float:
        return exits.interpolate(depth, self.min_exit, self.model.num_layers, start, end)

    def _cosine_similarity(self, depth: int, probe: TokenProbe) -> bool:
        norm = self.model.norm
        return exits.cosine(norm(probe.hidden[depth]), norm(probe.hidden[depth - 1])) > self.config.cosine_threshold

    def _token_repeat(self, depth: int, probe: TokenProbe) -> bool:
        n = self.config.token_repeats
        first = depth - n + 1
        if first < self.min_exit:
            probe.top_token(depth)  # evaluate as we go so the run of equal argmaxes can be read later
            return False
        top = probe.top_token(depth)
        return all(probe.top_token(d) == top for d in range(first, depth))

    def _convergence(self, depth: int, probe: TokenProbe) -> bool:
        cur = exits.max_prob(probe.probs(depth))
        if depth - 1 < self.min_exit:
            return False
        return abs(cur - exits.max_prob(probe.probs(depth - 1))) <= self.config.convergence_delta

    def _max_probability(self, depth: int, probe: TokenProbe) -> bool:
        c = self.config
        return exits.max_prob(probe.probs(depth)) > self._schedule(depth, c.max_prob_start, c.max_prob_end)

    def _entropy_based(self, depth: int, probe: TokenProbe) -> bool:
        c = self.config
        p = probe.probs(depth, c.entropy_temperature)
        ent = float(-(p * p.clamp_min(1e-12).log()).sum())
        return ent < self._schedule(depth, c.entropy_start, c.entropy_end)

    def token_confidence(self, probe: TokenProbe, depth: int) -> float:
        return exits.max_prob(probe.probs(depth))
