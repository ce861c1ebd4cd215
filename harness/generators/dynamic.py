"""Dynamic early exit with the criteria of the Dynamic Early Exit fork of LayerSkip
(Amir-Voloshin/DynamicEarlyExit, self_speculation/llama_early_exit_utils.py; l = 0-based layer index,
depth d = l + 1 layers run, r = (L - l)/L):

  cosine_similarity  cos(final_norm(h_d), h_(d-1)) > --cosine_threshold 0.95 (alias --conf), the previous
                     layer's state as the fork passes it (raw); first check at depth 2 (lines 104-123)
  token_repeat       counter from 0, +1 when the argmax equals the previous layer's, else reset; exit when
                     it reaches --token_repeats 4 (5 equal layers) (lines 54-60, generator_base.py 47)
  convergence        |maxprob_d - maxprob_(d-1)| <= --convergence_delta 0.01 (alias --delta_threshold);
                     first check at depth 3 (lines 151-179)
  max_probability    maxprob_d > 0.99*r^0.75 + 0.75*(1 - r^0.75) (lines 220-222; scale 0.75 from
                     llama_model_utils.py ~275)
  entropy_based      entropy(softmax((z - max z)/3)) < 11.0*sqrt(r) + 10.5*(1 - sqrt(r)) (lines 293-317;
                     defaults llama_model_utils.py ~270-272). With a 49k vocabulary (ln V = 10.80) this
                     threshold fires unconditionally wherever r >= 0.36 (reported, not re-tuned)

--exit_layer E caps the depth as the fork's loop over layers[:exit_layer] does. Unlike the fork, skipped
layers get state-copied K/V instead of holes (see per_token_exit.py), and a token whose criterion never
fires runs every layer up to the cap, the last layer included (the fork's default exit_layer = -1 never
runs it). --confidence contrastive|jsd_contrastive replaces the softmax that max_probability,
entropy_based and convergence read with the contrastive distribution (our extension).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from .. import exit_rules
from ..config import UsageError, knob
from ..exit_rules import CONTRASTIVE
from .base import register
from .exit_probe import ExitProbe
from .per_token_exit import PerTokenExit

if TYPE_CHECKING:
    from ..config import GenerationConfig

CRITERIA = ("cosine_similarity", "token_repeat", "entropy_based", "max_probability", "convergence")


@dataclass
class DynamicOptions(exit_rules.VocabReductionOptions, exit_rules.MinExitOption, exit_rules.ConfidenceOptions):
    """the fork's criteria and their knobs; the shared exit-rule knobs are inherited"""

    criteria: Optional[str] = knob(
        None,
        "dynamic: exit criterion of the Dynamic Early Exit fork of LayerSkip (Amir-Voloshin/DynamicEarlyExit "
        "self_speculation/llama_early_exit_utils.py); alone it selects dynamic",
        choices=CRITERIA,
        selects=True)
    cosine_threshold: float = knob(
        0.95,
        "dynamic cosine_similarity: exit when cos(final_norm(h_l), h_l-1) > this (fork's conf, "
        "generator_base.py 48)",
        aliases=("--conf",),
        when=(lambda c: c.criteria == "cosine_similarity", "with --criteria cosine_similarity"),
        range=(None, None, True))
    token_repeats: int = knob(
        4,
        "dynamic token_repeat: exit when the count of consecutive layers repeating the previous layer's argmax "
        "reaches this, i.e. this+1 equal layers (fork's repeats: generator_base.py 47, llama_early_exit_utils.py "
        "54-60)",
        when=(lambda c: c.criteria == "token_repeat", "with --criteria token_repeat"),
        range=(1, None, True))
    convergence_delta: float = knob(
        0.01,
        "dynamic convergence: exit when |maxprob_l - maxprob_l-1| <= this (fork's delta_threshold, "
        "llama_early_exit_utils.py 136-179)",
        aliases=("--delta_threshold",),
        when=(lambda c: c.criteria == "convergence", "with --criteria convergence"),
        range=(None, None, True))
    max_prob_start: float = knob(
        0.99,
        "dynamic max_probability: exit when maxprob > start*r^scale + end*(1-r^scale), r = (L-l)/L, l the "
        "0-based layer (llama_early_exit_utils.py 191-222)",
        when=(lambda c: c.criteria == "max_probability", "with --criteria max_probability"),
        range=(None, None, True))
    max_prob_end: float = knob(
        0.75,
        "dynamic max_probability: end of that schedule",
        when=(lambda c: c.criteria == "max_probability", "with --criteria max_probability"),
        range=(None, None, True))
    max_prob_scale: float = knob(
        0.75,
        "dynamic max_probability: exponent of that schedule (fork: llama_model_utils.py ~275)",
        when=(lambda c: c.criteria == "max_probability", "with --criteria max_probability"),
        range=(0.0, None, True))
    entropy_temperature: float = knob(
        3.0,
        "dynamic entropy_based: entropy of softmax((logits - max)/T) (llama_early_exit_utils.py 305-314)",
        when=(lambda c: c.criteria == "entropy_based" and c.confidence not in CONTRASTIVE,
              "with --criteria entropy_based and no contrastive confidence"),
        range=(0.0, None, False))
    entropy_start: float = knob(
        11.0,
        "dynamic entropy_based: exit when entropy < start*sqrt(r) + end*(1-sqrt(r)), r = (L-l)/L "
        "(llama_early_exit_utils.py 293-317, defaults llama_model_utils.py ~270-272; ln V = 10.8 for a 49k "
        "vocabulary, so it fires unconditionally wherever r >= 0.36)",
        when=(lambda c: c.criteria == "entropy_based", "with --criteria entropy_based"),
        range=(None, None, True))
    entropy_end: float = knob(
        10.5,
        "dynamic entropy_based: end of that schedule (nats)",
        when=(lambda c: c.criteria == "entropy_based", "with --criteria entropy_based"),
        range=(None, None, True))


@register("dynamic")
class Dynamic(PerTokenExit):
    """Dynamic early exit: --criteria cosine_similarity|token_repeat|entropy_based|max_probability|convergence."""

    short, family = "dyn", "per-token early exit"
    in_all, all_note = 4, "x every criterion"
    options = DynamicOptions
    calibratable = (("max_probability", ("max_prob_start", "max_prob_end"), 1.0, 0.0),
                    ("entropy_based", ("entropy_start", "entropy_end"), 0.0, None))

    @classmethod
    def all_specs(cls, base: GenerationConfig, exits) -> list[dict]:
        """One configuration per criterion (only the one asked for with --criteria)."""
        return [{"criteria": c} for c in ([base.criteria] if base.criteria else CRITERIA)]

    @classmethod
    def spec_defaults(cls, base: GenerationConfig, over: dict, num_layers: int, exits) -> dict:
        """`--strategies dynamic` without a criterion runs the shared --criteria, else the first one."""
        return {} if "criteria" in over else {"criteria": base.criteria or CRITERIA[0]}

    default_confidence = None
    caps_depth = True

    def validate(self) -> None:
        if self.config.confidence not in (None, *exit_rules.CONTRASTIVE_MIN_DEPTH):
            raise UsageError("dynamic reads its own criterion; --confidence may only be contrastive or jsd_contrastive")
        if self.config.token_repeats < 1:
            raise UsageError(f"--token_repeats must be >= 1, got {self.config.token_repeats}")
        super().validate()
        self.check = getattr(self, f"_{self.config.criteria}")

    def first_check(self) -> int:
        c, m = self.config.criteria, self.min_exit
        amateur = exit_rules.CONTRASTIVE_MIN_DEPTH.get(self.measure, 1)
        if c == "cosine_similarity":
            return max(m, 2)  # needs a previous layer's state, not the embeddings
        if c == "convergence":
            return max(m, 3, amateur + 1)  # the fork stores max probs from depth 2 and compares from depth 3
        if c == "token_repeat":
            return m
        return max(m, amateur)

    def artifact_key(self) -> str:
        return f"dynamic:{self.config.criteria}"

    def knobs(self) -> dict:
        c = self.config
        per = {"cosine_similarity": {"cosine_threshold": c.cosine_threshold},
               "token_repeat": {"token_repeats": c.token_repeats},
               "convergence": {"convergence_delta": c.convergence_delta},
               "max_probability": {"max_prob_start": c.max_prob_start, "max_prob_end": c.max_prob_end,
                                   "max_prob_scale": c.max_prob_scale},
               "entropy_based": {"entropy_temperature": c.entropy_temperature, "entropy_start": c.entropy_start,
                                 "entropy_end": c.entropy_end}}[c.criteria]
        return {"criteria": c.criteria, "min_exit_layer": self.min_exit, "exit_layer": c.exit_layer,
                "confidence": c.confidence, **exit_rules.reduction_knobs(c), **per}

    def should_exit(self, depth: int, probe: ExitProbe, step: int, max_steps: int) -> bool:
        return self.check(depth, probe)

    def _schedule(self, depth: int, start: float, end: float, power: float) -> float:
        return exit_rules.fork_schedule(depth - 1, self.model.num_layers, start, end, power)

    def _max(self, depth: int, probe: ExitProbe) -> float:
        return probe.record(depth, exit_rules.max_prob(probe.distribution(depth)))

    def _cosine_similarity(self, depth: int, probe: ExitProbe) -> bool:
        h = probe.hidden
        return exit_rules.cosine(self.model.norm(h[depth]), h[depth - 1]) > self.config.cosine_threshold

    def _token_repeat(self, depth: int, probe: ExitProbe) -> bool:
        state = probe.state
        top = probe.top_token(depth)
        count = exit_rules.token_repeat_count(state.get("count", 0), state.get("previous"), top)
        state.update(count=count, previous=top)
        return count >= self.config.token_repeats

    def _convergence(self, depth: int, probe: ExitProbe) -> bool:
        return exit_rules.convergence_fires(self._max(depth, probe), self._max(depth - 1, probe),
                                       self.config.convergence_delta)

    def _max_probability(self, depth: int, probe: ExitProbe) -> bool:
        c = self.config
        return self._max(depth, probe) > self._schedule(depth, c.max_prob_start, c.max_prob_end, c.max_prob_scale)

    def _entropy_based(self, depth: int, probe: ExitProbe) -> bool:
        c = self.config
        if self.measure is None:
            ent = exit_rules.fork_entropy(probe.logits(depth)[0], c.entropy_temperature)
        else:
            ent = exit_rules.entropy(probe.distribution(depth))
        return ent < self._schedule(depth, c.entropy_start, c.entropy_end, exit_rules.ENTROPY_STEEPNESS)
