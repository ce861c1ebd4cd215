"""What a run's row is called: facts its method's generator class states (short label, family, lossless...), the
`exits` column, and the full and short labels, unique per configuration (`*` = knob from the exit artifact,
`(tr)` = read trained exits)."""
from __future__ import annotations

import json
import zlib
from typing import Optional

from .runs import field

ARTIFACT_MARK = "*"  # marks a knob taken from the exit artifact (run.json knobs.trained_defaults)


def method_fact(strategy: str, fact: str, default=None):
    """A fact a registered generator class states about itself (short label, plot family, lossless...)."""
    from ..generators import load_all

    value = getattr(load_all().get(strategy), fact, None)
    return default if value in (None, "") else value


def _full_depth(info: dict) -> bool:
    from ..generators import baseline_name

    return info["strategy"] == baseline_name() and info["knobs"].get("exit_layer") is None


def reads_exits(info: dict) -> bool:
    """Whether the method decodes through early exits (the registry's `reads_exits`; full depth reads none). A
    strategy the registry no longer holds (an old log) reads them unless it is one of transformers' peers (hf_*)."""
    from ..generators import load_all

    strategy = info["strategy"]
    reads = method_fact(strategy, "reads_exits", True) if strategy in load_all() else not strategy.startswith("hf_")
    return bool(reads) and not _full_depth(info)


def uses_trained_exits(info: dict) -> bool:
    """Whether a run's method went through trained exits: an artifact was attached and the method reads them."""
    return bool(field(info, "model", "exits") or info["knobs"].get("trained_defaults")) and reads_exits(info)


def exits_status(info: dict) -> str:
    """The `exits` column: trained / untrained, or not read (the artifact attached or not)."""
    if reads_exits(info):
        return "trained" if uses_trained_exits(info) else "untrained"
    return "not read (attached)" if field(info, "model", "exits") else "not read"


def _artifact_knobs(knobs: dict) -> dict:
    return knobs.get("trained_defaults") or {}


def shown_knobs(knobs: dict) -> dict:
    """Knobs that change behaviour (None / "none" = off), plus every knob taken from the artifact."""
    art = _artifact_knobs(knobs)
    return {k: v for k, v in sorted(knobs.items())
            if k != "trained_defaults" and (k in art or (v is not None and v != "none"))}


def knobs_without(knobs: dict, *keys: str) -> str:
    """The shown knobs but `keys`, as JSON: what rows of one sweep over `keys` share."""
    return json.dumps({k: v for k, v in shown_knobs(knobs).items() if k not in keys}, sort_keys=True, default=str)


def method_label(info: dict) -> str:
    """Strategy + every knob (`*` = taken from the exit artifact), marked `[trained exits]` when it used them."""
    knobs = info["knobs"]
    art = _artifact_knobs(knobs)
    shown = " ".join(f"{k}={v}" + (ARTIFACT_MARK if k in art else "") for k, v in shown_knobs(knobs).items())
    trained = " [trained exits]" if uses_trained_exits(info) else ""
    return info["strategy"] + (" " + shown if shown else "") + trained


SHORT_KNOB = {"exit_layer": "E", "num_speculations": "k", "threshold": "t", "shallow_exit_layer": "S",
              "min_exit_layer": "min", "draft_threshold": "dt", "draft_vocab": "dv", "policy_threshold": "pt",
              "max_prob_start": "start", "max_prob_end": "end", "max_prob_scale": "scale"}


def _short_value(v) -> str:
    return format(v, ".3g") if isinstance(v, float) else str(v)


def short_label(strategy: str, knobs: dict) -> str:
    """Method + its key knobs, short enough to sit beside a point; knobs from the artifact get a `*`."""
    k = knobs or {}
    art = _artifact_knobs(k)
    parts: list[tuple[Optional[str], str]] = []
    if k.get("exit_layer") is not None:
        parts.append(("exit_layer", f"E{k['exit_layer']}"))
    shows = method_fact(strategy, "label_knobs", ())
    if "num_speculations" in shows and k.get("num_speculations"):
        parts.append(("num_speculations", f"k{k['num_speculations']}"))
    if k.get("criteria"):
        parts.append(("criteria", {"cosine_similarity": "cos", "token_repeat": "repeat", "entropy_based": "entropy",
                                   "max_probability": "maxprob", "convergence": "conv"}.get(k["criteria"],
                                                                                            k["criteria"])))
    if "threshold" in shows and k.get("threshold") is not None:
        parts.append(("threshold", f"t{_short_value(k['threshold'])}"))
    if k.get("shallow_exit_layer") is not None:
        parts.append(("shallow_exit_layer", f"S{k['shallow_exit_layer']}"))
    if k.get("confidence") not in (None, "softmax"):
        parts.append(("confidence", k["confidence"]))
    if k.get("vocab_reduction") not in (None, "none"):
        parts.append(("vocab_reduction", f"vocab-{k['vocab_reduction']}"))
    shown = {key for key, _ in parts}
    parts += [(key, SHORT_KNOB.get(key, f"{key}=") + _short_value(k[key])) for key in shows  # a new method's own
              if key not in shown and k.get(key) is not None]
    shown = {key for key, _ in parts}
    parts += [(key, SHORT_KNOB.get(key, f"{key}=") + _short_value(v)) for key, v in sorted(art.items())
              if key not in shown]
    text = [t + (ARTIFACT_MARK if key in art else "") for key, t in parts]
    return " ".join([method_fact(strategy, "short", strategy), *text])


def _identity(info: dict) -> str:
    """What makes two rows the same configuration: strategy, knobs (and their provenance), control."""
    knobs = info["knobs"]
    return json.dumps([info["strategy"], shown_knobs(knobs), sorted(_artifact_knobs(knobs)),
                       bool(info.get("control"))], sort_keys=True, default=str)


def assign_labels(runs: list[dict]) -> dict:
    """id(run) -> (full label, short label), such that no label is shared by two configurations that differ in
    knobs (per model and `exits` column): a short label shared by two configurations falls back to the full
    one, and a full one shared (knob values that print alike) gets a hash of the knobs."""
    ctl = lambda i: " (A/A control)" if i.get("control") else ""  # noqa: E731
    labels = {id(r): [method_label(r["run"]) + ctl(r["run"]),
                      short_label(r["run"]["strategy"], r["run"]["knobs"]) + ctl(r["run"])] for r in runs}
    for pos in (1, 0):
        groups: dict = {}
        for r in runs:
            key = (r["run"]["model"]["name"], exits_status(r["run"]), labels[id(r)][pos])
            groups.setdefault(key, set()).add(_identity(r["run"]))
        for r in runs:
            key = (r["run"]["model"]["name"], exits_status(r["run"]), labels[id(r)][pos])
            if len(groups[key]) > 1:
                if pos == 1:
                    labels[id(r)][1] = labels[id(r)][0]
                else:
                    tag = " #" + format(zlib.crc32(_identity(r["run"]).encode()), "08x")[:6]
                    labels[id(r)] = [labels[id(r)][0] + tag, labels[id(r)][0] + tag]
    return {k: tuple(v) for k, v in labels.items()}


def tagged(r) -> str:
    """A row's short label with `(tr)` when it read trained exits (how plots and prose name it)."""
    return r["label"] + (" (tr)" if r.get("exits") == "trained" else "")
