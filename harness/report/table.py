"""The report table: one row per complete run, with its decode speedup and quality deltas (and their intervals)
against its paired baseline, its degenerate-output flag, and a lossless method's exactness against the baseline."""
from __future__ import annotations

import json
import math
import os
from typing import Optional

import numpy as np
import pandas as pd

from .. import exactness, oracle
from ..logs import tau
from ..metrics import PRIMARY_ORDER, SCORE_KEYS
from . import consistency, guards
from .labels import assign_labels, exits_status, method_fact, method_label
from .pairing import baseline_for, is_baseline
from .runs import field, not_tabled
from .stats import SPEEDUP_COLS, bootstrap_mean_ci, speedup_stats

QUALITY = list(SCORE_KEYS)  # rouge1, rouge2, rougeL, exact_match, pass_at_1
DEGENERATE_SHARE = 0.5  # a row is degenerate when at least this share of its examples is empty


def _is_empty(prediction) -> bool:
    return not str(prediction or "").strip()


def _per_example(run: dict) -> pd.DataFrame:
    """One row per example id (its first record): timings, quality scores, and whether its output is empty."""
    rows = []
    for e in run["examples"]:
        row = {"id": str(e["id"]), "prompt_sha256": e.get("prompt_sha256"),
               "decode_time_per_token": e.get("decode_time_per_token"), "prefill_seconds": e.get("prefill_seconds"),
               "e2e_tokens_per_second": e.get("e2e_tokens_per_second"), "total_seconds": e.get("total_seconds"),
               "empty": _is_empty(e.get("prediction"))}
        row.update({k: e["metrics"].get(k) for k in QUALITY})
        rows.append(row)
    cols = ["id", "prompt_sha256", "decode_time_per_token", "prefill_seconds", "e2e_tokens_per_second",
            "total_seconds", "empty", *QUALITY]
    return pd.DataFrame(rows, columns=cols).drop_duplicates("id")


def output_flag(run: dict) -> tuple[int, int, str]:
    """(empty examples, examples, flag): flag is "degenerate (k/n empty)" when at least half are empty, else ""."""
    ex = _per_example(run)
    k, n = int(ex["empty"].sum()), len(ex)
    return k, n, (f"degenerate ({k}/{n} empty)" if n and k >= DEGENERATE_SHARE * n else "")


def _median(s: pd.Series) -> float:
    s = pd.to_numeric(s, errors="coerce").dropna()
    return float(s.median()) if len(s) else math.nan


def _quantile(s: pd.Series, q: float) -> float:
    s = pd.to_numeric(s, errors="coerce").dropna()
    return float(s.quantile(q)) if len(s) else math.nan


def is_lossless(strategy: str) -> bool:
    """The generator registry's word on whether a method's greedy output must equal greedy autoregressive output."""
    return bool(method_fact(strategy, "lossless", False))


EXACT_COUNTS = ("identical", "near_tie", "real", "unknown", "n_compared")  # report.csv columns (integers)


def exactness_stats(run: dict, base: Optional[dict]) -> dict:
    """A greedy lossless run's tokens against its baseline's, example by example (paired by id and prompt hash, as
    the speedups are): counts per harness.exactness kind, the largest margin of a REAL mismatch, and the dtype's
    tolerance. {} (blank columns) for lossy, sampled or unpaired rows, and for the baseline itself."""
    info = run["run"]
    sample = field(info, "generation", "sample")
    if base is None or base is run or sample is None or sample or not is_lossless(info["strategy"]):
        return {}
    # the first record of an id wins, as in _per_example
    first = lambda recs: {str(e["id"]): e for e in reversed(recs)}  # noqa: E731
    ref, dtype = first(base["examples"]), field(info, "model", "dtype") or "float32"
    pairs = [(e, ref[i]) for i, e in first(run["examples"]).items()
             if i in ref and ref[i].get("prompt_sha256") == e.get("prompt_sha256")]
    matches = [exactness.compare(e["token_ids"], b["token_ids"], b.get("top2_gaps"), dtype) for e, b in pairs
               if e.get("token_ids") is not None and b.get("token_ids") is not None]
    if not matches:
        return {}
    s = exactness.summarize(matches)
    real = [m.margin for m in matches if m.kind == "real"]
    return {"identical": s["identical"], "near_tie": s["near-tie"], "real": s["real"], "unknown": s["unknown"],
            "n_compared": s["n"], "real_margin_max": max(real) if real else math.nan,
            "tolerance": exactness.tolerance(dtype)}


def build_table(runs: list[dict]) -> pd.DataFrame:
    """One row per complete run, with decode speedup and quality deltas (and their CIs) against its matched
    baseline. Runs that are not complete or have no examples are no rows: they are in
    `df.attrs["not_in_tables"]` (run id, dataset, method, status, examples), which `markdown` lists."""
    tabled = [r for r in runs if not_tabled(r) is None]
    labels = assign_labels(tabled)
    rows = []
    per_example_consistency: dict = {}  # run id -> {example id: (ROUGE-L, token agreement)}, for the Spec-Bench table
    for run in tabled:
        info, summ = run["run"], run["summary"] or {}
        ex = _per_example(run)
        full, short = labels[id(run)]
        empty, n, flag = output_flag(run)
        row = {
            "model": info["model"]["name"], "dataset": info["task"]["name"], "strategy": info["strategy"],
            "method": full, "invocation": field(info, "schedule", "invocation") or info["run_id"],
            "series": series(info),
            "exits": exits_status(info), "label": short,
            "knobs": json.dumps(info["knobs"], sort_keys=True), "control": bool(info.get("control", False)),
            "run_id": info["run_id"], "status": summ.get("status", "no summary"), "n": n,
            "empty_outputs": empty, "degenerate": bool(flag), "flag": flag,
            "decode_ms_per_token_median": 1e3 * _median(ex["decode_time_per_token"]),
            "decode_ms_per_token_q25": 1e3 * _quantile(ex["decode_time_per_token"], 0.25),
            "decode_ms_per_token_q75": 1e3 * _quantile(ex["decode_time_per_token"], 0.75),
            "prefill_seconds_median": _median(ex["prefill_seconds"]),
            "e2e_tokens_per_second_median": _median(ex["e2e_tokens_per_second"]),
            "avg_exit_layer": summ.get("avg_exit_layer"), "acceptance_rate": summ.get("acceptance_rate"),
            "tau": tau(run["examples"]), "oracle_speedup": oracle.run_oracle(info, run["examples"]),
            "layer_forwards_per_token": summ.get("layer_forwards_per_token"),
            "exit_head_flops_per_token": summ.get("exit_head_flops_per_token"),
            "confidence_flops_per_token": summ.get("confidence_flops_per_token"),
            "kv_fill_flops_per_token": summ.get("kv_fill_flops_per_token"),
        }
        for k in QUALITY:
            row[k] = float(ex[k].dropna().mean()) if ex[k].notna().any() else math.nan
            row[f"{k}_q25"], row[f"{k}_q75"] = _quantile(ex[k], 0.25), _quantile(ex[k], 0.75)
        base, why = baseline_for(run, tabled) if not is_baseline(info) else (run, None)
        if base is None:
            row.update(baseline=why, speedup_note=why, n_paired=0, latency_ratio=math.nan,
                       **speedup_stats(np.array([])))
            for k in QUALITY:
                row.update({f"delta_{k}": math.nan, f"delta_{k}_ci95_low": math.nan,
                            f"delta_{k}_ci95_high": math.nan, f"delta_{k}_n": 0})
        else:
            paired = ex.merge(_per_example(base), on=["id", "prompt_sha256"], suffixes=("", "_base"))
            ratio = (pd.to_numeric(paired["decode_time_per_token_base"]) /
                     pd.to_numeric(paired["decode_time_per_token"])).dropna().to_numpy()
            # a run id in `baseline`; why there is no speedup in `speedup_note` (here: nothing to time)
            row.update(baseline=base["run"]["run_id"], n_paired=len(ratio), **speedup_stats(ratio),
                       speedup_note="" if len(ratio) else "nothing to time: no example has a decode step in both runs")
            # dataset level: total time (prefill + decode) of the method / of the baseline over the paired examples
            tot = paired[["total_seconds", "total_seconds_base"]].apply(pd.to_numeric, errors="coerce").dropna()
            row["latency_ratio"] = float(tot["total_seconds"].sum() / tot["total_seconds_base"].sum()) \
                if len(tot) and tot["total_seconds_base"].sum() > 0 else math.nan
            for k in QUALITY:
                d = pd.to_numeric(paired[k] - paired[f"{k}_base"], errors="coerce").dropna().to_numpy(float)
                lo, hi = bootstrap_mean_ci(d)
                row.update({f"delta_{k}": float(d.mean()) if len(d) else math.nan, f"delta_{k}_ci95_low": lo,
                            f"delta_{k}_ci95_high": hi, f"delta_{k}_n": len(d)})
        row.update(exactness_stats(run, base))
        per = consistency.per_example(run, base)
        row.update(consistency.means(per.values()) if per else {})
        row["never_engaged"] = guards.never_engaged(run)
        row["against_verdict"] = guards.against_verdict(run)
        per_example_consistency[info["run_id"]] = per
        rows.append(row)
    df = pd.DataFrame(rows, columns=_COLUMNS)
    # accept_pos_1..K only when some row drafted with per-step counts (older reports keep their columns)
    for col, values in guards.position_columns([guards.acceptance_by_position(r) for r in tabled]).items():
        df[col] = values
    df[list(EXACT_COUNTS)] = df[list(EXACT_COUNTS)].astype("Int64")  # counts, blank where not compared (not 8.0)
    if len(df):
        df["_order"] = [0 if is_baseline(r["run"]) else 1 if r["run"].get("control") else 2 for r in tabled]
        df = df.sort_values(["model", "dataset", "_order", "decode_speedup"], ascending=[True, True, True, False],
                            na_position="last").drop(columns="_order")
    df = df.reset_index(drop=True)
    df.attrs["not_in_tables"] = [
        {"run": r["run"]["run_id"], "dataset": r["run"]["task"]["name"],
         "method": method_label(r["run"]) + (" (A/A control)" if r["run"].get("control") else ""),
         "status": not_tabled(r), "examples": len(r["examples"])} for r in runs if not_tabled(r) is not None]
    df.attrs["consistency"] = per_example_consistency
    return df


def series(info: dict) -> str:
    """The folder the run's benchmark.py invocation wrote to (the last part of its --output_dir), "" without one:
    what the same configuration run by two invocations on every task (results/reference's trained_exits and
    drafters) is told apart by across tasks, where the per-task invocation id differs from task to task."""
    cmd = [str(a) for a in info.get("command") or []]
    for i, a in enumerate(cmd):
        if a.startswith("--output_dir="):
            return os.path.basename(os.path.normpath(a.split("=", 1)[1]))
        if a == "--output_dir" and i + 1 < len(cmd):
            return os.path.basename(os.path.normpath(cmd[i + 1]))
    return ""


_COLUMNS = [
    "model", "dataset", "strategy", "method", "invocation", "series", "exits", "label", "knobs", "control", "run_id",
    "status",
    "n", "empty_outputs", "degenerate", "flag", "decode_ms_per_token_median", "decode_ms_per_token_q25",
    "decode_ms_per_token_q75", "prefill_seconds_median", "e2e_tokens_per_second_median", "avg_exit_layer",
    "acceptance_rate", "tau", "layer_forwards_per_token", "exit_head_flops_per_token", "confidence_flops_per_token",
    "kv_fill_flops_per_token", *[c for k in QUALITY for c in (k, f"{k}_q25", f"{k}_q75")], "baseline",
    "speedup_note", "n_paired", *SPEEDUP_COLS, "oracle_speedup", "latency_ratio",
    *[c for k in QUALITY for c in (f"delta_{k}", f"delta_{k}_ci95_low", f"delta_{k}_ci95_high", f"delta_{k}_n")],
    *EXACT_COUNTS, "real_margin_max", "tolerance", *consistency.COLUMNS, "never_engaged",
    "against_verdict",
]


def primary_quality(df: pd.DataFrame) -> Optional[str]:
    """The table's main quality metric: the first of metrics.PRIMARY_ORDER with a value, None without any."""
    for k in PRIMARY_ORDER:
        if k in df and df[k].notna().any():
            return k
    return None
