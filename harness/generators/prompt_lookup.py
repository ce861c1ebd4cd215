"""Prompt lookup decoding (Saxena 2023; transformers' `prompt_lookup_num_tokens`) on the harness's core: drafts
are n-grams copied from the prompt and the text so far, verified in one full pass; without a match, one plain
step. The peer row `hf_prompt_lookup` is transformers' own implementation of the same method."""
from __future__ import annotations

from ..config import UsageError
from .base import register
from .proposers import LookupOptions
from .self_speculative import SelfSpeculative


@register("prompt_lookup")
class PromptLookup(SelfSpeculative):
    """Prompt lookup decoding (Saxena 2023, transformers' prompt_lookup_num_tokens) on the harness's core: n-gram
    drafts from the prompt and the text so far, verified in one full pass; without a match, one plain step."""

    drafters = ("lookup",)  # without a match, one plain step
    reads_exits = draft_depth = False  # full-depth passes only
    short = "lookup"
    options = LookupOptions
    sweep_knobs = ()  # the sweep heatmap is self-speculation's (LayerSkip's view)
    in_all = 5
    label_knobs = ()  # its draft length is lookup_tokens, shown with the other lookup knobs

    def artifact_key(self) -> str:
        return self.name  # no early exit: the artifact's self-speculative recommendation is not its own

    def validate(self) -> None:
        c = self.config
        if c.exit_layer is not None:
            raise UsageError("--exit_layer does not apply to prompt_lookup (drafts come from the text)")
        super().validate()

    def knobs(self) -> dict:
        c = self.config
        return {"lookup_ngram": c.lookup_ngram, "lookup_tokens": c.lookup_tokens, "lookup_match": c.lookup_match}
