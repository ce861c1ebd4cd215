"""The oracle speedup: what a run's own measured acceptance would give under its measured cost curve, no overheads.

A speculative run is fast when few verification passes (each a bit wider than one position) replace many one-position
passes, and when its drafts are cheap. Given the run's counts and the cost curve of its model on its device
(run.json "cost_curve", harness.cost_curve.CostCurve.as_dict()), the best a perfect implementation could do is

    c_total(k), c_layers(k), c_head(k)   the curve's seconds for one pass over k new positions (all L layers + head,
                                         the L layers alone, final norm + lm_head alone); k is clamped to the
                                         curve's range and linearly interpolated between its points
    N = sum(new_tokens - prefills)       decoded tokens          V = sum(verify_passes)   full-depth passes
    D = sum(drafted)                     drafted tokens          F = sum(draft_passes)    drafter forwards
    w = 1 + D / V                        mean verify width (positions per verification pass)
    verify(w) = c_layers(w) * (L - S) / L + c_head(w)   S: the layer verification starts at (a drafter that keeps its
                                                        layer-E states: LayerSkip's exit, Kangaroo's adapter; else 0)
    draft     = c_layers(1) * d / L                     one drafter forward: d trunk-layer equivalents of weights, r of
                + c_head(1) * r / n_vocab               the vocabulary's rows (its reduced draft vocabulary, if any)
    oracle    = N * c_total(1) / (V * verify(w) + F * draft)

Each model drafter states its (d, r, S) in its own method file (self_speculative.DRAFTER_SHAPES: the early exit
runs E layers, plus its trained adapter's weights where one is attached at E; Kangaroo runs E layers plus its
attention adapter; EAGLE runs its one decoder layer plus its input projection, from the last layer's features,
so S = 0). A module's weights are counted in units of one trunk layer's, (parameters - n_vocab * hidden) / L, the cost
that scales with bytes streamed, as a memory-bound decode step does. Without a `drafter` knob (transformers'
assistant early exit) an exit_layer E means d = S = E, r = n_vocab. Plain autoregressive decoding (V = N, D = F = 0)
comes out at exactly 1. Hybrid speculation's lookup steps, which verify at full depth, are costed as its model
drafter's (cheaper when that drafter keeps layer-E states).
transformers' peers do not report how many tokens they drafted: their accepted tokens stand in for D there
(accepted <= drafted: the width and the verify cost are underestimated, which can only raise the oracle).
A large gap between the oracle and the observed speedup is implementation overhead; a low oracle means the drafts
are too poor (or verification too dear on this device) for any implementation to win.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from .logs import decoded_tokens


def curve_cost(curve: dict, part: str, k: float) -> float:
    """Seconds of `part` ("layers", "head" or "total") for a pass over k new positions: linear interpolation between
    the curve's points, clamped to its range of k."""
    points = sorted(curve["points"], key=lambda p: p["k"])
    return float(np.interp(k, [p["k"] for p in points], [p[part] for p in points]))


@dataclass
class Counts:
    """A run's decode work, summed over its records."""

    decoded: int  # N: decoded tokens, sum of new_tokens less one per prefill
    verify_passes: int  # V: full-depth passes
    drafted: int  # D: drafted tokens (transformers' peers: their accepted tokens, a lower bound)
    draft_passes: int  # F: drafter forwards


def counts(records: Sequence[dict]) -> Optional[Counts]:
    """Counts over the records (examples.jsonl dicts) that report verify_passes; None when none does."""
    rows = [r for r in records if r.get("verify_passes") is not None]
    if not rows:
        return None
    # transformers' peers log drafted = None but count accepted drafts: accepted stands in (see the module doc)
    drafted = lambda r: r.get("drafted") if r.get("drafted") is not None else (r.get("accepted") or 0)  # noqa: E731
    return Counts(decoded=sum(decoded_tokens(r) for r in rows),
                  verify_passes=sum(int(r["verify_passes"]) for r in rows),
                  drafted=sum(int(drafted(r)) for r in rows),
                  draft_passes=sum(int(r.get("draft_passes") or 0) for r in rows))


@dataclass(frozen=True)
class DraftShape:
    """What one drafter forward streams, in the oracle's units."""

    layers: float  # d: trunk layers it runs plus its own module's weights, in trunk-layer equivalents
    head_rows: int  # r: vocabulary rows its readout multiplies
    verify_from: int  # S: the layer verification starts at (E when the drafts' layer-E states are reused, else 0)


def layer_weights(model: dict) -> Optional[float]:
    """One trunk layer's parameters, from run.json's model record: (parameters - vocab * hidden) / layers (a tied
    head counted once; an untied one's second copy adds under 1/L of a layer's worth to each)."""
    try:
        per = (int(model["parameters"]) - int(model["vocab_size"]) * int(model["hidden_size"])) / int(model["num_layers"])
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None
    return per if per > 0 else None


def draft_shape(info: dict) -> Optional[DraftShape]:
    """The shape of one of the run's drafter forwards: the method's `drafter` (its file's DRAFTER_SHAPES entry), else
    an exit_layer knob's early exit, else None (no model drafter)."""
    knobs, model = info.get("knobs") or {}, info.get("model") or {}
    name, E = knobs.get("drafter"), knobs.get("exit_layer")
    if name:
        from .generators import load_all
        from .generators.self_speculative import DRAFTER_SHAPES

        load_all()  # the trained drafters register their shapes from their method files
        shape = DRAFTER_SHAPES.get(name)
        return shape(model, knobs) if shape is not None else None
    if E is not None:  # head_rows 0 (a record without vocab_size): the full head, as oracle_speedup reads it
        return DraftShape(layers=float(E), head_rows=int(model.get("vocab_size") or 0), verify_from=int(E))
    return None


def oracle_speedup(curve: dict, c: Counts, num_layers: int, shape: Optional[DraftShape],
                   vocab: Optional[int] = None) -> Optional[float]:
    """The speedup of the module doc's formula, or None when it is undefined (no verification pass, no curve
    points, a zero cost). `vocab` (n_vocab) scales a draft readout of shape.head_rows rows; None = the full head."""
    if not curve or not curve.get("points") or c.verify_passes <= 0 or num_layers <= 0:
        return None
    L = num_layers
    w = 1.0 + c.drafted / c.verify_passes
    if shape is not None and c.draft_passes > 0:
        S = min(max(int(shape.verify_from), 0), L)
        verify = curve_cost(curve, "layers", w) * (L - S) / L + curve_cost(curve, "head", w)
        rows = min(shape.head_rows / vocab, 1.0) if vocab and shape.head_rows > 0 else 1.0
        draft = curve_cost(curve, "layers", 1) * shape.layers / L + curve_cost(curve, "head", 1) * rows
    else:
        verify, draft = curve_cost(curve, "total", w), 0.0
    cost = c.verify_passes * verify + c.draft_passes * draft
    return c.decoded * curve_cost(curve, "total", 1) / cost if cost > 0 else None


def run_oracle(info: dict, records: Sequence[dict]) -> Optional[float]:
    """oracle_speedup of one run (run.json dict, its example records): None without a cost curve, without the
    model's layer count, or when no record reports verify_passes."""
    curve, c = info.get("cost_curve"), counts(records)
    model = info.get("model") or {}
    num_layers = model.get("num_layers")
    if not curve or c is None or not num_layers:
        return None
    return oracle_speedup(curve, c, int(num_layers), draft_shape(info), model.get("vocab_size"))
