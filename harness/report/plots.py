"""The report's plots (PNG): quality vs decode speedup with the Pareto front, per-token exit layers, and the sweep
heatmaps; `pyplot` and `save` are the matplotlib helpers every plot of the report (the time breakdown's too) uses."""
from __future__ import annotations

import json
import textwrap
import zlib
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from .labels import assign_labels, knobs_without, method_fact, tagged
from .table import output_flag, primary_quality


def pyplot():
    """matplotlib.pyplot, drawing to files only (imported when the first plot is drawn)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: Path, dpi: int = 100) -> Path:
    """Write the figure to path as a PNG and close it."""
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points not dominated (higher speed and higher quality are better)."""
    keep = []
    for i, (x, y) in enumerate(points):
        if not any((x2 >= x and y2 >= y) and (x2 > x or y2 > y) for j, (x2, y2) in enumerate(points) if j != i):
            keep.append(i)
    return sorted(keep, key=lambda i: points[i][0])


FAMILY_COLOURS = {"autoregressive / static exit": "tab:gray", "speculative (lossless)": "tab:blue",
                  "per-token early exit": "tab:orange", "transformers peers": "tab:green", "other": "tab:purple"}


SPARE_COLOURS = ("tab:red", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")  # for families a new method brings


def family_of(strategy: str) -> tuple[str, str]:
    """(plot family, colour) of a method, from its class (generators' `family`). A family the table above does not
    know gets a spare colour chosen by its name, so it is told apart without an edit here."""
    fam = method_fact(strategy, "family", "other")
    return fam, FAMILY_COLOURS.get(fam) or SPARE_COLOURS[zlib.crc32(fam.encode()) % len(SPARE_COLOURS)]


def _label_offsets(xs: list, ys: list, step: float = 9.0) -> list[float]:
    """Vertical offsets (points) that stack labels of points lying close together (lossless methods share one
    quality), so their labels do not print over each other."""
    xr = (max(xs) - min(xs)) or 1.0
    yr = (max(ys) - min(ys)) or 1.0
    placed: list[tuple[float, float, int]] = []
    out = []
    for i in sorted(range(len(xs)), key=lambda i: (xs[i], ys[i])):
        k = 0
        while any(abs(xs[i] - x) < 0.12 * xr and abs(ys[i] - y) < 0.03 * yr and j == k for x, y, j in placed):
            k += 1
        placed.append((xs[i], ys[i], k))
        out.append((i, step * k))
    return [dy for _, dy in sorted(out)]


def plot_speed_quality(df: pd.DataFrame, out: Path) -> list[Path]:
    """Quality vs decode speedup per (model, dataset): IQR bars on both axes, the A/A control's noise band,
    short labels beside the points, colour by method family (a small family key, not a key per method).
    Degenerate rows are crosses (legend: not a finding) and never on the Pareto front."""
    from ..generators import baseline_name

    plt = pyplot()

    files = []
    for (model, dataset), g in df.groupby(["model", "dataset"], sort=False):
        q = primary_quality(g)
        g = g[~g["control"]]
        if q is None or g.empty:
            continue
        use_speedup = g["decode_speedup"].notna().any()  # else decoded tokens/s (no baseline in these runs)
        g = g[g["decode_speedup"].notna() if use_speedup else g["decode_ms_per_token_median"].notna()]
        if g.empty:  # nothing was timed (every output ended at its first token)
            continue
        xs = (g["decode_speedup"] if use_speedup else 1e3 / g["decode_ms_per_token_median"]).tolist()
        ys = g[q].tolist()
        bad = g["degenerate"].astype(bool).tolist()
        fig, ax = plt.subplots(figsize=(8, 5.5))
        ctl = df[(df["model"] == model) & (df["dataset"] == dataset) & df["control"]]["decode_speedup"].dropna()
        if use_speedup and len(ctl):
            dev = max(abs(float(ctl.iloc[0]) - 1.0), 0.005)
            ax.axvspan(1 - dev, 1 + dev, color="0.85", zorder=0, label="A/A control noise band")
        yerr = [(g[q] - g[f"{q}_q25"]).clip(lower=0).fillna(0).tolist(),
                (g[f"{q}_q75"] - g[q]).clip(lower=0).fillna(0).tolist()]
        xerr = [(g["decode_speedup"] - g["decode_speedup_q25"]).tolist(),
                (g["decode_speedup_q75"] - g["decode_speedup"]).tolist()] if use_speedup else None
        ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, fmt="none", ecolor="0.6", lw=0.8, zorder=2)
        colours = [family_of(s)[1] for s in g["strategy"]]
        for marker, want in (("o", False), ("x", True)):
            idx = [i for i, b in enumerate(bad) if b == want]
            if idx:
                ax.scatter([xs[i] for i in idx], [ys[i] for i in idx], c=[colours[i] for i in idx], zorder=3, s=28,
                           marker=marker)
        labels = [tagged(r) for _, r in g.iterrows()]  # degenerate: the cross marker and its legend entry
        for (x, y, text), dy in zip(zip(xs, ys, labels), _label_offsets(xs, ys)):
            ax.annotate(text, (x, y), fontsize=7.5, xytext=(4, 3 + dy), textcoords="offset points",
                        arrowprops={"arrowstyle": "-", "color": "0.7", "lw": 0.5} if dy else None)
        for fam, colour in dict(family_of(s) for s in g["strategy"]).items():
            ax.scatter([], [], c=colour, s=28, label=fam)
        if any(bad):
            ax.scatter([], [], c="0.3", s=28, marker="x", label="degenerate output (not a finding)")
        ok = [i for i, b in enumerate(bad) if not b]
        front = [ok[i] for i in pareto([(xs[i], ys[i]) for i in ok])]
        ax.plot([xs[i] for i in front], [ys[i] for i in front], "--", color="tab:red", label="Pareto front")
        ax.set_xlabel(f"decode speedup over {baseline_name()} (median of per-example ratios, IQR bars)" if use_speedup
                      else "decoded tokens/s (median)")
        ax.set_ylabel(q)
        tr = " — (tr) = trained exits, * = knob from the artifact" if (g["exits"] == "trained").any() else ""
        ax.set_title(f"{dataset} ({model}){tr}", fontsize=10)
        ax.legend(fontsize=7, loc="best", framealpha=0.7)
        ax.grid(alpha=0.25)
        files.append(save(fig, out / f"speed_quality_{dataset}.png"))
    return files


def plot_exit_layers(runs: list[dict], out: Path, labels: Optional[dict] = None) -> list[Path]:
    """Per dataset: the distribution of per-token exit layers of every method (decoded tokens only).
    `labels`: id(run) -> (full, short) as the tables name them."""
    plt = pyplot()

    labels = labels or assign_labels(runs)
    by_task: dict[str, tuple[list, list]] = {}
    for r in runs:
        if r["run"].get("control"):
            continue
        layers = [x for e in r["examples"] for x in e["exit_layers"][1:]]  # decoded tokens only
        if layers:
            data, names = by_task.setdefault(r["run"]["task"]["name"], ([], []))
            data.append(layers)
            flag = output_flag(r)[2]
            names.append(textwrap.fill(labels[id(r)][0] + (f" [{flag}]" if flag else ""), 70))
    files = []
    for task, (data, names) in by_task.items():
        fig, ax = plt.subplots(figsize=(11, 1.5 + 0.45 * len(data)))
        ax.boxplot(data, orientation="horizontal", showmeans=True)
        ax.set_yticks(range(1, len(names) + 1), names, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("exit layer (layers run before the exit head), decoded tokens")
        ax.set_title(f"distribution of per-token exit layers: {task}")
        fig.tight_layout()
        files.append(save(fig, out / f"exit_layers_{task}.png", dpi=80))
    return files


def plot_sweep(df: pd.DataFrame, out: Path) -> list[Path]:
    """Heatmaps of a method's two `sweep_knobs` (its class's; self-speculation: exit_layer x num_speculations,
    LayerSkip's sweep view) -> speedup and acceptance, one per sweep: rows of one strategy and `exits` status whose
    other knobs are all equal, with at least two values of each swept knob."""
    plt = pyplot()

    sweeps = []
    for strategy, ss in df[~df["control"]].groupby("strategy", sort=False):
        grid_knobs = method_fact(strategy, "sweep_knobs", ())
        if len(grid_knobs) != 2:
            continue
        rows, cols = grid_knobs
        ss = ss.copy()
        knobs = ss["knobs"].map(json.loads)
        ss["_rows"] = knobs.map(lambda k: k.get(rows))
        ss["_cols"] = knobs.map(lambda k: k.get(cols))
        ss["_fixed"] = knobs.map(lambda k: knobs_without(k, rows, cols))
        sweeps += [(strategy, rows, cols, g) for _, g in ss.groupby(["model", "dataset", "exits", "_fixed"], sort=False)
                   if g["_rows"].nunique() >= 2 and g["_cols"].nunique() >= 2]
    files = []
    for i, (strategy, rows, cols, g) in enumerate(sweeps):
        model, dataset = g["model"].iloc[0], g["dataset"].iloc[0]
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
        for ax, col, title in ((axes[0], "decode_speedup", "decode speedup (median of per-example ratios)"),
                               (axes[1], "acceptance_rate", "acceptance rate")):
            grid = g.pivot_table(index="_rows", columns="_cols", values=col, aggfunc="mean")
            im = ax.imshow(grid.to_numpy(dtype=float), cmap="viridis", aspect="auto", origin="lower")
            ax.set_xticks(range(len(grid.columns)), grid.columns)
            ax.set_yticks(range(len(grid.index)), grid.index)
            for (a, b), v in np.ndenumerate(grid.to_numpy(dtype=float)):
                ax.text(b, a, "-" if np.isnan(v) else f"{v:.2f}", ha="center", va="center", color="w", fontsize=8)
            ax.set_xlabel(cols)
            ax.set_ylabel(rows)
            ax.set_title(title)
            fig.colorbar(im, ax=ax)
        fig.suptitle(f"{strategy} sweep: {dataset} ({model}), exits {g['exits'].iloc[0]}")
        fig.tight_layout()
        same = sum(1 for s in sweeps[:i] if s[3]["dataset"].iloc[0] == dataset)  # a second sweep on one dataset
        files.append(save(fig, out / f"sweep_{dataset}{f'_{same + 1}' if same else ''}.png"))
    return files
