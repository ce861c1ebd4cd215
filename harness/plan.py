"""What one invocation runs: --strategies / --sweep text turned into the list of configurations, baseline first."""
from __future__ import annotations

import dataclasses

from typing import Optional

from .config import GenerationConfig, UsageError, for_strategy, parse_value


def parse_spec(spec: str) -> tuple[str, dict]:
    """'self_speculative:exit_layer=8:num_speculations=6' -> (strategy, typed overrides)."""
    name, *parts = spec.strip().split(":")
    overrides = {}
    for part in parts:
        if "=" not in part:
            raise UsageError(f"strategy spec {spec!r}: expected knob=value after ':', got {part!r}")
        k, v = part.split("=", 1)
        overrides[k] = parse_value(k, v)
    return name, overrides


def _in_all() -> list[tuple[str, type]]:
    """(name, class) of every method that places itself in `--strategies all`, in its place."""
    from .generators import load_all

    return sorted(((n, c) for n, c in load_all().items() if c.in_all is not None), key=lambda nc: nc[1].in_all)


def all_members() -> str:
    """What `--strategies all` runs, in order, from the registry (for --help)."""
    return ", ".join(f"{n} ({c.all_note})" if c.all_note else n for n, c in _in_all())


def expand_strategies(text: str, base: GenerationConfig, num_layers: int, exits=None) -> list[GenerationConfig]:
    """--strategies a,b:k=v,... or all -> configs, the full-depth autoregressive baseline first.

    `exits`: the attached exit artifact, if any: `all` then adds the methods that need trained exits
    (hybrid_speculative; policy when it holds ConsistentEE policies), and self-speculation without an explicit
    --exit_layer takes the artifact's recommended one instead of L/4.
    """
    from .generators import baseline_name, load_all

    specs: list[tuple[str, dict]] = []
    for item in text.split(","):
        if item.strip() == "all":  # every method that places itself in `all`, with the configurations it asks for
            specs += [(n, over) for n, c in _in_all() for over in c.all_specs(base, exits)]
        elif item.strip():
            specs.append(parse_spec(item))
    known, baseline = load_all(), baseline_name()
    configs = [for_strategy(base, baseline)]
    for name, over in specs:
        if name not in known:
            raise UsageError(f"unknown strategy {name!r} in --strategies; choose from: {', '.join(sorted(known))}")
        if name == baseline and not over:
            continue  # the baseline is already first
        over = {**known[name].spec_defaults(base, over, num_layers, exits), **over}
        configs.append(for_strategy(base, name, **over))
    unreached(base, configs, text)
    return configs


def unreached(base: GenerationConfig, configs: list[GenerationConfig], text: str) -> None:
    """A knob the user typed for the whole invocation (not generic) must reach at least one configuration with
    the value typed: `--strategies eagle --exit_layer 3` would otherwise run as if the flag were not there."""
    from .config import GENERIC_KNOBS

    for name in sorted(set(base.explicit) - set(GENERIC_KNOBS) - {"generation_strategy", "explicit"}):
        if not any(name in c.explicit and getattr(c, name) == getattr(base, name) for c in configs):
            takes = [f.metadata.get("methods") for f in dataclasses.fields(base) if f.name == name]
            who = (f" (it applies to {', '.join(takes[0])})" if takes and takes[0] else
                   " (it is the draft depth of self-speculative methods, or autoregressive:exit_layer=E for a "
                   "static exit)" if name == "exit_layer" else "")
            raise UsageError(f"--{name} reaches none of --strategies {text}{who}: drop it or name a method that "
                             "takes it")


def expand_sweep(items: list[str], base: GenerationConfig) -> list[GenerationConfig]:
    """--sweep exit_layer=4,6,8 num_speculations=2,4 -> the grid for --generation_strategy, baseline first."""
    import itertools

    axes = []
    for item in items:
        if "=" not in item:
            raise UsageError(f"--sweep expects knob=v1,v2,..., got {item!r}")
        k, vals = item.split("=", 1)
        if not vals.strip() or any(not v.strip() for v in vals.split(",")):
            raise UsageError(f"--sweep {item!r}: every value must be non-empty, e.g. {k}=0.8,0.9")
        axes.append([(k, parse_value(k, v.strip())) for v in vals.split(",")])
    from .generators import baseline_name

    strategy = base.generation_strategy
    configs = [for_strategy(base, baseline_name())]
    for combo in itertools.product(*axes):
        configs.append(for_strategy(base, strategy, **dict(combo)))
    return configs


def configurations(base: GenerationConfig, strategies: Optional[str], sweep: Optional[list[str]], num_layers: int,
                   exits=None) -> list[GenerationConfig]:
    """What one invocation runs, baseline first: --strategies, else --sweep, else --generation_strategy beside the
    baseline (the baseline alone when that is what was asked)."""
    if strategies:
        return expand_strategies(strategies, base, num_layers, exits)
    if sweep:
        return expand_sweep(sweep, base)
    from .generators import baseline_name

    configs = [for_strategy(base, baseline_name())]
    if base.generation_strategy != baseline_name() or base.exit_layer is not None:
        configs.append(base)
    return configs
