"""Run logs -> speedup/quality tables (CSV, Markdown) and plots (PNG).

    python -m harness.report RUN_DIR_OR_GLOB [...] [--out DIR] [--no_plots]

A path may be a run directory (holding run.json) or any folder above run directories (searched
recursively), or a glob. One row per run = (model, dataset, strategy, knobs). Run logs of an unknown
schema_version, or of several versions at once, are refused (one line, exit 2), as is a log that cannot
be decoded. A run that did not complete (summary.json status other than "complete", or none) or has no
examples is not a row of any table: it is listed under "Runs not in the tables" with its status.

Speed is decode time per generated token (prefill excluded: every method shares it; it is reported on
its own). A row's baseline is a full-depth `autoregressive` run (not the A/A control) that matches it on
every field that changes what is measured (model, checkpoint, device, dtype, data file content,
example ids and prompt hashes, n_shot, protocol, seed, max_steps, fixed_length, sampling, chat template,
world size); one from the same invocation folder is preferred. If none matches, the row names the field that
differs and has no speedup. `decode speedup` is the MEDIAN OF PER-EXAMPLE RATIOS (baseline decode
time/token / method decode time/token, examples paired by id and prompt hash), with its IQR and min-max.
Quality deltas are paired mean differences (method - baseline, same pairing). Both get a bootstrap 95%
interval (of the median ratio, of the mean difference) only from 10 pairs on; below that the report says
"n too small". The report's prose states a finding only when its interval excludes "no effect" (1.0 for a
speedup, 0 for a quality delta); otherwise it says "not distinguishable from the baseline".

Degenerate output: an example is degenerate when its scored prediction text (the record's `prediction`,
already cut at the first stop) is empty or whitespace-only after stripping, e.g. the model emitted only
a stop such as "\\n\\n". A row is degenerate when at least half of its examples are; it is flagged as
"degenerate (k/n empty)" in every table (report.csv `flag`, the per-task tables, the summary across tasks,
the time breakdown) and its speedup is never stated as a finding (it times output that is not there).

Speculation: `tau` is decoded tokens per full-depth pass (harness.logs.tau; plain decoding 1.00), for rows whose
records count verify_passes. `oracle speedup` is what the run's own counts would give under the cost curve measured
in its invocation (run.json cost_curve) with no overheads (formula: harness/oracle.py); blank without a curve.
Exactness: a greedy lossless method's (the generator registry's `lossless`) tokens are compared with its baseline's
on each paired example (harness.exactness, at the run's dtype): `identical to AR` counts identical outputs and
classifies the rest as near-tie (plain decoding's top-2 logit gap where they part is below the dtype's tolerance),
REAL (at or above it: a bug, stated as one under the table) or unknown (the baseline logged no gaps).

Labels: the full label lists every knob; the short one (summary, plots) its key knobs. A knob the run took
from the exit artifact (run.json knobs.trained_defaults) carries a `*` in both. When two configurations
would share a short label, both get the full one: no two rows of a table share a label while differing
in knobs. The `exits` column says whether the method read exits: trained (an exit artifact was attached),
untrained, or "not read" (the full-depth baseline, transformers' peers), "(attached)" when the artifact
was loaded anyway. The A/A control row (a second copy of the baseline in the same rotation) gives the
noise floor; when its median is more than 5% from 1.0 the report says which speedups cannot be told from
1.0. speed_quality_auc.csv: the area under each method's speed-quality curve, one curve per sweep (rows
of one strategy and `exits` that differ in one numeric knob only) or per single configuration, never pooled
across configurations; degenerate rows are left out.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import sys
import textwrap
import zlib
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from . import exactness, oracle, time_breakdown
from .config import UsageError
from .logs import SCHEMA_VERSION, read_run, tau
from .metrics import SCORE_KEYS

QUALITY = list(SCORE_KEYS)  # rouge1, rouge2, rougeL, exact_match, pass_at_1
BOOTSTRAP = 2000
READABLE_SCHEMAS = frozenset({2, SCHEMA_VERSION})  # 2: the committed reference logs
DEGENERATE_SHARE = 0.5  # a row is degenerate when at least this share of its examples is empty
ARTIFACT_MARK = "*"  # marks a knob taken from the exit artifact (run.json knobs.trained_defaults)


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


# -- loading: refuse what the report does not understand -------------------------------------------
_RUN_KEYS = ("run_id", "strategy", "knobs", "task", "model")
_EXAMPLE_KEYS = ("id", "prediction", "metrics", "decode_time_per_token", "exit_layers")


def _check_versions(runs: list[dict]) -> None:
    """One readable schema_version across all runs, or one line naming what was found."""
    seen: dict = {}
    for r in runs:
        version = r["run"].get("schema_version") if isinstance(r["run"], dict) else None
        seen.setdefault(version, []).append(r["path"])
    unknown = [v for v in seen if v not in READABLE_SCHEMAS]
    if unknown or len(seen) > 1:
        found = ", ".join(f"{v} ({len(ds)} run{'s' * (len(ds) > 1)}, e.g. {ds[0]})"
                          for v, ds in sorted(seen.items(), key=lambda kv: str(kv[0])))
        raise UsageError(f"run logs of schema_version {found}: this report reads version "
                         f"{'/'.join(map(str, sorted(READABLE_SCHEMAS)))}, one version at a time "
                         "(report the others separately)")


def _check_shape(d: Path, r: dict) -> None:
    """The fields the report reads, so that a foreign or damaged log is one line, not a traceback."""
    info = r["run"]
    missing = [k for k in _RUN_KEYS if k not in info] if isinstance(info, dict) else ["everything"]
    if missing or not isinstance(info["knobs"], dict) or not isinstance(info["task"], dict) \
            or not isinstance(info["model"], dict) or "name" not in info["task"] or "name" not in info["model"]:
        raise UsageError(f"{d}/run.json is not a run log of this harness (missing or malformed: "
                         f"{', '.join(missing) or 'knobs/task/model'})")
    for i, e in enumerate(r["examples"]):
        if not isinstance(e, dict) or any(k not in e for k in _EXAMPLE_KEYS) or not isinstance(e["metrics"], dict):
            raise UsageError(f"{d}: examples line {i + 1} is not an example record of this harness")
    if r["summary"] is not None and not isinstance(r["summary"], dict):
        raise UsageError(f"{d}/summary.json is not a summary of this harness")


def load_runs(paths: list[str]) -> list[dict]:
    runs = []
    for d in find_run_dirs(paths):
        try:
            r = read_run(d)
        except (OSError, ValueError, EOFError, zlib.error) as e:  # JSON, UTF-8 and gzip errors are among these
            msg = " ".join(str(e).split())[:160]
            raise UsageError(f"{d}: unreadable run log ({type(e).__name__}: {msg})") from None
        r["path"] = d
        runs.append(r)
    _check_versions(runs)
    for r in runs:
        _check_shape(r["path"], r)
    return runs


def not_tabled(run: dict) -> Optional[str]:
    """None when the run belongs in the tables, else its status (why it is listed apart)."""
    summ = run["summary"]
    if summ is None:
        return "no summary.json (still running, or killed before writing it)"
    status = summ.get("status")
    if status != "complete":
        return f"{status}" + (f": {summ['error']}" if summ.get("error") else "")
    if not run["examples"]:
        return "complete, but 0 examples"
    return None


def _get(info: dict, *keys: str):
    for k in keys:
        info = info.get(k) if isinstance(info, dict) else None
    return info


# -- labels -----------------------------------------------------------------------------------------
def _full_depth(info: dict) -> bool:
    return info["strategy"] == "autoregressive" and info["knobs"].get("exit_layer") is None


def reads_exits(info: dict) -> bool:
    """Whether the method decodes through early exits (the registry's `reads_exits`; full depth reads none)."""
    if not method_fact(info["strategy"], "reads_exits", True):
        return False
    return not info["strategy"].startswith("hf_") and not _full_depth(info)


def uses_trained_exits(info: dict) -> bool:
    """Whether a run's method went through trained exits: an artifact was attached and the method reads them."""
    return bool(_get(info, "model", "exits") or info["knobs"].get("trained_defaults")) and reads_exits(info)


def exits_status(info: dict) -> str:
    """The `exits` column: trained / untrained, or not read (the artifact attached or not)."""
    if reads_exits(info):
        return "trained" if uses_trained_exits(info) else "untrained"
    return "not read (attached)" if _get(info, "model", "exits") else "not read"


def _artifact_knobs(knobs: dict) -> dict:
    return knobs.get("trained_defaults") or {}


def _shown_knobs(knobs: dict) -> dict:
    """Knobs that change behaviour (None / "none" = off), plus every knob taken from the artifact."""
    art = _artifact_knobs(knobs)
    return {k: v for k, v in sorted(knobs.items())
            if k != "trained_defaults" and (k in art or (v is not None and v != "none"))}


def method_label(info: dict) -> str:
    """Strategy + every knob (`*` = taken from the exit artifact), marked `[trained exits]` when it used them."""
    knobs = info["knobs"]
    art = _artifact_knobs(knobs)
    shown = " ".join(f"{k}={v}" + (ARTIFACT_MARK if k in art else "") for k, v in _shown_knobs(knobs).items())
    trained = " [trained exits]" if uses_trained_exits(info) else ""
    return info["strategy"] + (" " + shown if shown else "") + trained


def method_fact(strategy: str, fact: str, default=None):
    """A fact a registered generator class states about itself (short label, plot family, lossless...)."""
    from .generators import load_all

    value = getattr(load_all().get(strategy), fact, None)
    return default if value in (None, "") else value


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
    parts += [(key, SHORT_KNOB.get(key, f"{key}=") + _short_value(v)) for key, v in sorted(art.items())
              if key not in shown]
    text = [t + (ARTIFACT_MARK if key in art else "") for key, t in parts]
    return " ".join([method_fact(strategy, "short", strategy), *text])


def _identity(info: dict) -> str:
    """What makes two rows the same configuration: strategy, knobs (and their provenance), control."""
    knobs = info["knobs"]
    return json.dumps([info["strategy"], _shown_knobs(knobs), sorted(_artifact_knobs(knobs)),
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


def _is_baseline(run: dict) -> bool:
    """A full-depth autoregressive run that is not the A/A control."""
    return run["strategy"] == "autoregressive" and not run["knobs"].get("exit_layer") and not run.get("control")


def is_baseline_row(r) -> bool:
    """`_is_baseline` for a row of the report table (knobs as JSON)."""
    return _is_baseline({"strategy": r["strategy"], "knobs": json.loads(r["knobs"] or "{}"),
                         "control": bool(r["control"])})


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
    cands.sort(key=lambda r: (r["path"].parent == run["path"].parent, r["run"].get("created") or ""), reverse=True)
    for c in cands:
        if pairing_mismatch(info, c["run"]) is None:
            return c, None
    return None, "not paired: " + pairing_mismatch(info, cands[0]["run"])


# -- statistics -------------------------------------------------------------------------------------
def _bootstrap_median(x: np.ndarray, seed: int = 0) -> tuple[float, float]:
    if len(x) < 2:
        return (float(x[0]), float(x[0])) if len(x) else (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    meds = np.median(rng.choice(x, size=(BOOTSTRAP, len(x)), replace=True), axis=1)
    return float(np.percentile(meds, 2.5)), float(np.percentile(meds, 97.5))


def bootstrap_mean_ci(d: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """Paired bootstrap 95% interval of a mean difference (pairs resampled together), from MIN_PAIRS_FOR_CI on."""
    if len(d) < MIN_PAIRS_FOR_CI:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = np.asarray(d, dtype=float)[rng.integers(0, len(d), size=(BOOTSTRAP, len(d)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


MIN_PAIRS_FOR_CI = 10  # below this a bootstrap interval means little: min-max is shown instead
CONTROL_BAND = 0.05  # an A/A control further than this from 1.0 makes small speedups unreadable
SPEEDUP_COLS = ("decode_speedup", "decode_speedup_q25", "decode_speedup_q75", "decode_speedup_min",
                "decode_speedup_max", "decode_speedup_ci95_low", "decode_speedup_ci95_high")
NOT_DISTINGUISHABLE = "not distinguishable from the baseline"


def _is_empty(prediction) -> bool:
    return not str(prediction or "").strip()


def _per_example(run: dict) -> pd.DataFrame:
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


def speedup_stats(ratio: np.ndarray) -> dict:
    """Median of per-example ratios with IQR, min-max, and a bootstrap 95% CI only from MIN_PAIRS_FOR_CI pairs."""
    if not len(ratio):
        return {c: math.nan for c in SPEEDUP_COLS}
    lo, hi = _bootstrap_median(ratio) if len(ratio) >= MIN_PAIRS_FOR_CI else (math.nan, math.nan)
    return dict(zip(SPEEDUP_COLS, (float(np.median(ratio)), float(np.percentile(ratio, 25)),
                                   float(np.percentile(ratio, 75)), float(ratio.min()), float(ratio.max()), lo, hi)))


def speed_verdict(r) -> str:
    """What a row's speedup says: "faster" / "slower" (95% CI excludes 1.0), NOT_DISTINGUISHABLE,
    "n too small" (no CI), or "none" (no speedup)."""
    if pd.isna(r.get("decode_speedup", math.nan)):
        return "none"
    lo, hi = r.get("decode_speedup_ci95_low", math.nan), r.get("decode_speedup_ci95_high", math.nan)
    if r.get("n_paired", 0) < MIN_PAIRS_FOR_CI or pd.isna(lo) or pd.isna(hi):
        return "n too small"
    return "faster" if lo > 1.0 else "slower" if hi < 1.0 else NOT_DISTINGUISHABLE


def quality_verdict(r, q: str) -> str:
    """What a row's delta of metric q says: "higher" / "lower" (95% CI excludes 0), NOT_DISTINGUISHABLE,
    "n too small" or "none"."""
    if pd.isna(r.get(f"delta_{q}", math.nan)):
        return "none"
    lo, hi = r.get(f"delta_{q}_ci95_low", math.nan), r.get(f"delta_{q}_ci95_high", math.nan)
    if r.get(f"delta_{q}_n", 0) < MIN_PAIRS_FOR_CI or pd.isna(lo) or pd.isna(hi):
        return "n too small"
    return "higher" if lo > 0.0 else "lower" if hi < 0.0 else NOT_DISTINGUISHABLE


def is_lossless(strategy: str) -> bool:
    """The generator registry's word on whether a method's greedy output must equal greedy autoregressive output."""
    return bool(method_fact(strategy, "lossless", False))


EXACT_COUNTS = ("identical", "near_tie", "real", "unknown", "n_compared")  # report.csv columns (integers)


def exactness_stats(run: dict, base: Optional[dict]) -> dict:
    """A greedy lossless run's tokens against its baseline's, example by example (paired by id and prompt hash, as
    the speedups are): counts per harness.exactness kind, the largest margin of a REAL mismatch, and the dtype's
    tolerance. {} (blank columns) for lossy, sampled or unpaired rows, and for the baseline itself."""
    info = run["run"]
    sample = _get(info, "generation", "sample")
    if base is None or base is run or sample is None or sample or not is_lossless(info["strategy"]):
        return {}
    # the first record of an id wins, as in _per_example
    first = lambda recs: {str(e["id"]): e for e in reversed(recs)}  # noqa: E731
    ref, dtype = first(base["examples"]), _get(info, "model", "dtype") or "float32"
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
    for run in tabled:
        info, summ = run["run"], run["summary"] or {}
        ex = _per_example(run)
        full, short = labels[id(run)]
        empty, n, flag = output_flag(run)
        row = {
            "model": info["model"]["name"], "dataset": info["task"]["name"], "strategy": info["strategy"],
            "method": full, "invocation": _get(info, "schedule", "invocation") or info["run_id"],
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
        base, why = _baseline_for(run, tabled) if not _is_baseline(info) else (run, None)
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
        rows.append(row)
    df = pd.DataFrame(rows, columns=_COLUMNS)
    df[list(EXACT_COUNTS)] = df[list(EXACT_COUNTS)].astype("Int64")  # counts, blank where not compared (not 8.0)
    if len(df):
        df["_order"] = [0 if _is_baseline(r["run"]) else 1 if r["run"].get("control") else 2 for r in tabled]
        df = df.sort_values(["model", "dataset", "_order", "decode_speedup"], ascending=[True, True, True, False],
                            na_position="last").drop(columns="_order")
    df = df.reset_index(drop=True)
    df.attrs["not_in_tables"] = [
        {"run": r["run"]["run_id"], "dataset": r["run"]["task"]["name"],
         "method": method_label(r["run"]) + (" (A/A control)" if r["run"].get("control") else ""),
         "status": not_tabled(r), "examples": len(r["examples"])} for r in runs if not_tabled(r) is not None]
    return df


_COLUMNS = [
    "model", "dataset", "strategy", "method", "invocation", "exits", "label", "knobs", "control", "run_id", "status",
    "n", "empty_outputs", "degenerate", "flag", "decode_ms_per_token_median", "decode_ms_per_token_q25",
    "decode_ms_per_token_q75", "prefill_seconds_median", "e2e_tokens_per_second_median", "avg_exit_layer",
    "acceptance_rate", "tau", "layer_forwards_per_token", "exit_head_flops_per_token", "confidence_flops_per_token",
    "kv_fill_flops_per_token", *[c for k in QUALITY for c in (k, f"{k}_q25", f"{k}_q75")], "baseline",
    "speedup_note", "n_paired", *SPEEDUP_COLS, "oracle_speedup", "latency_ratio",
    *[c for k in QUALITY for c in (f"delta_{k}", f"delta_{k}_ci95_low", f"delta_{k}_ci95_high", f"delta_{k}_n")],
    *EXACT_COUNTS, "real_margin_max", "tolerance",
]


def primary_quality(df: pd.DataFrame) -> Optional[str]:
    for k in ("rougeL", "exact_match", "pass_at_1"):
        if k in df and df[k].notna().any():
            return k
    return None


def _tagged(r) -> str:
    """A row's short label with `(tr)` when it read trained exits (how plots and prose name it)."""
    return r["label"] + (" (tr)" if r.get("exits") == "trained" else "")


def control_notes(g: pd.DataFrame) -> list[str]:
    """What the A/A control says about the noise floor of one (model, dataset) table."""
    ctl = g[g["control"] & g["decode_speedup"].notna()]
    if ctl.empty:
        return ["No A/A control in these runs: the noise floor is unknown (run the configurations in one "
                "invocation with --strategies or --sweep to get one)."]
    notes = []
    for _, c in ctl.iterrows():
        dev = abs(c["decode_speedup"] - 1.0)
        note = (f"A/A control (the baseline timed against itself): {c['decode_speedup']:.3f}x "
                f"[IQR {c['decode_speedup_q25']:.3f}-{c['decode_speedup_q75']:.3f}, "
                f"min-max {c['decode_speedup_min']:.3f}-{c['decode_speedup_max']:.3f}], n={c['n_paired']}")
        verdict = speed_verdict(c)
        if verdict == "n too small":
            note += " (n too small for a CI)."
        elif verdict == NOT_DISTINGUISHABLE:
            note += (f", 95% CI {c['decode_speedup_ci95_low']:.3f}-{c['decode_speedup_ci95_high']:.3f}: "
                     f"{NOT_DISTINGUISHABLE}, as it should be.")
        else:
            note += (f", 95% CI {c['decode_speedup_ci95_low']:.3f}-{c['decode_speedup_ci95_high']:.3f}: it differs "
                     f"from 1.0, so two identical configurations differ by about {100 * dev:.1f}% here.")
        if c.get("flag"):
            note += f" Its output is {c['flag']}, as the baseline's: it is timed on the examples with a decode step."
        notes.append(note)
        if dev > CONTROL_BAND:
            notes.append(f"WARNING: the A/A control is {100 * dev:.1f}% away from 1.0 (more than "
                         f"{100 * CONTROL_BAND:.0f}%): speedups between {1 - dev:.2f}x and {1 + dev:.2f}x cannot be "
                         "told from 1.0 in this measurement.")
    return notes


def exactness_notes(g: pd.DataFrame) -> list[str]:
    """Lossless methods whose greedy output is not plain greedy decoding's: a REAL mismatch is a bug line; mismatches
    that cannot be classified (the baseline logged no top-2 gaps) are said to be so."""
    notes = []
    for _, r in g.iterrows():
        if not pd.isna(r["real"]) and r["real"] > 0:
            notes.append(f"BUG: lossless method {_tagged(r)} differs from autoregressive at a clear margin on "
                         f"{r['real']} example{'s' * (r['real'] > 1)} (max margin {r['real_margin_max']:.4g} >= "
                         f"tolerance {r['tolerance']:.4g}).")
        if not pd.isna(r["unknown"]) and r["unknown"] > 0:
            notes.append(f"Lossless method {_tagged(r)} differs from autoregressive on {r['unknown']} "
                         f"example{'s' * (r['unknown'] > 1)} where the baseline logged no top-2 logit gaps: near-tie "
                         "or real cannot be told.")
    return notes


def findings(g: pd.DataFrame) -> list[str]:
    """The prose of one (model, dataset) table: a speedup or a quality delta is stated only when its 95% CI
    excludes no effect; degenerate rows are never a finding, whatever their speedup."""
    q = primary_quality(g)
    rows = g[~g["control"].astype(bool) & ~g.apply(is_baseline_row, axis=1)]
    notes = []
    base_flags = sorted({f for f in g[g.apply(is_baseline_row, axis=1)]["flag"] if f})
    if base_flags:
        notes.append(f"The baseline's own output is {' / '.join(base_flags)} here: configurations that reproduce it "
                     "are flagged too, and their speedups are not findings.")
    degenerate = rows[rows["degenerate"].astype(bool)]
    if len(degenerate):
        notes.append("Degenerate output (empty or whitespace-only on at least half the examples; no finding, "
                     "whatever the speedup): " + ", ".join(f"{_tagged(r)} ({r['flag'].split('(')[1]}"
                                                            for _, r in degenerate.iterrows()) + ".")
    rows = rows[~rows["degenerate"].astype(bool)]
    speed: dict = {}
    for _, r in rows.iterrows():
        v = speed_verdict(r)
        cell = _tagged(r) + (f" {r['decode_speedup']:.2f}x [{r['decode_speedup_ci95_low']:.2f}-"
                             f"{r['decode_speedup_ci95_high']:.2f}]" if v in ("faster", "slower") else "")
        speed.setdefault(v, []).append(cell)
    for v, text in (("faster", "Faster than the baseline (decode speedup 95% CI above 1.0)"),
                    ("slower", "Slower than the baseline (95% CI below 1.0)"),
                    (NOT_DISTINGUISHABLE, "Decode speed " + NOT_DISTINGUISHABLE + " (95% CI includes 1.0)"),
                    ("n too small", "Decode speed: n too small for a CI (no finding)"),
                    ("none", "No decode speedup (no paired baseline or nothing to time)")):
        if speed.get(v):
            notes.append(f"{text}: {', '.join(speed[v])}.")
    if q:
        qual: dict = {}
        for _, r in rows.iterrows():
            v = quality_verdict(r, q)
            cell = _tagged(r) + (f" {r[f'delta_{q}']:+.3f} [{r[f'delta_{q}_ci95_low']:+.3f}, "
                                 f"{r[f'delta_{q}_ci95_high']:+.3f}]" if v in ("higher", "lower") else "")
            qual.setdefault(v, []).append(cell)
        for v, text in (("lower", f"{q} lower than the baseline's (delta 95% CI below 0)"),
                        ("higher", f"{q} higher than the baseline's (delta 95% CI above 0)"),
                        (NOT_DISTINGUISHABLE, f"{q} {NOT_DISTINGUISHABLE} (95% CI includes 0)"),
                        ("n too small", f"{q}: n too small for a CI (no finding)")):
            if qual.get(v):
                notes.append(f"{text}: {', '.join(qual[v])}.")
    return notes


def _fmt(v, f: str, scale: float = 1.0) -> str:
    return "-" if v is None or pd.isna(v) else format(v * scale, f)


def _exact_cell(r) -> str:
    """`identical to AR`: "identical/compared", then the mismatches by kind ("8/10 (2 near-tie)", "9/10 (1 REAL)")."""
    if pd.isna(r["n_compared"]):
        return "-"
    kinds = [f"{r[k]} {name}" for k, name in (("near_tie", "near-tie"), ("real", "REAL"), ("unknown", "unknown"))
             if r[k]]
    return f"{r['identical']}/{r['n_compared']}" + (f" ({', '.join(kinds)})" if kinds else "")


def _speedup_cell(r) -> str:
    if pd.isna(r["decode_speedup"]):
        return str(r["speedup_note"]) or "-"
    return f"{r['decode_speedup']:.2f}x [{r['decode_speedup_q25']:.2f}-{r['decode_speedup_q75']:.2f}]"


def _spread_cell(r) -> str:
    if pd.isna(r["decode_speedup"]):
        return f"n={r['n_paired']}"
    if r["n_paired"] >= MIN_PAIRS_FOR_CI:
        return f"95% CI {r['decode_speedup_ci95_low']:.2f}-{r['decode_speedup_ci95_high']:.2f}, n={r['n_paired']}"
    return (f"min-max {r['decode_speedup_min']:.2f}-{r['decode_speedup_max']:.2f}, n={r['n_paired']} "
            f"(n too small for a CI)")


def _stat(v, lo, hi, n: int, f: str, unit: str = "", sep: str = "-", small: str = "n too small") -> str:
    """A median or mean with its 95% CI and n, or "n too small" below MIN_PAIRS_FOR_CI pairs."""
    s = format(v, f) + unit
    if n < MIN_PAIRS_FOR_CI or pd.isna(lo) or pd.isna(hi):
        return f"{s} n={n} ({small})"
    return f"{s} [{format(lo, f)}{sep}{format(hi, f)}] n={n}"


def _delta_cell(r, q: str, digits: int = 4, small: str = "n too small for a CI") -> str:
    if pd.isna(r[f"delta_{q}"]):
        return "-"
    return _stat(r[f"delta_{q}"], r[f"delta_{q}_ci95_low"], r[f"delta_{q}_ci95_high"], int(r[f"delta_{q}_n"]),
                 f"+.{digits}f", sep=", ", small=small)


def _summary_cell(r, q: Optional[str]) -> str:
    """decode speedup [95% CI] n, then the delta of metric q [95% CI] n ("n too small" under MIN_PAIRS_FOR_CI),
    prefixed by the degenerate flag."""
    if pd.isna(r["decode_speedup"]):
        speed = f"no speedup, n={r['n_paired']} ({r['speedup_note']})"
    else:
        speed = _stat(r["decode_speedup"], r["decode_speedup_ci95_low"], r["decode_speedup_ci95_high"],
                      int(r["n_paired"]), ".2f", unit="x")
    quality = f", {q} {_delta_cell(r, q, 3, small='n too small')}" if q and not pd.isna(r[f"delta_{q}"]) else ""
    return (f"{r['flag']}: " if r["flag"] else "") + speed + quality


def across_tasks(df: pd.DataFrame) -> pd.DataFrame:
    """Per method (rows: model, `exits` column, short label) and task (columns): decode speedup and the delta of
    the task's main quality metric, each with its 95% CI and n (or "n too small"), degenerate cells flagged.
    Labels are unique per configuration (`assign_labels`); the same configuration from two invocations gets the
    invocation beside its label."""
    cells: dict = {}
    for (model, dataset), g in df.groupby(["model", "dataset"], sort=False):
        q = primary_quality(g)
        for _, r in g.iterrows():
            if is_baseline_row(r):
                continue
            key = (model, r["exits"], r["label"])
            if dataset in cells.get(key, {}):  # the same configuration from another invocation
                key = (model, r["exits"], f"{r['label']} ({r['invocation']})")
            cells.setdefault(key, {})[dataset] = _summary_cell(r, q)
    rows = [{"model": m, "exits": e, "method": meth, **v} for (m, e, meth), v in cells.items()]
    return pd.DataFrame(rows).fillna("-") if rows else pd.DataFrame()


LEGEND = ("Reading the tables: `*` after a knob = taken from the exit artifact (run.json knobs.trained_defaults); "
          "`exits` = the exits the method read (trained / untrained), or `not read` (the full-depth baseline, "
          "transformers' peers; `(attached)`: the artifact was loaded anyway); `(tr)` = read trained exits. "
          "degenerate (k/n empty): the scored prediction is empty or whitespace-only on at least half the examples; "
          "its speedup times output that is not there and is never a finding. Intervals are bootstrap 95% CIs over "
          f"paired examples (median ratio for speed, mean difference for quality), only from n = {MIN_PAIRS_FOR_CI}; "
          "a finding is stated only when its CI excludes no effect (1.0x, +0). tau = decoded tokens per full-depth "
          "(verification) pass, Spec-Bench's mean accepted tokens (plain decoding 1.00); oracle speedup = what the "
          "run's own acceptance would give on the cost curve measured in its invocation with no overheads "
          "(harness/oracle.py): a large gap between it and the observed speedup is implementation overhead, a low "
          "oracle means the drafts are too poor. identical to AR (greedy lossless methods): examples whose tokens "
          "equal the baseline's; a mismatch is a near-tie when plain decoding's top-2 logit gap where they part is "
          "below the dtype's tolerance (harness/exactness.py), else REAL (a bug), or unknown (no gaps logged).")


def not_tabled_markdown(excluded: list[dict]) -> str:
    if not excluded:
        return ""
    t = pd.DataFrame(excluded, columns=["run", "dataset", "method", "status", "examples"])
    return ("### Runs not in the tables\n\nThese runs did not complete (or recorded no example): they are no row "
            "of any table and no baseline.\n\n" + t.to_markdown(index=False))


def markdown(df: pd.DataFrame) -> str:
    """Compact Markdown tables, one per (model, dataset), each followed by any lossless method's mismatches (a REAL
    one is a bug line), its A/A control note and its findings;
    with several tasks, a summary table first; last, the runs that are not in the tables."""
    out = []
    if df["dataset"].nunique() > 1:
        s = across_tasks(df)
        if not s.empty:
            out.append("### Summary across tasks (decode speedup [95% CI] n; delta of the task's main metric "
                       "[95% CI] n)\n\n" + s.to_markdown(index=False))
    if len(df):
        out.append(LEGEND)
    for (model, dataset), g in df.groupby(["model", "dataset"], sort=False):
        q = primary_quality(g)
        t = pd.DataFrame({
            "method": g["method"], "exits": g["exits"], "n": g["n"],
            "output": [r["flag"] or f"{r['empty_outputs']}/{r['n']} empty" for _, r in g.iterrows()],
            "decode ms/token (median [IQR])": [
                f"{a:.1f} [{b:.1f}-{c:.1f}]" if not pd.isna(a) else "-" for a, b, c in
                zip(g["decode_ms_per_token_median"], g["decode_ms_per_token_q25"], g["decode_ms_per_token_q75"])],
            "decode speedup (median of per-example ratios [IQR])": [_speedup_cell(r) for _, r in g.iterrows()],
            "oracle speedup": g["oracle_speedup"].map(lambda v: _fmt(v, ".2f") + "x" * (not pd.isna(v))),
            "spread": [_spread_cell(r) for _, r in g.iterrows()],
            "total time / baseline's (all examples)": g["latency_ratio"].map(lambda v: _fmt(v, ".3f")),
            "prefill s (median)": g["prefill_seconds_median"].map(lambda v: _fmt(v, ".3f")),
            "end-to-end tok/s (median)": g["e2e_tokens_per_second_median"].map(lambda v: _fmt(v, ".2f")),
            "avg exit (decoded)": g["avg_exit_layer"].map(lambda v: _fmt(v, ".1f")),
            "acceptance": g["acceptance_rate"].map(lambda v: _fmt(v, ".3f")),
            "tau": g["tau"].map(lambda v: _fmt(v, ".2f")),
            "layers/token": g["layer_forwards_per_token"].map(lambda v: _fmt(v, ".1f")),
            "head MFLOP/token": g["exit_head_flops_per_token"].map(lambda v: _fmt(v, ".1f", 1e-6)),
            "confidence MFLOP/token": g["confidence_flops_per_token"].map(lambda v: _fmt(v, ".1f", 1e-6)),
            "state-copy MFLOP/token": g["kv_fill_flops_per_token"].map(lambda v: _fmt(v, ".1f", 1e-6)),
        })
        if q:
            t[q] = [_fmt(v, ".4f") for v in g[q]]
            t[f"delta {q} [95% CI] n"] = [_delta_cell(r, q) for _, r in g.iterrows()]
        t["identical to AR"] = [_exact_cell(r) for _, r in g.iterrows()]
        # a lossless method that changed the output is a bug: said first, before the noise floor and the findings
        notes = "\n".join(f"- {n}" for n in exactness_notes(g) + control_notes(g) + findings(g))
        # tau as written ("1.00"): tabulate would reprint an all-numeric column as "1"
        table = t.to_markdown(index=False, disable_numparse=[list(t.columns).index("tau")])
        out.append(f"### {dataset} ({model})\n\n" + table + "\n\n" + notes)
    extra = not_tabled_markdown(df.attrs.get("not_in_tables", []))
    if extra:
        out.append(extra)
    return "\n\n".join(out) + "\n"


# -- plots ------------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, dpi: int = 100) -> Path:
    fig.savefig(path, dpi=dpi)
    _pyplot().close(fig)
    return path


def _pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points not dominated (higher speed and higher quality are better)."""
    keep = []
    for i, (x, y) in enumerate(points):
        if not any((x2 >= x and y2 >= y) and (x2 > x or y2 > y) for j, (x2, y2) in enumerate(points) if j != i):
            keep.append(i)
    return sorted(keep, key=lambda i: points[i][0])


FAMILY_COLOURS = {"autoregressive / static exit": "tab:gray", "speculative (lossless)": "tab:blue",
                  "per-token early exit": "tab:orange", "transformers peers": "tab:green", "other": "tab:purple"}


def family_of(strategy: str) -> tuple[str, str]:
    """(plot family, colour) of a method, from its class (generators' `family`)."""
    fam = method_fact(strategy, "family", "other")
    return fam, FAMILY_COLOURS.get(fam, "tab:purple")



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
    plt = _pyplot()

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
        labels = [_tagged(r) for _, r in g.iterrows()]  # degenerate: the cross marker and its legend entry
        for (x, y, text), dy in zip(zip(xs, ys, labels), _label_offsets(xs, ys)):
            ax.annotate(text, (x, y), fontsize=7.5, xytext=(4, 3 + dy), textcoords="offset points",
                        arrowprops={"arrowstyle": "-", "color": "0.7", "lw": 0.5} if dy else None)
        for fam, colour in dict(family_of(s) for s in g["strategy"]).items():
            ax.scatter([], [], c=colour, s=28, label=fam)
        if any(bad):
            ax.scatter([], [], c="0.3", s=28, marker="x", label="degenerate output (not a finding)")
        ok = [i for i, b in enumerate(bad) if not b]
        front = [ok[i] for i in _pareto([(xs[i], ys[i]) for i in ok])]
        ax.plot([xs[i] for i in front], [ys[i] for i in front], "--", color="tab:red", label="Pareto front")
        ax.set_xlabel("decode speedup over autoregressive (median of per-example ratios, IQR bars)" if use_speedup
                      else "decoded tokens/s (median)")
        ax.set_ylabel(q)
        tr = " — (tr) = trained exits, * = knob from the artifact" if (g["exits"] == "trained").any() else ""
        ax.set_title(f"{dataset} ({model}){tr}", fontsize=10)
        ax.legend(fontsize=7, loc="best", framealpha=0.7)
        ax.grid(alpha=0.25)
        files.append(_save(fig, out / f"speed_quality_{dataset}.png"))
    return files


def plot_exit_layers(runs: list[dict], out: Path, labels: Optional[dict] = None) -> list[Path]:
    """Per dataset: the distribution of per-token exit layers of every method (decoded tokens only).
    `labels`: id(run) -> (full, short) as the tables name them."""
    plt = _pyplot()

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
        files.append(_save(fig, out / f"exit_layers_{task}.png", dpi=80))
    return files


def _knobs_without(knobs: dict, *keys: str) -> str:
    return json.dumps({k: v for k, v in _shown_knobs(knobs).items() if k not in keys}, sort_keys=True, default=str)


def plot_sweep(df: pd.DataFrame, out: Path) -> list[Path]:
    """Heatmaps exit_layer x num_speculations -> speedup and acceptance (LayerSkip's sweep view), one per sweep:
    self_speculative rows of one `exits` status whose other knobs are all equal."""
    plt = _pyplot()

    files = []
    ss = df[(df["strategy"] == "self_speculative") & ~df["control"]].copy()
    if ss.empty:
        return files
    knobs = ss["knobs"].map(json.loads)
    ss["exit_layer"] = knobs.map(lambda k: k.get("exit_layer"))
    ss["num_speculations"] = knobs.map(lambda k: k.get("num_speculations"))
    ss["_fixed"] = knobs.map(lambda k: _knobs_without(k, "exit_layer", "num_speculations"))
    sweeps = [g for _, g in ss.groupby(["model", "dataset", "exits", "_fixed"], sort=False)
              if g["exit_layer"].nunique() >= 2 and g["num_speculations"].nunique() >= 2]
    for i, g in enumerate(sweeps):
        model, dataset = g["model"].iloc[0], g["dataset"].iloc[0]
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
        for ax, col, title in ((axes[0], "decode_speedup", "decode speedup (median of per-example ratios)"),
                               (axes[1], "acceptance_rate", "acceptance rate")):
            grid = g.pivot_table(index="exit_layer", columns="num_speculations", values=col, aggfunc="mean")
            im = ax.imshow(grid.to_numpy(dtype=float), cmap="viridis", aspect="auto", origin="lower")
            ax.set_xticks(range(len(grid.columns)), grid.columns)
            ax.set_yticks(range(len(grid.index)), grid.index)
            for (a, b), v in np.ndenumerate(grid.to_numpy(dtype=float)):
                ax.text(b, a, "-" if np.isnan(v) else f"{v:.2f}", ha="center", va="center", color="w", fontsize=8)
            ax.set_xlabel("num_speculations")
            ax.set_ylabel("exit_layer")
            ax.set_title(title)
            fig.colorbar(im, ax=ax)
        fig.suptitle(f"self_speculative sweep: {dataset} ({model}), exits {g['exits'].iloc[0]}")
        fig.tight_layout()
        same = sum(1 for s in sweeps[:i] if s["dataset"].iloc[0] == dataset)  # a second sweep on one dataset
        files.append(_save(fig, out / f"sweep_{dataset}{f'_{same + 1}' if same else ''}.png"))
    return files


# -- speed-quality AUC ------------------------------------------------------------------------------
def _family(row) -> str:
    """Which method a row belongs to: static exit, or the method's strategy ("" for the full-depth baseline)."""
    if row["strategy"] == "autoregressive":
        return "static exit" if json.loads(row["knobs"] or "{}").get("exit_layer") is not None else ""
    return row["strategy"]


def sweeps(rows: pd.DataFrame) -> list[tuple[str, str, pd.DataFrame]]:
    """One method's sweeps among rows of one family and `exits` status: [(swept knob, fixed knobs JSON, rows)].
    A sweep is a set of rows that differ only in one numeric knob (at least two values of it); a row in no sweep
    is a curve of its own (swept knob ""). A row of a two-knob grid belongs to one sweep per knob."""
    knobs = [json.loads(k or "{}") for k in rows["knobs"]]
    keys = sorted({k for kn in knobs for k in _shown_knobs(kn)})
    out, covered = [], set()
    for key in keys:
        groups: dict = {}
        for pos, kn in enumerate(knobs):
            groups.setdefault(_knobs_without(kn, key), []).append(pos)
        for fixed, members in sorted(groups.items()):
            values = [_shown_knobs(knobs[p]).get(key) for p in members]
            numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
            if numeric and len(set(values)) >= 2:  # a categorical knob (confidence, criteria) is another method
                out.append((key, fixed, rows.iloc[members]))
                covered.update(members)
    for pos in range(len(rows)):
        if pos not in covered:
            out.append(("", _knobs_without(knobs[pos]), rows.iloc[[pos]]))
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


def write_report(paths: list[str], out: Optional[str] = None, plots: bool = True) -> tuple[pd.DataFrame, list[Path]]:
    """Build the tables and (unless `plots` is off) every plot; returns the table and the files written."""
    runs = load_runs(paths)
    df = build_table(runs)
    tabled = [r for r in runs if not_tabled(r) is None]
    labels = assign_labels(tabled)
    out_dir = Path(out) if out else (find_run_dirs(paths)[0].parent / "report")
    try:  # before any file is written: a bad --out is one line, not a traceback half-way
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"cannot create or write the output folder {out_dir}: {e.strerror or e}") from None
    files = [out_dir / "report.csv", out_dir / "report.md"]
    df.to_csv(files[0], index=False)
    auc = speed_quality_auc(df)
    if not auc.empty:
        files.append(out_dir / "speed_quality_auc.csv")
        auc.to_csv(files[-1], index=False)
    if df["dataset"].nunique() > 1:
        files.append(out_dir / "summary_by_task.csv")
        across_tasks(df).to_csv(files[-1], index=False)

    def label(r: dict) -> tuple[str, str, str]:
        trained = " (tr)" if exits_status(r["run"]) == "trained" else ""
        full, short = labels[id(r)]
        return full, short + trained, output_flag(r)[2]

    bt, bfiles = time_breakdown.write(tabled, df, out_dir, label, plots)
    extra = "\n" + time_breakdown.markdown(bt, time_breakdown.baseline_ms(df)) + "\n" if bt is not None else ""
    files[1].write_text(markdown(df) + extra, encoding="utf-8")
    files += bfiles
    if plots:
        files += plot_speed_quality(df, out_dir)
        files += plot_exit_layers(tabled, out_dir, labels)
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
