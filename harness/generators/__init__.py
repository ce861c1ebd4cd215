"""Decoding methods. Each module registers itself with ``@register(name)`` when imported."""
from __future__ import annotations

import importlib
import pkgutil

from .base import (GENERATORS, GenerationResult, Generator, StopCondition, baseline_name, build_generator,
                   register)

_LOADED = False


def load_all() -> dict:
    """Import every module of this package once (each registers its methods): a new method is a new file."""
    global _LOADED
    if not _LOADED:
        for info in pkgutil.iter_modules(__path__):
            importlib.import_module(f"{__name__}.{info.name}")
        _LOADED = True
    return GENERATORS


__all__ = ["GENERATORS", "GenerationResult", "Generator", "StopCondition", "baseline_name", "build_generator", "register",
           "load_all"]
