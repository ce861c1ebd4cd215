"""Turning logits into tokens: greedy, or sampling with transformers' own logits warpers."""
from __future__ import annotations

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from typing import TYPE_CHECKING

from .config import UsageError

if TYPE_CHECKING:  # assembled from the generators, which import this module
    from .config import GenerationConfig


class Sampler:
    """Greedy argmax, or temperature / top-k / top-p sampling from a seeded torch.Generator."""

    def __init__(self, config: GenerationConfig, device: torch.device):
        self.greedy = not config.sample
        if config.sample and config.temperature <= 0:
            raise UsageError(f"--temperature must be > 0 when sampling, got {config.temperature}")
        if not 0 < config.top_p <= 1:
            raise UsageError(f"--top_p must be in (0, 1], got {config.top_p}")
        if config.top_k < 0:
            raise UsageError(f"--top_k must be >= 0, got {config.top_k}")
        warpers = [TemperatureLogitsWarper(config.temperature)] if config.temperature != 1.0 else []
        if config.top_k > 0:
            warpers.append(TopKLogitsWarper(config.top_k))
        if config.top_p < 1.0:
            warpers.append(TopPLogitsWarper(config.top_p))
        self.warpers = LogitsProcessorList(warpers)
        self.rng = torch.Generator(device=device)
        self.rng.manual_seed(config.seed)

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The sampling distribution for a (..., V) logits tensor (rows are positions)."""
        flat = logits.reshape(-1, logits.shape[-1]).float()
        return torch.softmax(self.warpers(None, flat), dim=-1).reshape(logits.shape)

    def pick(self, logits: torch.Tensor) -> int:
        """One token from the logits of one position (shape (..., V))."""
        last = logits.reshape(-1, logits.shape[-1])[-1]
        if self.greedy:
            return int(last.argmax())
        return int(torch.multinomial(self.probs(last), 1, generator=self.rng))
