"""Run logs -> speedup/quality tables (CSV, Markdown) and plots (PNG).

    python -m harness.report RUN_DIR_OR_GLOB [...] [--out DIR]

A path may be a run directory (holding run.json) or any folder above run directories (searched
recursively), or a glob. One row per run = (model, dataset, strategy, knobs). Its baseline is the
full-depth `autoregressive` run of the same model and dataset, preferring one from the same invocation
folder, else the newest. Speedup is the median over the examples both runs share (paired by id) of
tokens/s ratios, with its interquartile range and a bootstrap 95% interval of the median; quality
deltas are paired mean differences. Rows without a baseline say so; nothing is invented.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import sys
import textwrap
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from .config import UsageError
from .logs import read_run
from .metrics import SCORE_KEYS

QUALITY = list(SCORE_KEYS)  # rouge1, rouge2, rougeL, exact_match, pass_at_1
BOOTSTRAP = 2000


def find_run_dirs(paths: list[str]) -> list[Path]:
    """Run directories named by paths, globs, or folders above them (sorted, unique)."""
    found: list[Path] = []
    for p in paths:
        matches = glob.glob(p) or [p]
        for m in map(Path, matches):
            if (m / "run.json").is_file():
                found.append(m)
            elif m.is_dir():
                found.extend(sorted(r.parent for r in m.rglob("run.json")))
            else:
                raise UsageError(f"{p}: no such run directory")
    unique = sorted(set(found))
    if not unique:
        raise UsageError(f"no run directories (with run.json) under {' '.join(paths)}")
    return unique


def _knobs_label(strategy: str, knobs: dict) -> str:
    shown = {k: v for k, v in sorted(knobs.items()) if v is not None and v != "none"}
    return strategy + ("" if not shown else " " + " ".join(f"{k}={v}" for k, v in shown.items()))


def _is_baseline(run: dict) -> bool:
    return run["strategy"] == "autoregressive" and not run["knobs"].get("exit_layer")


def load_runs(paths: list[str]) -> list[dict]:
    runs = []
    for d in find_run_dirs(paths):
        try:
            r = read_run(d)
        except (OSError, json.JSONDecodeError) as e:
            raise UsageError(f"{d}: unreadable run log ({e})") from None
        r["path"] = d
        runs.append(r)
    return runs


def _baseline_for(run: dict, runs: list[dict]) -> Optional[dict]:
    info = run["run"]
    cands = [r for r in runs if _is_baseline(r["run"]) and r["run"]["model"]["name"] == info["model"]["name"]
             and r["run"]["task"]["name"] == info["task"]["name"]]
    if not cands:
        return None
    same_folder = [r for r in cands if r["path"].parent == run["path"].parent]
    return max(same_folder or cands, key=lambda r: r["run"]["created"])


def _bootstrap_median(x: np.ndarray, seed: int = 0) -> tuple[float, float]:
    if len(x) < 2:
        return (float(x[0]), float(x[0])) if len(x) else (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    meds = np.median(rng.choice(x, size=(BOOTSTRAP, len(x)), replace=True), axis=1)
    return float(np.percentile(meds, 2.5)), float(np.percentile(meds, 97.5))


def _per_example(run: dict) -> pd.DataFrame:
    rows = []
    for e in run["examples"]:
        row = {"id": e["id"], "tokens_per_second": e["tokens_per_second"]}
        row.update({k: e["metrics"].get(k) for k in QUALITY})
        rows.append(row)
    return pd.DataFrame(rows, columns=["id", "tokens_per_second", *QUALITY]).drop_duplicates("id")


def _median(s: pd.Series) -> float:
    s = s.dropna()
    return float(s.median()) if len(s) else math.nan


def build_table(runs: list[dict]) -> pd.DataFrame:
    """One row per run, with speedup and quality deltas against its autoregressive baseline."""
    rows = []
    for run in runs:
        info, summ = run["run"], run["summary"] or {}
        ex = _per_example(run)
        row = {
            "model": info["model"]["name"], "dataset": info["task"]["name"], "strategy": info["strategy"],
            "method": _knobs_label(info["strategy"], info["knobs"]), "knobs": json.dumps(info["knobs"], sort_keys=True),
            "run_id": info["run_id"], "status": summ.get("status", "no summary"), "n": len(ex),
            "tokens_per_second": _median(ex["tokens_per_second"]),
            "tps_q25": float(ex["tokens_per_second"].quantile(0.25)) if len(ex) else math.nan,
            "tps_q75": float(ex["tokens_per_second"].quantile(0.75)) if len(ex) else math.nan,
            "time_per_token": _median(pd.Series([e["time_per_token"] for e in run["examples"]], dtype=float)),
            "prefill_seconds": _median(pd.Series([e["prefill_seconds"] for e in run["examples"]], dtype=float)),
            "avg_exit_layer": summ.get("avg_exit_layer"), "acceptance_rate": summ.get("acceptance_rate"),
            "layer_forwards_per_token": summ.get("layer_forwards_per_token"),
            "exit_head_flops_per_token": summ.get("exit_head_flops_per_token"),
            "confidence_flops_per_token": summ.get("confidence_flops_per_token"),
        }
        for k in QUALITY:
            row[k] = float(ex[k].dropna().mean()) if ex[k].notna().any() else math.nan
        base = _baseline_for(run, runs)
        if base is None:
            row.update(baseline="no autoregressive baseline for this model and dataset", n_paired=0,
                       speedup=math.nan, speedup_q25=math.nan, speedup_q75=math.nan,
                       speedup_ci_low=math.nan, speedup_ci_high=math.nan)
            row.update({f"delta_{k}": math.nan for k in QUALITY})
        else:
            paired = ex.merge(_per_example(base), on="id", suffixes=("", "_base"))
            ratio = (paired["tokens_per_second"] / paired["tokens_per_second_base"]).dropna().to_numpy()
            lo, hi = _bootstrap_median(ratio)
            row.update(baseline=base["run"]["run_id"], n_paired=len(ratio),
                       speedup=float(np.median(ratio)) if len(ratio) else math.nan,
                       speedup_q25=float(np.percentile(ratio, 25)) if len(ratio) else math.nan,
                       speedup_q75=float(np.percentile(ratio, 75)) if len(ratio) else math.nan,
                       speedup_ci_low=lo, speedup_ci_high=hi)
            for k in QUALITY:
                d = (paired[k] - paired[f"{k}_base"]).dropna()
                row[f"delta_{k}"] = float(d.mean()) if len(d) else math.nan
        rows.append(row)
    df = pd.DataFrame(rows)
    df["_base"] = df.apply(lambda r: 0 if r["strategy"] == "autoregressive" and "exit_layer" not in r["method"] else 1,
                           axis=1)
    df = df.sort_values(["model", "dataset", "_base", "speedup"], ascending=[True, True, True, False],
                        na_position="last").drop(columns="_base")
    return df.reset_index(drop=True)


def primary_quality(df: pd.DataFrame) -> Optional[str]:
    for k in ("rougeL", "exact_match", "pass_at_1"):
        if k in df and df[k].notna().any():
            return k
    return None


def markdown(df: pd.DataFrame) -> str:
    """A compact Markdown table: what a reader compares first."""
    out = []
    for (model, dataset), g in df.groupby(["model", "dataset"], sort=False):
        q = primary_quality(g)
        t = pd.DataFrame({
            "method": g["method"], "n": g["n"],
            "tok/s (median [IQR])": [f"{a:.2f} [{b:.2f}-{c:.2f}]" for a, b, c in
                                     zip(g["tokens_per_second"], g["tps_q25"], g["tps_q75"])],
            "speedup (median, 95% CI, n paired)": [
                "no baseline" if math.isnan(s) else f"{s:.2f}x ({lo:.2f}-{hi:.2f}, n={n})"
                for s, lo, hi, n in zip(g["speedup"], g["speedup_ci_low"], g["speedup_ci_high"], g["n_paired"])],
            "avg exit": g["avg_exit_layer"].map(lambda v: "-" if v is None or pd.isna(v) else f"{v:.1f}"),
            "acceptance": g["acceptance_rate"].map(lambda v: "-" if v is None or pd.isna(v) else f"{v:.3f}"),
            "layers/token": g["layer_forwards_per_token"].map(lambda v: "-" if v is None or pd.isna(v) else f"{v:.1f}"),
            "head MFLOP/token": g["exit_head_flops_per_token"].map(
                lambda v: "-" if v is None or pd.isna(v) else f"{v / 1e6:.1f}"),
        })
        if q:
            t[q] = [f"{v:.4f}" if not pd.isna(v) else "-" for v in g[q]]
            t[f"delta {q}"] = [("-" if pd.isna(v) else f"{v:+.4f}") for v in g[f"delta_{q}"]]
        out.append(f"### {dataset} ({model})\n\n" + t.to_markdown(index=False))
    return "\n\n".join(out) + "\n"


# -- plots ------------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


def _pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points not dominated (higher speed and higher quality are better)."""
    keep = []
    for i, (x, y) in enumerate(points):
        if not any((x2 >= x and y2 >= y) and (x2 > x or y2 > y) for j, (x2, y2) in enumerate(points) if j != i):
            keep.append(i)
    return sorted(keep, key=lambda i: points[i][0])


def plot_speed_quality(df: pd.DataFrame, out: Path) -> list[Path]:
    plt = _pyplot()

    files = []
    for (model, dataset), g in df.groupby(["model", "dataset"], sort=False):
        q = primary_quality(g)
        if q is None:
            continue
        use_speedup = g["speedup"].notna().all()
        xs = (g["speedup"] if use_speedup else g["tokens_per_second"]).tolist()
        ys = g[q].tolist()
        fig, ax = plt.subplots(figsize=(11, 5.5))
        fig.subplots_adjust(left=0.08, right=0.52, bottom=0.1)
        ax.scatter(xs, ys, zorder=3)
        for i, (x, y) in enumerate(zip(xs, ys), 1):  # numbers on the plot, names in the key beside it
            ax.annotate(str(i), (x, y), fontsize=9, xytext=(4, 4), textcoords="offset points")
        key = "\n".join(textwrap.fill(f"{i}. {m}", 60, subsequent_indent="    ")
                        for i, m in enumerate(g["method"], 1))
        fig.text(0.54, 0.95, key, fontsize=7.5, va="top", family="monospace")
        front = _pareto(list(zip(xs, ys)))
        ax.plot([xs[i] for i in front], [ys[i] for i in front], "--", color="tab:red", label="Pareto front")
        ax.set_xlabel("speedup over autoregressive (median, paired)" if use_speedup else "tokens/s (median)")
        ax.set_ylabel(q)
        ax.set_title(f"{dataset} ({model})")
        ax.legend()
        files.append(_save(fig, out / f"speed_quality_{dataset}.png"))
    return files


def plot_exit_layers(runs: list[dict], out: Path) -> Optional[Path]:
    plt = _pyplot()

    data, labels = [], []
    for r in runs:
        layers = [x for e in r["examples"] for x in e["exit_layers"][1:]]  # decoded tokens only
        if layers:
            data.append(layers)
            labels.append(textwrap.fill(f"{r['run']['task']['name']}: "
                                        f"{_knobs_label(r['run']['strategy'], r['run']['knobs'])}", 55))
    if not data:
        return None
    fig, ax = plt.subplots(figsize=(11, 1.5 + 0.55 * len(data)))
    ax.boxplot(data, orientation="horizontal", showmeans=True)
    ax.set_yticks(range(1, len(labels) + 1), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("exit layer (layers run before the exit head), decoded tokens")
    ax.set_title("distribution of per-token exit layers")
    fig.tight_layout()
    return _save(fig, out / "exit_layers.png")


def plot_sweep(df: pd.DataFrame, out: Path) -> list[Path]:
    """Heatmaps exit_layer x num_speculations -> tokens/s and acceptance (LayerSkip's sweep view)."""
    plt = _pyplot()

    files = []
    ss = df[df["strategy"] == "self_speculative"].copy()
    if ss.empty:
        return files
    knobs = ss["knobs"].map(json.loads)
    ss["exit_layer"] = knobs.map(lambda k: k.get("exit_layer"))
    ss["num_speculations"] = knobs.map(lambda k: k.get("num_speculations"))
    for (model, dataset), g in ss.groupby(["model", "dataset"], sort=False):
        if g["exit_layer"].nunique() < 2 or g["num_speculations"].nunique() < 2:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
        for ax, col, title in ((axes[0], "tokens_per_second", "tokens/s (median)"),
                               (axes[1], "acceptance_rate", "acceptance rate")):
            grid = g.pivot_table(index="exit_layer", columns="num_speculations", values=col, aggfunc="mean")
            im = ax.imshow(grid.to_numpy(dtype=float), cmap="viridis", aspect="auto", origin="lower")
            ax.set_xticks(range(len(grid.columns)), grid.columns)
            ax.set_yticks(range(len(grid.index)), grid.index)
            for (i, j), v in np.ndenumerate(grid.to_numpy(dtype=float)):
                ax.text(j, i, "-" if np.isnan(v) else f"{v:.2f}", ha="center", va="center", color="w", fontsize=8)
            ax.set_xlabel("num_speculations")
            ax.set_ylabel("exit_layer")
            ax.set_title(title)
            fig.colorbar(im, ax=ax)
        fig.suptitle(f"self_speculative sweep: {dataset} ({model})")
        fig.tight_layout()
        files.append(_save(fig, out / f"sweep_{dataset}.png"))
    return files


def write_report(paths: list[str], out: Optional[str] = None) -> tuple[pd.DataFrame, list[Path]]:
    """Build the table and every plot; returns the table and the files written."""
    runs = load_runs(paths)
    df = build_table(runs)
    out_dir = Path(out) if out else (find_run_dirs(paths)[0].parent / "report")
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [out_dir / "report.csv", out_dir / "report.md"]
    df.to_csv(files[0], index=False)
    files[1].write_text(markdown(df), encoding="utf-8")
    files += plot_speed_quality(df, out_dir)
    ex = plot_exit_layers(runs, out_dir)
    files += [ex] if ex else []
    files += plot_sweep(df, out_dir)
    return df, files


def main(argv: Optional[list[str]] = None) -> int:
    from .cli import Parser

    p = Parser(prog="python -m harness.report", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", help="run directories, folders above them, or globs")
    p.add_argument("--out", default=None,
                   help="output folder for report.csv, report.md and PNGs (default: report/ beside the first run)")
    a = p.parse_args(argv)
    df, files = write_report(a.paths, a.out)
    print(markdown(df))
    print("wrote: " + ", ".join(str(f) for f in files))
    return 0


if __name__ == "__main__":
    from .cli import run_main

    sys.exit(run_main(main))
