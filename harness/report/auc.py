"""FREE's headline metric: the area under each method's speed-quality curve (speed_quality_auc.csv), one curve per
sweep of one method (`sweeps`) or per single configuration."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd

from .labels import knobs_without, shown_knobs
from .pairing import is_baseline_row
from .table import primary_quality


def _family(row) -> str:
    """Which method a row belongs to: static exit, or the method's strategy ("" for the full-depth baseline)."""
    from ..generators import baseline_name

    if row["strategy"] == baseline_name():
        return "static exit" if json.loads(row["knobs"] or "{}").get("exit_layer") is not None else ""
    return row["strategy"]


def sweeps(rows: pd.DataFrame) -> list[tuple[str, str, pd.DataFrame]]:
    """One method's sweeps among rows of one family and `exits` status: [(swept knob, fixed knobs JSON, rows)].
    A sweep is a set of rows that differ only in one numeric knob (at least two values of it); a row in no sweep
    is a curve of its own (swept knob ""). A row of a two-knob grid belongs to one sweep per knob."""
    knobs = [json.loads(k or "{}") for k in rows["knobs"]]
    keys = sorted({k for kn in knobs for k in shown_knobs(kn)})
    out, covered = [], set()
    for key in keys:
        groups: dict = {}
        for pos, kn in enumerate(knobs):
            groups.setdefault(knobs_without(kn, key), []).append(pos)
        for fixed, members in sorted(groups.items()):
            values = [shown_knobs(knobs[p]).get(key) for p in members]
            numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
            if numeric and len(set(values)) >= 2:  # a categorical knob (confidence, criteria) is another method
                out.append((key, fixed, rows.iloc[members]))
                covered.update(members)
    for pos in range(len(rows)):
        if pos not in covered:
            out.append(("", knobs_without(knobs[pos]), rows.iloc[[pos]]))
    return out


def speed_quality_auc(df: pd.DataFrame) -> pd.DataFrame:
    """FREE's headline metric: the area under each method's speed-quality curve, one curve per sweep of ONE
    method (rows of one strategy and `exits` status that differ only in the swept knob), or per single
    configuration; different configurations of a strategy are never pooled into one curve.

    Per (model, dataset), a curve's points (decode speedup, main quality metric) plus the full model's (1, q0)
    form a curve; quality at speedup x is the best quality the curve reaches at a speedup >= x (its Pareto
    envelope; 0 beyond its fastest point). The area is taken over the SAME range [1, X] for every curve of the
    table, X = the largest speedup any of them reaches, and divided by q0 * (X - 1): 1.0 = the full model's quality
    at every speedup up to X, so static exit, the method and the full model are on one scale. Degenerate rows
    (and tables whose baseline is degenerate) are left out: their speedup times output that is not there."""
    rows = []
    for (model, dataset), g in df.groupby(["model", "dataset"], sort=False):
        q = primary_quality(g)
        flagged = g["degenerate"].astype(bool) if "degenerate" in g else pd.Series(False, index=g.index)
        base = g[g.apply(is_baseline_row, axis=1)]
        if q is None or base.empty or flagged[base.index].any():
            continue
        q0 = float(base[q].iloc[0])
        pts = g[~g["control"].astype(bool) & ~flagged & g["decode_speedup"].notna() & g[q].notna()].copy()
        pts["family"] = pts.apply(_family, axis=1)
        pts = pts[pts["family"] != ""]
        if pts.empty or q0 <= 0:
            continue
        X = max(float(pts["decode_speedup"].max()), 1.0)
        if X <= 1.0:
            continue
        grid = np.linspace(1.0, X, 401)
        exits = pts["exits"] if "exits" in pts else pd.Series("", index=pts.index)
        for (fam, ex), f in pts.groupby([pts["family"], exits], sort=True):
            for key, fixed, curve in sweeps(f):
                s, v = np.r_[1.0, curve["decode_speedup"].to_numpy(float)], np.r_[q0, curve[q].to_numpy(float)]
                env = np.array([v[s >= x].max() if (s >= x).any() else 0.0 for x in grid])
                area = float(np.trapezoid(env, grid)) if hasattr(np, "trapezoid") else float(np.trapz(env, grid))
                name = (f"{fam} over {key}" if key else
                        (curve["label"].iloc[0] if "label" in curve else fam)) + (" (tr)" if ex == "trained" else "")
                rows.append({"model": model, "dataset": dataset, "method": name, "strategy": curve["strategy"].iloc[0],
                             "exits": ex, "swept_knob": key, "fixed_knobs": fixed, "points": len(curve),
                             "metric": q, "speedup_range": X, "auc": area / (q0 * (X - 1.0))})
    return pd.DataFrame(rows)
