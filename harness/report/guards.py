"""Guards on what a configuration did, from its own counts: whether it ever engaged (a speculative method that never
drafted, an early-exit method that never left before the last layer times the method's overhead and nothing else),
and how often a draft survives at each position of a step (acceptance by draft position)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import pandas as pd

from .labels import method_fact, reads_exits
from .pairing import is_baseline
from .runs import field

NEVER_ENGAGED = "never engaged"
MAX_POSITIONS = 16  # accept_pos_1..accept_pos_K, K = the longest draft seen, at most this


def drafts(run: dict) -> bool:
    """Whether the method drafts: its records count drafts (drafted / step_drafts), or its class is of the
    speculative family (a log whose records carry no counts at all). transformers' peers count no drafts (their
    `drafted` is always null), so nothing can be said of theirs."""
    recs = run["examples"]
    if any(e.get("drafted") is not None or e.get("step_drafts") is not None for e in recs):
        return True
    return method_fact(run["run"]["strategy"], "family") == "speculative (lossless)"


def never_engaged(run: dict) -> bool:
    """A drafting configuration that drafted nothing over the whole run (drafted summed over the records is 0 or
    null, and no step drafted), or a configuration that reads exits and never exited before the last layer
    (every decoded token's exit layer is run.json model.num_layers; unknown without num_layers or decoded tokens).
    Never the baseline or the A/A control."""
    info = run["run"]
    if info.get("control") or is_baseline(info):
        return False
    recs = run["examples"]
    if drafts(run):
        return not sum(e.get("drafted") or 0 for e in recs) and \
            not sum(sum(e.get("step_drafts") or ()) for e in recs)
    layers = field(info, "model", "num_layers")
    decoded = [x for e in recs for x in (e.get("exit_layers") or [])[1:]]
    return bool(reads_exits(info) and layers and decoded and all(x == layers for x in decoded))


def against_verdict(run: dict) -> str:
    """What the exit artifact's recommender predicted when it said "don't speculate" for a configuration that ran
    anyway (run.json model.speculation_verdict; the method then runs its defaults without a recommendation, as
    asked), e.g.
    "best 1.02x [0.98-1.05]"; "" where it said speculate, or gave no verdict."""
    from ..speedup_model import predicted

    v = field(run["run"], "model", "speculation_verdict")
    if not isinstance(v, dict) or v.get("speculate") is not False or run["run"].get("control"):
        return ""
    return "best " + predicted(v.get("best") or {})


def acceptance_by_position(run: dict) -> Optional[list[float]]:
    """Per draft position i = 1..K (K the longest draft of the run): of the steps that drafted at least i tokens, the
    share whose accepted count (accept_length - 1) reached i. None without step_drafts and accept_lengths."""
    steps = [(d, a - 1) for e in run["examples"] if e.get("step_drafts") is not None
             and e.get("accept_lengths") is not None and len(e["step_drafts"]) == len(e["accept_lengths"])
             for d, a in zip(e["step_drafts"], e["accept_lengths"])]
    k = min(max((d for d, _ in steps), default=0), MAX_POSITIONS)
    if not k:
        return None
    out = []
    for i in range(1, k + 1):
        offered = [a for d, a in steps if d >= i]
        out.append(sum(a >= i for a in offered) / len(offered) if offered else math.nan)
    return out


def position_columns(rates: list[Optional[list[float]]]) -> dict:
    """accept_pos_1..accept_pos_K columns for rows of these rates (K = the longest list), {} when none has any."""
    k = max((len(r) for r in rates if r), default=0)
    return {f"accept_pos_{i}": [r[i - 1] if r and i <= len(r) else math.nan for r in rates] for i in range(1, k + 1)}


def plot_acceptance(df: pd.DataFrame, out: Path) -> list[Path]:
    """acceptance_by_position.png: one line per drafting configuration with per-position counts."""
    from .labels import tagged
    from .plots import pyplot, save

    cols = [c for c in df.columns if c.startswith("accept_pos_")]
    rows = df[df[cols].notna().any(axis=1)] if cols else df.iloc[:0]
    if rows.empty:
        return []
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    several = rows["dataset"].nunique() > 1 or rows["model"].nunique() > 1
    for _, r in rows.iterrows():
        ys = r[cols].to_numpy(dtype=float)
        name = tagged(r) + (f" ({NEVER_ENGAGED})" if r.get("never_engaged") else "")
        ax.plot(range(1, len(cols) + 1), ys, marker="o", ms=3, lw=1,
                label=(f"{r['dataset']}: " if several else "") + name)
    ax.set_xlabel("draft position i")
    ax.set_ylabel("P(accepted | drafted at i)")
    ax.set_ylim(0, 1.02)
    ax.set_xticks(range(1, len(cols) + 1))
    ax.set_title("acceptance by draft position (steps that drafted at least i tokens)", fontsize=10)
    ax.legend(fontsize=7, loc="best", framealpha=0.7)
    ax.grid(alpha=0.25)
    fig.tight_layout()
    return [save(fig, out / "acceptance_by_position.png")]
