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
    verify(w) = c_layers(w) * (L - E) / L + c_head(w)   early-exit drafts at depth E (exit_layer set and F > 0):
                                                        the scorer runs only layers E..L-1 over the drafted positions
              = c_total(w)                              otherwise (lookup drafts, transformers' peers without E)
    draft     = c_layers(1) * E / L + c_head(1)         one early-exit draft forward (0 without an exit layer)
    oracle    = N * c_total(1) / (V * verify(w) + F * draft)

Plain autoregressive decoding (V = N, D = F = 0) comes out at exactly 1. Layer cost is taken as proportional to the
number of layers run, and a draft's head as the full lm_head (a reduced draft vocabulary or trained exit adapters are
not modelled); hybrid speculation's lookup steps, which verify at full depth, are costed as early-exit ones (cheaper).
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


def oracle_speedup(curve: dict, c: Counts, num_layers: int, exit_layer: Optional[int]) -> Optional[float]:
    """The speedup of the module doc's formula, or None when it is undefined (no verification pass, no curve
    points, a zero cost)."""
    if not curve or not curve.get("points") or c.verify_passes <= 0 or num_layers <= 0:
        return None
    L = num_layers
    early = exit_layer is not None and 0 < exit_layer < L and c.draft_passes > 0
    w = 1.0 + c.drafted / c.verify_passes
    if early:
        verify = curve_cost(curve, "layers", w) * (L - exit_layer) / L + curve_cost(curve, "head", w)
        draft = curve_cost(curve, "layers", 1) * exit_layer / L + curve_cost(curve, "head", 1)
    else:
        verify, draft = curve_cost(curve, "total", w), 0.0
    cost = c.verify_passes * verify + c.draft_passes * draft
    return c.decoded * curve_cost(curve, "total", 1) / cost if cost > 0 else None


def run_oracle(info: dict, records: Sequence[dict]) -> Optional[float]:
    """oracle_speedup of one run (run.json dict, its example records): None without a cost curve, without the
    model's layer count, or when no record reports verify_passes."""
    curve, c = info.get("cost_curve"), counts(records)
    num_layers = (info.get("model") or {}).get("num_layers")
    if not curve or c is None or not num_layers:
        return None
    return oracle_speedup(curve, c, int(num_layers), (info.get("knobs") or {}).get("exit_layer"))
