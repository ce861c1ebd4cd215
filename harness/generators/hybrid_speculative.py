"""Hybrid speculation: prompt-lookup drafts when the last n-gram recurs in the prompt or the text so far, early-exit
drafts otherwise, every draft verified by the full model in one pass (lossless). The scorer and verifier
are self-speculation's (self_speculative.py); this method asks the lookup proposer before the early exit's."""
from __future__ import annotations

from dataclasses import dataclass

from .base import register
from .proposers import LookupOptions
from .self_speculative import SelfSpeculative, SelfSpeculativeOptions


@dataclass
class HybridOptions(LookupOptions, SelfSpeculativeOptions):
    """self-speculation's drafting knobs and prompt lookup's"""


@register("hybrid_speculative")
class HybridSpeculative(SelfSpeculative):
    """Prompt-lookup drafts when the last n-gram recurs, else early-exit drafts; full-model verification (lossless)."""

    drafters = ("lookup", "exit")  # "exit": the model drafter (--drafter: the early exit, or a trained one)
    short = "hybrid"
    options = HybridOptions
    sweep_knobs = ()  # the sweep heatmap is self-speculation's (LayerSkip's view)
    in_all, all_note = 6, "with trained exits"

    @classmethod
    def all_specs(cls, base, exits) -> list[dict]:
        """In `all` only with trained exits attached (its early-exit drafts need them to be worth running)."""
        return [{}] if exits is not None else []
