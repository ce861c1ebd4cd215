"""Decoding methods. Each module registers itself with ``@register(name)`` when imported."""
from __future__ import annotations

import importlib

from .base import GENERATORS, GenerationResult, Generator, StopCondition, build_generator, register

# Modules holding registered generators; a new method adds its module name here.
MODULES = ("autoregressive", "self_speculative", "calm", "free", "dynamic", "hf_peers", "policy")


def load_all() -> dict:
    for name in MODULES:
        importlib.import_module(f"{__name__}.{name}")
    return GENERATORS


__all__ = ["GENERATORS", "GenerationResult", "Generator", "StopCondition", "build_generator", "register", "load_all"]
