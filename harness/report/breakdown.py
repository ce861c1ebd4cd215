"""Where each method's decode time goes: per-component table (CSV, Markdown) and stacked-bar plot.

Built from the `breakdown` field of the run logs (benchmark.py --breakdown, the default): per example, the
synchronized seconds of each component of the first timed repeat, divided by that repeat's decoded tokens.
`other` is decode time no component covers (stop checks, bookkeeping, Python between sections);
`timer overhead` is the measured cost of the timed sections themselves (calls x the cost of one empty
section), part of the method's measured decode time. Medians over examples, with the IQR of each share.
A configuration whose output is degenerate (harness.report.table.output_flag: empty or whitespace-only predictions
on at least half its examples) carries its flag in the CSV's `flag` column, the Markdown and the plot.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from .guards import NEVER_ENGAGED
from .pairing import is_baseline_row
from .plots import pyplot, save

ORDER = ("lookup", "draft", "verify", "accept", "shallow", "deep", "parallel", "layers", "confidence", "head",
         "state_copy")  # components in reading order; any other name follows
COLUMNS = ["model", "dataset", "method", "short", "flag", "run_id", "component", "ms_per_token_median",
           "share_median", "share_q25", "share_q75", "calls_per_token_median", "n"]


def _is_flag(flag) -> bool:
    return isinstance(flag, str) and bool(flag)  # "" is read back from a CSV as NaN


def _rank(component: str) -> tuple:
    order = ORDER + ("other", "timer overhead")
    return (order.index(component) if component in order else len(ORDER) - 0.5, component)


def _rows(run: dict, method: str, short: str, flag: str = "") -> list[dict]:
    """One row per component of one run (medians over its examples)."""
    per: dict[str, dict[str, list]] = {}
    for e in run["examples"]:
        b, decoded = e.get("breakdown"), max(int(e.get("new_tokens") or 0) - 1, 0)
        if not b or decoded == 0 or not b.get("decode_seconds"):
            continue
        total = float(b["decode_seconds"])
        comps = dict(b["components"])
        calls = dict(b["calls"])
        comps["other"] = total - sum(comps.values())
        comps["timer overhead"] = float(b.get("overhead_seconds") or 0.0)
        calls["other"] = calls["timer overhead"] = math.nan
        for name, sec in comps.items():
            d = per.setdefault(name, {"ms": [], "share": [], "calls": []})
            d["ms"].append(1e3 * sec / decoded)
            d["share"].append(sec / total)
            d["calls"].append(calls.get(name, math.nan) / decoded)
    info = run["run"]
    rows = []
    for name in sorted(per, key=_rank):
        d = per[name]
        share = np.array(d["share"])
        calls = np.array(d["calls"], dtype=float)
        rows.append({"model": info["model"]["name"], "dataset": info["task"]["name"], "method": method,
                     "short": short, "flag": flag, "run_id": info["run_id"], "component": name,
                     "ms_per_token_median": float(np.median(d["ms"])),
                     "share_median": float(np.median(share)), "share_q25": float(np.percentile(share, 25)),
                     "share_q75": float(np.percentile(share, 75)),
                     "calls_per_token_median": float(np.median(calls)) if not np.isnan(calls).all() else math.nan,
                     "n": len(share)})
    return rows


def breakdown_table(runs: list[dict], label) -> pd.DataFrame:
    """Long table: one row per (run, component); `label(run)` -> (method as the main table names it, short label,
    degenerate flag or "")."""
    rows = [r for run in runs if not run["run"].get("control") for r in _rows(run, *label(run))]
    return pd.DataFrame(rows, columns=COLUMNS)


def markdown(bt: pd.DataFrame, baseline_ms: dict, never_engaged: frozenset = frozenset()) -> str:
    """One table per dataset: per method, ms/token of each component (share of decode time in brackets).

    `baseline_ms`: (model, dataset) -> the baseline's median decode ms/token, for scale; `never_engaged`: run ids
    of configurations that never engaged (harness.report.guards), marked after their label.
    """
    from ..generators import baseline_name

    if bt.empty:
        return ""
    out = ["### Where the decode time goes (per-component breakdown, synchronized timers)\n\n"
           "ms per decoded token, median over examples (median share of the method's decode time). `other`: time "
           "outside every timed component (stop checks, bookkeeping); `timer overhead`: measured cost of the timed "
           "sections themselves, included in the method's decode time."]
    for (model, dataset), g in bt.groupby(["model", "dataset"], sort=False):
        comps = sorted(set(g["component"]), key=_rank)
        table = []
        for _, m in g.groupby("run_id", sort=False):
            flag = m["flag"].iloc[0]
            # the short label ((tr) = trained exits, * = knob from the artifact); the full one is in the CSV
            never = f" ({NEVER_ENGAGED})" if m["run_id"].iloc[0] in never_engaged else ""
            row = {"method": m["short"].iloc[0] + never + (f" — {flag}" if _is_flag(flag) else "")}
            for _, r in m.iterrows():
                row[r["component"]] = f"{r['ms_per_token_median']:.2f} ({100 * r['share_median']:.0f}%)"
            table.append(row)
        t = pd.DataFrame(table, columns=["method", *comps]).fillna("-")
        base = baseline_ms.get((model, dataset))
        note = (f"\n\n{baseline_name().capitalize()} baseline: {base:.1f} ms/token."
                if base and not math.isnan(base) else "")
        out.append(f"#### {dataset} ({model})\n\n" + t.to_markdown(index=False) + note)
    return "\n\n".join(out)


def plot(bt: pd.DataFrame, out: Path, baseline_ms: dict) -> list[Path]:
    """Stacked horizontal bars per dataset: ms per decoded token by component, the baseline as a line."""
    from ..generators import baseline_name

    plt = pyplot()
    files = []
    for (model, dataset), g in bt.groupby(["model", "dataset"], sort=False):
        methods = list(dict.fromkeys(g["run_id"]))
        first = {m: g[g["run_id"] == m].iloc[0] for m in methods}
        shorts = [first[m]["short"] + (f" [{first[m]['flag']}]" if _is_flag(first[m]["flag"]) else "") for m in methods]
        comps = sorted(set(g["component"]), key=_rank)
        fig, ax = plt.subplots(figsize=(9, 1.6 + 0.4 * len(methods)))
        left = np.zeros(len(methods))
        cmap = plt.get_cmap("tab20")
        fixed = {"other": "0.8", "timer overhead": "k"}
        for i, c in enumerate(comps):
            vals = np.array([float(g[(g["run_id"] == m) & (g["component"] == c)]["ms_per_token_median"].sum())
                             for m in methods])
            vals = np.clip(vals, 0, None)  # a negative `other` (timer granularity) is drawn as nothing
            ax.barh(range(len(methods)), vals, left=left, color=fixed.get(c, cmap(i % 20)), label=c)
            left += vals
        base = baseline_ms.get((model, dataset))
        if base and not math.isnan(base):
            ax.axvline(base, color="k", ls="--", lw=1, label=f"{baseline_name()} baseline")
        ax.set_yticks(range(len(methods)), shorts, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("decode ms per token (median per component, stacked)")
        ax.set_title(f"where the decode time goes: {dataset} ({model})")
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
        fig.tight_layout()
        files.append(save(fig, out / f"time_breakdown_{dataset}.png"))
    return files


def baseline_ms(df: pd.DataFrame) -> dict:
    """(model, dataset) -> the baseline's median decode ms/token from the main report table."""
    return {(r["model"], r["dataset"]): float(r["decode_ms_per_token_median"]) for _, r in df.iterrows()
            if is_baseline_row(r)}


def write(runs: list[dict], df: pd.DataFrame, out: Path, label, plots: bool = True
          ) -> tuple[Optional[pd.DataFrame], list[Path]]:
    """time_breakdown.csv + per-dataset PNGs; returns the table (None without breakdowns) and the files."""
    bt = breakdown_table(runs, label)
    if bt.empty:
        return None, []
    path = out / "time_breakdown.csv"
    bt.to_csv(path, index=False)
    return bt, [path, *(plot(bt, out, baseline_ms(df)) if plots else [])]
