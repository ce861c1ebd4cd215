"""Run logs -> speedup/quality tables (CSV, Markdown) and plots (PNG).

    python -m harness.report RUN_DIR_OR_GLOB [...] [--out DIR] [--no_plots]

A path may be a run directory (holding run.json) or any folder above run directories (searched
recursively), or a glob. One row per run = (model, dataset, strategy, knobs).

Speed is decode time per generated token (prefill excluded: every method shares it; it is reported on
its own). A row's baseline is a full-depth `autoregressive` run (not the A/A control) that matches it on
every field that changes what is measured (model, checkpoint, device, dtype, data file content,
example ids and prompt hashes, n_shot, protocol, seed, max_steps, fixed_length, sampling, chat template,
world size); one from the same invocation folder is preferred. If none matches, the row names the field that
differs and has no speedup. `decode speedup` is the MEDIAN OF PER-EXAMPLE RATIOS (baseline decode
time/token / method decode time/token, examples paired by id and prompt hash), with its IQR and min-max;
a bootstrap 95% interval of that median is shown only from 10 pairs on. Quality deltas are paired mean
differences. The A/A control row (a second copy of the baseline in the same rotation) gives the noise
floor; when its median is more than 5% from 1.0 the report says which speedups cannot be told from 1.0.
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

from . import time_breakdown
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


def uses_trained_exits(info: dict) -> bool:
    """Whether a run's method went through trained exits: an artifact was attached and the method reads early
    exits (not transformers' own decoding, not the full-depth baseline)."""
    s = info["strategy"]
    full_depth = s == "autoregressive" and info["knobs"].get("exit_layer") is None
    return bool(_get(info, "model", "exits") or info["knobs"].get("trained_defaults")) and \
        not s.startswith("hf_") and not full_depth


def method_label(info: dict) -> str:
    """Strategy + its knobs (trained defaults left out), marked `[trained exits]` when it used them."""
    knobs = info["knobs"]
    shown = {k: v for k, v in sorted(knobs.items()) if v is not None and v != "none" and k != "trained_defaults"}
    trained = " [trained exits]" if uses_trained_exits(info) else ""
    return info["strategy"] + ("" if not shown else " " + " ".join(f"{k}={v}" for k, v in shown.items())) + trained


def _is_baseline(run: dict) -> bool:
    """A full-depth autoregressive run that is not the A/A control."""
    return run["strategy"] == "autoregressive" and not run["knobs"].get("exit_layer") and not run.get("control")


def is_baseline_row(r) -> bool:
    """`_is_baseline` for a row of the report table (knobs as JSON)."""
    return _is_baseline({"strategy": r["strategy"], "knobs": json.loads(r["knobs"] or "{}"),
                         "control": bool(r["control"])})


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


def _get(info: dict, *keys: str):
    for k in keys:
        info = info.get(k) if isinstance(info, dict) else None
    return info


# Everything that changes what a speed or quality figure measures; a pair must agree on all of it.
PAIRING: tuple = (
    ("model", lambda i: _get(i, "model", "name")),
    ("checkpoint", lambda i: _get(i, "model", "checkpoint")),
    ("device", lambda i: _get(i, "model", "device")),
    ("dtype", lambda i: _get(i, "model", "dtype")),
    ("dataset", lambda i: _get(i, "task", "name")),
    ("data file (content hash)", lambda i: _get(i, "task", "data_sha256")),
    ("example ids and prompt hashes", lambda i: _get(i, "task", "examples_sha256")),
    ("n_shot", lambda i: _get(i, "task", "n_shot")),
    ("protocol", lambda i: _get(i, "run", "protocol") or "harness"),
    ("seed", lambda i: _get(i, "generation", "seed")),
    ("max_steps", lambda i: _get(i, "task", "max_steps")),
    ("fixed_length", lambda i: _get(i, "run", "fixed_length")),
    ("sampling", lambda i: [_get(i, "generation", k) for k in ("sample", "temperature", "top_p", "top_k")]
     if _get(i, "generation", "sample") else False),
    ("chat_template", lambda i: _get(i, "run", "chat_template")),
    ("world_size", lambda i: _get(i, "environment", "world_size")),
    ("device map", lambda i: _get(i, "model", "device_map") or "none"),
)


def pairing_mismatch(a: dict, b: dict) -> Optional[str]:
    """None if run.json dicts `a` and `b` may be paired, else which field differs and how."""
    for name, get in PAIRING:
        va, vb = get(a), get(b)
        if va is None or vb is None or va != vb:
            shown = lambda v: "missing" if v is None else str(v)[:24]  # noqa: E731
            return f"{name} differs ({shown(va)} vs baseline {shown(vb)})"
    return None


def _baseline_for(run: dict, runs: list[dict]) -> tuple[Optional[dict], Optional[str]]:
    """(matching baseline, None) or (None, why no baseline could be paired)."""
    info = run["run"]
    cands = [r for r in runs if _is_baseline(r["run"]) and r is not run
             and r["run"]["model"]["name"] == info["model"]["name"]
             and r["run"]["task"]["name"] == info["task"]["name"]]
    if not cands:
        return None, "no autoregressive baseline for this model and dataset"
    # same invocation folder first, then newest
    cands.sort(key=lambda r: (r["path"].parent == run["path"].parent, r["run"]["created"]), reverse=True)
    for c in cands:
        if pairing_mismatch(info, c["run"]) is None:
            return c, None
    return None, "not paired: " + pairing_mismatch(info, cands[0]["run"])


def _bootstrap_median(x: np.ndarray, seed: int = 0) -> tuple[float, float]:
    if len(x) < 2:
        return (float(x[0]), float(x[0])) if len(x) else (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    meds = np.median(rng.choice(x, size=(BOOTSTRAP, len(x)), replace=True), axis=1)
    return float(np.percentile(meds, 2.5)), float(np.percentile(meds, 97.5))


MIN_PAIRS_FOR_CI = 10  # below this a bootstrap interval of a median means little: min-max is shown instead
CONTROL_BAND = 0.05  # an A/A control further than this from 1.0 makes small speedups unreadable
SPEEDUP_COLS = ("decode_speedup", "decode_speedup_q25", "decode_speedup_q75", "decode_speedup_min",
                "decode_speedup_max", "decode_speedup_ci95_low", "decode_speedup_ci95_high")


def _per_example(run: dict) -> pd.DataFrame:
    rows = []
    for e in run["examples"]:
        row = {"id": str(e["id"]), "prompt_sha256": e.get("prompt_sha256"),
               "decode_time_per_token": e.get("decode_time_per_token"), "prefill_seconds": e.get("prefill_seconds"),
               "e2e_tokens_per_second": e.get("e2e_tokens_per_second"), "total_seconds": e.get("total_seconds")}
        row.update({k: e["metrics"].get(k) for k in QUALITY})
        rows.append(row)
    cols = ["id", "prompt_sha256", "decode_time_per_token", "prefill_seconds", "e2e_tokens_per_second",
            "total_seconds", *QUALITY]
    return pd.DataFrame(rows, columns=cols).drop_duplicates("id")


def _median(s: pd.Series) -> float:
    s = pd.to_numeric(s, errors="coerce").dropna()
    return float(s.median()) if len(s) else math.nan


def _quantile(s: pd.Series, q: float) -> float:
    s = pd.to_numeric(s, errors="coerce").dropna()
    return float(s.quantile(q)) if len(s) else math.nan


def speedup_stats(ratio: np.ndarray) -> dict:
    """Median of per-example ratios with IQR, min-max, and a bootstrap 95% CI only from MIN_PAIRS_FOR_CI pairs."""
    if not len(ratio):
        return {c: math.nan for c in SPEEDUP_COLS}
    lo, hi = _bootstrap_median(ratio) if len(ratio) >= MIN_PAIRS_FOR_CI else (math.nan, math.nan)
    return dict(zip(SPEEDUP_COLS, (float(np.median(ratio)), float(np.percentile(ratio, 25)),
                                   float(np.percentile(ratio, 75)), float(ratio.min()), float(ratio.max()), lo, hi)))


def build_table(runs: list[dict]) -> pd.DataFrame:
    """One row per run, with decode speedup and quality deltas against its matched baseline."""
    rows = []
    for run in runs:
        info, summ = run["run"], run["summary"] or {}
        ex = _per_example(run)
        row = {
            "model": info["model"]["name"], "dataset": info["task"]["name"], "strategy": info["strategy"],
            "method": method_label(info) + (" (A/A control)" if info.get("control") else ""),
            "invocation": _get(info, "schedule", "invocation") or info["run_id"],
            "exits": "trained" if _get(info, "model", "exits") else "none",  # an exit artifact was attached
            "label": short_label(info["strategy"], info["knobs"]) + (" (A/A control)" if info.get("control") else ""),
            "knobs": json.dumps(info["knobs"], sort_keys=True), "control": bool(info.get("control", False)),
            "run_id": info["run_id"], "status": summ.get("status", "no summary"), "n": len(ex),
            "decode_ms_per_token_median": 1e3 * _median(ex["decode_time_per_token"]),
            "decode_ms_per_token_q25": 1e3 * _quantile(ex["decode_time_per_token"], 0.25),
            "decode_ms_per_token_q75": 1e3 * _quantile(ex["decode_time_per_token"], 0.75),
            "prefill_seconds_median": _median(ex["prefill_seconds"]),
            "e2e_tokens_per_second_median": _median(ex["e2e_tokens_per_second"]),
            "avg_exit_layer": summ.get("avg_exit_layer"), "acceptance_rate": summ.get("acceptance_rate"),
            "layer_forwards_per_token": summ.get("layer_forwards_per_token"),
            "exit_head_flops_per_token": summ.get("exit_head_flops_per_token"),
            "confidence_flops_per_token": summ.get("confidence_flops_per_token"),
            "kv_fill_flops_per_token": summ.get("kv_fill_flops_per_token"),
        }
        for k in QUALITY:
            row[k] = float(ex[k].dropna().mean()) if ex[k].notna().any() else math.nan
            row[f"{k}_q25"], row[f"{k}_q75"] = _quantile(ex[k], 0.25), _quantile(ex[k], 0.75)
        base, why = _baseline_for(run, runs) if not _is_baseline(info) else (run, None)
        if base is None:
            row.update(baseline=why, n_paired=0, latency_ratio=math.nan, **speedup_stats(np.array([])))
            row.update({f"delta_{k}": math.nan for k in QUALITY})
        else:
            paired = ex.merge(_per_example(base), on=["id", "prompt_sha256"], suffixes=("", "_base"))
            ratio = (pd.to_numeric(paired["decode_time_per_token_base"]) /
                     pd.to_numeric(paired["decode_time_per_token"])).dropna().to_numpy()
            row.update(baseline=base["run"]["run_id"], n_paired=len(ratio), **speedup_stats(ratio))
            # dataset level: total time (prefill + decode) of the method / of the baseline over the paired examples
            tot = paired[["total_seconds", "total_seconds_base"]].apply(pd.to_numeric, errors="coerce").dropna()
            row["latency_ratio"] = float(tot["total_seconds"].sum() / tot["total_seconds_base"].sum()) \
                if len(tot) and tot["total_seconds_base"].sum() > 0 else math.nan
            for k in QUALITY:
                d = (paired[k] - paired[f"{k}_base"]).dropna()
                row[f"delta_{k}"] = float(d.mean()) if len(d) else math.nan
        rows.append(row)
    df = pd.DataFrame(rows)
    df["_order"] = [0 if _is_baseline(r["run"]) else 1 if r["run"].get("control") else 2 for r in runs]
    df = df.sort_values(["model", "dataset", "_order", "decode_speedup"], ascending=[True, True, True, False],
                        na_position="last").drop(columns="_order")
    return df.reset_index(drop=True)


def primary_quality(df: pd.DataFrame) -> Optional[str]:
    for k in ("rougeL", "exact_match", "pass_at_1"):
        if k in df and df[k].notna().any():
            return k
    return None


def control_notes(g: pd.DataFrame) -> list[str]:
    """What the A/A control says about the noise floor of one (model, dataset) table."""
    ctl = g[g["control"] & g["decode_speedup"].notna()]
    if ctl.empty:
        return ["No A/A control in these runs: the noise floor is unknown (run the configurations in one "
                "invocation with --strategies or --sweep to get one)."]
    notes = []
    for _, c in ctl.iterrows():
        dev = abs(c["decode_speedup"] - 1.0)
        notes.append(f"A/A control (the baseline timed against itself): {c['decode_speedup']:.3f}x "
                     f"[IQR {c['decode_speedup_q25']:.3f}-{c['decode_speedup_q75']:.3f}, "
                     f"min-max {c['decode_speedup_min']:.3f}-{c['decode_speedup_max']:.3f}], n={c['n_paired']}.")
        if dev > CONTROL_BAND:
            notes.append(f"WARNING: the A/A control is {100 * dev:.1f}% away from 1.0 (more than "
                         f"{100 * CONTROL_BAND:.0f}%): speedups between {1 - dev:.2f}x and {1 + dev:.2f}x cannot be "
                         "told from 1.0 in this measurement.")
    return notes


def _fmt(v, f: str, scale: float = 1.0) -> str:
    return "-" if v is None or pd.isna(v) else format(v * scale, f)


def _speedup_cell(r) -> str:
    if pd.isna(r["decode_speedup"]):
        return str(r["baseline"])
    return f"{r['decode_speedup']:.2f}x [{r['decode_speedup_q25']:.2f}-{r['decode_speedup_q75']:.2f}]"


def _spread_cell(r) -> str:
    if pd.isna(r["decode_speedup"]):
        return "-"
    if r["n_paired"] >= MIN_PAIRS_FOR_CI:
        return f"95% CI {r['decode_speedup_ci95_low']:.2f}-{r['decode_speedup_ci95_high']:.2f}, n={r['n_paired']}"
    return (f"min-max {r['decode_speedup_min']:.2f}-{r['decode_speedup_max']:.2f}, n={r['n_paired']} "
            f"(n too small for a CI)")


def across_tasks(df: pd.DataFrame) -> pd.DataFrame:
    """Per method (rows: short label, exit artifact attached or not) and task (columns): decode speedup and the
    delta of the task's main quality metric. A short label shared by two configurations falls back to the full one."""
    cells: dict = {}
    for (model, dataset), g in df.groupby(["model", "dataset"], sort=False):
        q = primary_quality(g)
        for _, r in g.iterrows():
            if pd.isna(r["decode_speedup"]) or is_baseline_row(r):
                continue
            delta = f", {_fmt(r[f'delta_{q}'], '+.3f')} {q}" if q else ""
            key = (model, r["exits"], r["label"])
            if dataset in cells.get(key, {}):
                key = (model, r["exits"], r["method"])
            if dataset in cells.get(key, {}):  # the same configuration from another invocation
                key = (model, r["exits"], f"{r['method']} ({r['invocation']})")
            cells.setdefault(key, {})[dataset] = f"{r['decode_speedup']:.2f}x{delta}"
    rows = [{"model": m, "exits": e, "method": meth, **v} for (m, e, meth), v in cells.items()]
    return pd.DataFrame(rows).fillna("-") if rows else pd.DataFrame()


def markdown(df: pd.DataFrame) -> str:
    """Compact Markdown tables, one per (model, dataset), each followed by its A/A control note; with several
    tasks, a summary table first (per method: speedup and quality delta on each task)."""
    out = []
    if df["dataset"].nunique() > 1:
        s = across_tasks(df)
        if not s.empty:
            out.append("### Summary across tasks (decode speedup, delta of the task's main metric)\n\n"
                       + s.to_markdown(index=False))
    for (model, dataset), g in df.groupby(["model", "dataset"], sort=False):
        q = primary_quality(g)
        t = pd.DataFrame({
            "method": g["method"], "n": g["n"],
            "decode ms/token (median [IQR])": [
                f"{a:.1f} [{b:.1f}-{c:.1f}]" if not pd.isna(a) else "-" for a, b, c in
                zip(g["decode_ms_per_token_median"], g["decode_ms_per_token_q25"], g["decode_ms_per_token_q75"])],
            "decode speedup (median of per-example ratios [IQR])": [_speedup_cell(r) for _, r in g.iterrows()],
            "spread": [_spread_cell(r) for _, r in g.iterrows()],
            "total time / baseline's (all examples)": g["latency_ratio"].map(lambda v: _fmt(v, ".3f")),
            "prefill s (median)": g["prefill_seconds_median"].map(lambda v: _fmt(v, ".3f")),
            "end-to-end tok/s (median)": g["e2e_tokens_per_second_median"].map(lambda v: _fmt(v, ".2f")),
            "avg exit (decoded)": g["avg_exit_layer"].map(lambda v: _fmt(v, ".1f")),
            "acceptance": g["acceptance_rate"].map(lambda v: _fmt(v, ".3f")),
            "layers/token": g["layer_forwards_per_token"].map(lambda v: _fmt(v, ".1f")),
            "head MFLOP/token": g["exit_head_flops_per_token"].map(lambda v: _fmt(v, ".1f", 1e-6)),
            "confidence MFLOP/token": g["confidence_flops_per_token"].map(lambda v: _fmt(v, ".1f", 1e-6)),
            "state-copy MFLOP/token": g["kv_fill_flops_per_token"].map(lambda v: _fmt(v, ".1f", 1e-6)),
        })
        if q:
            t[q] = [_fmt(v, ".4f") for v in g[q]]
            t[f"delta {q}"] = [_fmt(v, "+.4f") for v in g[f"delta_{q}"]]
        notes = "\n".join(f"- {n}" for n in control_notes(g))
        out.append(f"### {dataset} ({model})\n\n" + t.to_markdown(index=False) + "\n\n" + notes)
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


FAMILIES = {  # strategy -> (family shown in the plot, colour)
    "autoregressive": ("autoregressive / static exit", "tab:gray"),
    "self_speculative": ("speculative (lossless)", "tab:blue"), "hybrid_speculative": ("speculative (lossless)", "tab:blue"),
    "calm": ("per-token early exit", "tab:orange"), "free": ("per-token early exit", "tab:orange"),
    "dynamic": ("per-token early exit", "tab:orange"), "policy": ("per-token early exit", "tab:orange"),
    "hf_generate": ("transformers peers", "tab:green"), "hf_prompt_lookup": ("transformers peers", "tab:green"),
    "hf_assistant_early_exit": ("transformers peers", "tab:green"),
}
SHORT = {"autoregressive": "AR", "self_speculative": "SS", "hybrid_speculative": "hybrid", "calm": "CALM",
         "free": "FREE", "dynamic": "dyn", "policy": "policy", "hf_generate": "hf", "hf_prompt_lookup": "hf lookup",
         "hf_assistant_early_exit": "hf AEE"}


def short_label(strategy: str, knobs: dict) -> str:
    """Method + its key knob, short enough to sit beside a point."""
    k = knobs or {}
    parts = [SHORT.get(strategy, strategy)]
    if k.get("exit_layer") is not None:
        parts.append(f"E{k['exit_layer']}")
    if strategy in ("self_speculative", "hybrid_speculative") and k.get("num_speculations"):
        parts.append(f"k{k['num_speculations']}")
    if k.get("criteria"):
        parts.append({"cosine_similarity": "cos", "token_repeat": "repeat", "entropy_based": "entropy",
                      "max_probability": "maxprob", "convergence": "conv"}.get(k["criteria"], k["criteria"]))
    if strategy in ("calm", "free") and k.get("threshold") is not None:
        parts.append(f"t{k['threshold']:.3g}")
    if k.get("shallow_exit_layer") is not None:
        parts.append(f"S{k['shallow_exit_layer']}")
    if k.get("confidence") not in (None, "softmax"):
        parts.append(k["confidence"])
    if k.get("vocab_reduction") not in (None, "none"):
        parts.append(f"vocab-{k['vocab_reduction']}")
    return " ".join(parts)


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
    short labels beside the points, colour by method family (a small family key, not a key per method)."""
    plt = _pyplot()

    files = []
    for (model, dataset), g in df.groupby(["model", "dataset"], sort=False):
        q = primary_quality(g)
        g = g[~g["control"]]
        if q is None or g.empty:
            continue
        use_speedup = g["decode_speedup"].notna().all()
        xs = (g["decode_speedup"] if use_speedup else 1e3 / g["decode_ms_per_token_median"]).tolist()
        ys = g[q].tolist()
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
        colours = [FAMILIES.get(s, ("other", "tab:purple"))[1] for s in g["strategy"]]
        ax.scatter(xs, ys, c=colours, zorder=3, s=28)
        labels = [short_label(s, json.loads(kn or "{}")) + (" (tr)" if "[trained exits]" in meth else "")
                  for s, kn, meth in zip(g["strategy"], g["knobs"], g["method"])]  # (tr): as the breakdown plot
        for (x, y, text), dy in zip(zip(xs, ys, labels), _label_offsets(xs, ys)):
            ax.annotate(text, (x, y), fontsize=7.5, xytext=(4, 3 + dy), textcoords="offset points",
                        arrowprops={"arrowstyle": "-", "color": "0.7", "lw": 0.5} if dy else None)
        for fam, colour in dict(FAMILIES.get(s, ("other", "tab:purple")) for s in g["strategy"]).items():
            ax.scatter([], [], c=colour, s=28, label=fam)
        front = _pareto(list(zip(xs, ys)))
        ax.plot([xs[i] for i in front], [ys[i] for i in front], "--", color="tab:red", label="Pareto front")
        ax.set_xlabel("decode speedup over autoregressive (median of per-example ratios, IQR bars)" if use_speedup
                      else "decoded tokens/s (median)")
        ax.set_ylabel(q)
        tr = " — (tr) = with trained exits" if g["method"].str.contains("[trained exits]", regex=False).any() else ""
        ax.set_title(f"{dataset} ({model}){tr}")
        ax.legend(fontsize=7, loc="best", framealpha=0.7)
        ax.grid(alpha=0.25)
        files.append(_save(fig, out / f"speed_quality_{dataset}.png"))
    return files


def plot_exit_layers(runs: list[dict], out: Path) -> list[Path]:
    """Per dataset: the distribution of per-token exit layers of every method (decoded tokens only)."""
    plt = _pyplot()

    by_task: dict[str, tuple[list, list]] = {}
    for r in runs:
        if r["run"].get("control"):
            continue
        layers = [x for e in r["examples"] for x in e["exit_layers"][1:]]  # decoded tokens only
        if layers:
            data, labels = by_task.setdefault(r["run"]["task"]["name"], ([], []))
            data.append(layers)
            labels.append(textwrap.fill(method_label(r["run"]), 70))
    files = []
    for task, (data, labels) in by_task.items():
        fig, ax = plt.subplots(figsize=(11, 1.5 + 0.45 * len(data)))
        ax.boxplot(data, orientation="horizontal", showmeans=True)
        ax.set_yticks(range(1, len(labels) + 1), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("exit layer (layers run before the exit head), decoded tokens")
        ax.set_title(f"distribution of per-token exit layers: {task}")
        fig.tight_layout()
        files.append(_save(fig, out / f"exit_layers_{task}.png"))
    return files


def plot_sweep(df: pd.DataFrame, out: Path) -> list[Path]:
    """Heatmaps exit_layer x num_speculations -> tokens/s and acceptance (LayerSkip's sweep view)."""
    plt = _pyplot()

    files = []
    ss = df[(df["strategy"] == "self_speculative") & ~df["control"]].copy()
    if ss.empty:
        return files
    knobs = ss["knobs"].map(json.loads)
    ss["exit_layer"] = knobs.map(lambda k: k.get("exit_layer"))
    ss["num_speculations"] = knobs.map(lambda k: k.get("num_speculations"))
    for (model, dataset), g in ss.groupby(["model", "dataset"], sort=False):
        if g["exit_layer"].nunique() < 2 or g["num_speculations"].nunique() < 2:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
        for ax, col, title in ((axes[0], "decode_speedup", "decode speedup (median of per-example ratios)"),
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


def _family(row) -> str:
    """Which curve a row belongs to for the speed-quality AUC: static exit, or the method's strategy."""
    if row["strategy"] == "autoregressive":
        return "static exit" if json.loads(row["knobs"] or "{}").get("exit_layer") is not None else ""
    return row["strategy"]


def speed_quality_auc(df: pd.DataFrame) -> pd.DataFrame:
    """FREE's headline metric: the area under each method's speed-quality curve (a threshold or exit-layer sweep).

    Per (model, dataset), each method's points (decode speedup, main quality metric) plus the full model's (1, q0)
    form a curve; quality at speedup x is the best quality the method reaches at a speedup >= x (its Pareto
    envelope; 0 beyond its fastest point). The area is taken over the SAME range [1, X] for every method of the
    table, X = the largest speedup any of them reaches, and divided by q0 * (X - 1): 1.0 = the full model's quality
    at every speedup up to X, so static exit, the method and the full model are on one scale. Methods with one
    configuration get an area too (a one-point curve). Needs the baseline row and at least one other point."""
    rows = []
    for (model, dataset), g in df.groupby(["model", "dataset"], sort=False):
        q = primary_quality(g)
        base = g[(g["strategy"] == "autoregressive") & ~g["control"].astype(bool) & (g.apply(_family, axis=1) == "")]
        if q is None or base.empty:
            continue
        q0 = float(base[q].iloc[0])
        pts = g[~g["control"].astype(bool) & g["decode_speedup"].notna() & g[q].notna()].copy()
        pts["family"] = pts.apply(_family, axis=1)
        pts = pts[pts["family"] != ""]
        if pts.empty or q0 <= 0:
            continue
        X = max(float(pts["decode_speedup"].max()), 1.0)
        if X <= 1.0:
            continue
        grid = np.linspace(1.0, X, 401)
        for fam, f in pts.groupby("family"):
            s, v = np.r_[1.0, f["decode_speedup"].to_numpy(float)], np.r_[q0, f[q].to_numpy(float)]
            env = np.array([v[s >= x].max() if (s >= x).any() else 0.0 for x in grid])
            area = float(np.trapezoid(env, grid)) if hasattr(np, "trapezoid") else float(np.trapz(env, grid))
            rows.append({"model": model, "dataset": dataset, "method": fam, "points": len(f), "metric": q,
                         "speedup_range": X, "auc": area / (q0 * (X - 1.0))})
    return pd.DataFrame(rows)


def write_report(paths: list[str], out: Optional[str] = None, plots: bool = True) -> tuple[pd.DataFrame, list[Path]]:
    """Build the tables and (unless `plots` is off) every plot; returns the table and the files written."""
    runs = load_runs(paths)
    df = build_table(runs)
    out_dir = Path(out) if out else (find_run_dirs(paths)[0].parent / "report")
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [out_dir / "report.csv", out_dir / "report.md"]
    df.to_csv(files[0], index=False)
    auc = speed_quality_auc(df)
    if not auc.empty:
        files.append(out_dir / "speed_quality_auc.csv")
        auc.to_csv(files[-1], index=False)
    if df["dataset"].nunique() > 1:
        files.append(out_dir / "summary_by_task.csv")
        across_tasks(df).to_csv(files[-1], index=False)
    def labels(r: dict) -> tuple[str, str]:
        trained = " (tr)" if uses_trained_exits(r["run"]) else ""
        return method_label(r["run"]), short_label(r["run"]["strategy"], r["run"]["knobs"]) + trained

    bt, bfiles = time_breakdown.write(runs, df, out_dir, labels, plots)
    extra = "\n" + time_breakdown.markdown(bt, time_breakdown.baseline_ms(df)) + "\n" if bt is not None else ""
    files[1].write_text(markdown(df) + extra, encoding="utf-8")
    files += bfiles
    if plots:
        files += plot_speed_quality(df, out_dir)
        files += plot_exit_layers(runs, out_dir)
        files += plot_sweep(df, out_dir)
    return df, files


def main(argv: Optional[list[str]] = None) -> int:
    from .cli import Parser

    p = Parser(prog="python -m harness.report", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", help="run directories, folders above them, or globs")
    p.add_argument("--out", default=None,
                   help="output folder for report.csv, report.md and PNGs (default: report/ beside the first run)")
    p.add_argument("--no_plots", action="store_true", help="tables only (CSV, Markdown): no PNGs")
    a = p.parse_args(argv)
    df, files = write_report(a.paths, a.out, plots=not a.no_plots)
    print(markdown(df))
    print("wrote: " + ", ".join(str(f) for f in files))
    return 0


if __name__ == "__main__":
    from .cli import run_main

    sys.exit(run_main(main))
