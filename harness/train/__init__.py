"""Early-exit training recipes: `python -m harness.train --recipe NAME ...` (see --help for the list).

A recipe is one module that registers itself with ``@recipe("name", Options)``: `Options` is a dataclass of its
own flags (added to the CLI in a group of their own), and the function takes (TrainConfig, Options, model) and
returns the exit artifact it wrote. Recipes never edit this file's loop or the CLI.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import time
from dataclasses import dataclass
from typing import Callable, Optional

from ..config import UsageError, add_dataclass_args, check_values
from .common import TrainConfig, seed_everything

RECIPE_MODULES = ("exit_adapters", "layerskip", "calm", "free", "consistentee", "calibrate", "kangaroo", "eagle",
                  "drafter_refit")

# Where each number of the training CLI may lie, as harness.config.check_values reads them: (field, lowest, highest,
# lowest included). TrainConfig checks its own on construction; a recipe's options are checked by the CLI, where a
# number without an entry here must be finite and >= 0.
TRAIN_RANGES = (("steps", 1, None, True), ("schedule_steps", 1, None, True), ("lr", 0.0, None, False),
                ("seq_len", 2, None, True), ("batch_size", 1, None, True), ("max_docs", 1, None, True),
                ("holdout_docs", 0, None, True), ("eval_sequences", 1, None, True), ("log_every", 1, None, True),
                ("save_every", 1, None, True))
OPTION_RANGES = (("adapters_width", 1, None, True), ("adapters_cache_sequences", 1, None, True),
                 ("adapters_tokens_per_step", 1, None, True), ("layerskip_loss_every", 1, None, True),
                 ("calm_adapter_width", 1, None, True), ("calm_classifier_lr", 0.0, None, False),
                 ("free_shallow_exit_layer", 1, None, True), ("free_adapter_width", 1, None, True),
                 ("free_kd_temperature", 0.0, None, False), ("consistentee_hidden", 1, None, True),
                 ("consistentee_samples", 1, None, True), ("drafter_tokens", 1, None, True),
                 ("drafter_fit_tokens", 2, None, True), ("drafter_fit_chain", 1, None, True),
                 ("kangaroo_exit_layer", 1, None, True))


def check_options(opts) -> None:
    """A recipe's numeric options: OPTION_RANGES where listed, else finite and >= 0 (no count, width or weight of
    any recipe is meaningful below 0)."""
    listed = {r[0] for r in OPTION_RANGES}
    rest = tuple((f.name, 0, None, True) for f in dataclasses.fields(opts) if f.name not in listed
                 and not isinstance(getattr(opts, f.name), bool) and isinstance(getattr(opts, f.name), (int, float)))
    check_values(opts, OPTION_RANGES + rest)


@dataclass
class Recipe:
    """A registered training recipe."""

    name: str
    run: Callable  # (TrainConfig, options, LayeredModel) -> ExitArtifact
    options: Optional[type]  # dataclass of the recipe's own flags
    summary: str  # first line of the function's docstring (shown in --help)
    gpu: Optional[str] = None  # why a useful run needs a GPU (None: CPU is practical)


RECIPES: dict[str, Recipe] = {}


def recipe(name: str, options: Optional[type] = None, gpu: Optional[str] = None):
    """Function decorator: make a recipe selectable as --recipe NAME."""

    def wrap(fn):
        RECIPES[name] = Recipe(name, fn, options, (fn.__doc__ or "").strip().splitlines()[0], gpu)
        return fn

    return wrap


def load_all() -> dict[str, Recipe]:
    for mod in RECIPE_MODULES:
        try:
            importlib.import_module(f"{__name__}.{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{mod}":
                raise
    return RECIPES


def make_parser() -> argparse.ArgumentParser:
    from ..cli import Parser

    recipes = load_all()
    lines = ["recipes (--recipe):"]
    for r in recipes.values():
        lines.append(f"  {r.name:14s} {r.summary}" + (f" [GPU: {r.gpu}]" if r.gpu else ""))
    p = Parser(prog="python -m harness.train", description="Train early exits and calibrate exit thresholds.",
               epilog="\n".join(lines), formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_args(p, TrainConfig, "training (every recipe)")
    seen = {f.name for f in dataclasses.fields(TrainConfig)}
    for r in recipes.values():
        if r.options is not None:
            skip = tuple(f.name for f in dataclasses.fields(r.options) if f.name in seen)
            add_dataclass_args(p, r.options, f"--recipe {r.name}", skip=skip)
            seen |= {f.name for f in dataclasses.fields(r.options)}
    return p


def split_args(ns: argparse.Namespace, r: Recipe) -> tuple[TrainConfig, object]:
    values = vars(ns)
    cfg = TrainConfig(**{f.name: values[f.name] for f in dataclasses.fields(TrainConfig)})
    opts = r.options(**{f.name: values[f.name] for f in dataclasses.fields(r.options)}) if r.options else None
    if opts is not None:
        check_options(opts)
    return cfg, opts


def main(argv: Optional[list[str]] = None) -> int:
    from ..model import load_model

    ns = make_parser().parse_args(argv)
    if ns.recipe not in RECIPES:
        raise UsageError(f"unknown --recipe {ns.recipe!r}; choose one of: {', '.join(RECIPES)}")
    r = RECIPES[ns.recipe]
    cfg, opts = split_args(ns, r)
    seed_everything(cfg.seed)
    dtype = "float32" if cfg.dtype == "auto" else cfg.dtype  # fp32 master weights; CUDA adds bf16 autocast
    model = load_model(cfg.model, cfg.device, dtype, exits=cfg.exits)
    t0 = time.perf_counter()
    artifact = r.run(cfg, opts, model)
    _, out = cfg.paths()
    print(f"{cfg.recipe}: wrote {out} in {time.perf_counter() - t0:.0f} s")
    return 0 if artifact is not None else 1
