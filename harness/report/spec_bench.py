"""Spec-Bench's figures for runs of the `spec_bench` task: per configuration and per category (each category present,
"mt_bench" = MT-bench's 8 together, "overall"), written as spec_bench.csv, a Markdown section appended to report.md,
and the heatmap spec_bench_speedup.png. Reports without a spec_bench run are not touched.

Per (configuration, category):
- decode_speedup: ours, as the main table's: the median over questions of the baseline's decode time per token over
  the configuration's, paired by question id and prompt hash (prefill excluded).
- specbench_speedup: Spec-Bench's (hemingkx/Spec-Bench evaluation/speed.py:7-69, re-derived here): per question, its
  new tokens over its wall time, summed over its turns (wall time = the whole generation, prefill included); the mean
  of that over the configuration's questions of the category (speed.py:15-22 picks them, 26-30 the speeds), divided
  by the same mean over the baseline's (speed.py:59-61). One difference, said under the table: speed.py counts the
  BASELINE's tokens by re-tokenizing its answer text (len(tokenizer(turn).input_ids) - 1 per turn, speed.py:49-55);
  we count its new_tokens, so both definitions agree exactly when re-tokenizing the text gives back the generated
  tokens plus one BOS. Questions are those of both runs (speed.py takes each file's own; the pairing makes them the
  same questions).
- tau: Spec-Bench's "mean accepted tokens" (speed.py:29 pools every step, :65 averages them): the mean over every
  target pass of every question of the tokens it produced, the prefill's first token counted as a pass of 1 (plain
  decoding 1.00); the main table's tau leaves the prefill out. Per-turn lists as harness.export writes them.
- consistency_rougeL / consistency_tokens: harness.report.consistency against the baseline, means over the questions.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from ..config import UsageError
from . import consistency
from .guards import NEVER_ENGAGED
from .labels import tagged

TASK = "spec_bench"
MT_BENCH = "mt_bench"
OVERALL = "overall"
COLUMNS = ["model", "dataset", "method", "label", "exits", "run_id", "control", "never_engaged", "baseline",
           "category", "n", "decode_speedup", "specbench_speedup", "tau", "tokens_per_second",
           "baseline_tokens_per_second", *consistency.COLUMNS]


def category_groups(present: set) -> list[tuple[str, frozenset]]:
    """(column, categories it pools): MT-bench's categories present, "mt_bench" (if any is), the others in Spec-Bench's
    order (unknown ones last, sorted), "overall" (every question, a question without a category too)."""
    from ..tasks import SPEC_BENCH_CATEGORIES, SPEC_BENCH_MT_BENCH  # only a report with a spec_bench run needs them

    known = [c for c in SPEC_BENCH_CATEGORIES if c in present]
    mt = [c for c in known if c in SPEC_BENCH_MT_BENCH]
    rest = [c for c in known if c not in SPEC_BENCH_MT_BENCH] + sorted(c for c in present - set(known) if c)
    groups = [(c, frozenset({c})) for c in mt]
    if mt:
        groups.append((MT_BENCH, frozenset(SPEC_BENCH_MT_BENCH)))
    return groups + [(c, frozenset({c})) for c in rest] + [(OVERALL, frozenset(present) | {None})]


def _answers(run: dict) -> dict:
    """question id (str) -> its Spec-Bench answer line (harness.export), {} for records without turns."""
    from ..export import spec_bench_answers

    try:
        return {str(a["question_id"]): a for a in spec_bench_answers(run)}
    except UsageError:  # an older log (no turns) or ids that are not integers: our figures only
        return {}


def _first(records: list[dict]) -> dict:
    return {str(e["id"]): e for e in reversed(records)}


def _speed(answer: dict) -> float:
    """A question's tokens over its wall time, both summed over its turns (speed.py:26-30)."""
    c = answer["choices"][0]
    t = sum(c["wall_time"])
    return sum(c["new_tokens"]) / t if t > 0 else math.nan


def _mean(xs) -> float:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return float(np.mean(xs)) if xs else math.nan


def _figures(mine: tuple, ref: Optional[tuple], cats: frozenset, per_consistency: dict) -> dict:
    """One (configuration, category column) row's figures. `mine` / `ref`: (records by id, answer lines by id) of the
    configuration / of its baseline (None without one)."""
    recs, ans = mine
    ids = [i for i, e in recs.items() if e.get("category") in cats]
    out = {"n": len(ids), "decode_speedup": math.nan, "specbench_speedup": math.nan, "tau": math.nan,
           "tokens_per_second": _mean(_speed(ans[i]) for i in ids if i in ans),
           "baseline_tokens_per_second": math.nan, **{c: math.nan for c in consistency.COLUMNS}}
    steps = [x for i in ids if i in ans for x in ans[i]["choices"][0]["accept_lengths"]]
    out["tau"] = float(np.mean(steps)) if steps else math.nan
    if ref is None:
        return out
    (base, base_ans) = ref
    paired = [i for i in ids if i in base and base[i].get("prompt_sha256") == recs[i].get("prompt_sha256")]
    ratios = [base[i]["decode_time_per_token"] / recs[i]["decode_time_per_token"] for i in paired
              if recs[i].get("decode_time_per_token") and base[i].get("decode_time_per_token") is not None]
    out["decode_speedup"] = float(np.median(ratios)) if ratios else math.nan
    both = [i for i in paired if i in ans and i in base_ans]
    speed, speed0 = _mean(_speed(ans[i]) for i in both), _mean(_speed(base_ans[i]) for i in both)
    out["baseline_tokens_per_second"] = speed0
    out["specbench_speedup"] = speed / speed0 if speed0 and not math.isnan(speed0) else math.nan  # speed.py:61
    out.update(consistency.means(per_consistency[i] for i in ids if i in per_consistency)
               if per_consistency else {})
    return out


def spec_bench_table(runs: list[dict], df: pd.DataFrame) -> pd.DataFrame:
    """Long table: one row per (configuration of a spec_bench run, category column), in the main table's order.
    `runs`: the tabled runs; `df`: build_table's table (its `baseline` column names each row's baseline)."""
    by_id = {r["run"]["run_id"]: r for r in runs}
    cached = df.attrs.get("consistency", {})
    prepared: dict = {}

    def prepare(run_id: str) -> tuple:
        if run_id not in prepared:
            prepared[run_id] = (_first(by_id[run_id]["examples"]), _answers(by_id[run_id]))
        return prepared[run_id]

    rows = []
    for model, g in df[df["dataset"] == TASK].groupby("model", sort=False):
        present = {e.get("category") for _, r in g.iterrows() for e in by_id[r["run_id"]]["examples"]}
        groups = category_groups({c for c in present if c is not None})
        for _, r in g.iterrows():
            run, base = by_id[r["run_id"]], by_id.get(r["baseline"])
            per = cached.get(r["run_id"])
            if per is None:
                per = consistency.per_example(run, base)
            mine, ref = prepare(r["run_id"]), prepare(r["baseline"]) if base is not None else None
            for name, cats in groups:
                rows.append({"model": model, "dataset": TASK, "method": r["method"], "label": r["label"],
                             "exits": r["exits"], "run_id": r["run_id"], "control": bool(r["control"]),
                             "never_engaged": bool(r["never_engaged"]), "baseline": r["baseline"],
                             "category": name, **_figures(mine, ref, cats, per)})
    return pd.DataFrame(rows, columns=COLUMNS)


def _label(r) -> str:
    """The short label ((tr) = read trained exits; the A/A control says so), marked when it never engaged."""
    return tagged(r) + (f" ({NEVER_ENGAGED})" if r["never_engaged"] else "")


def _grid(t: pd.DataFrame, cell) -> pd.DataFrame:
    """Rows = configurations (in table order), columns = category columns (in group order), cells by `cell(row)`."""
    cols = list(dict.fromkeys(t["category"]))
    out = {}
    for run_id, g in t.groupby("run_id", sort=False):
        first = g.iloc[0]
        out[run_id] = {"method": _label(first), **{r["category"]: cell(r) for _, r in g.iterrows()}}
    return pd.DataFrame(list(out.values()), columns=["method", *cols]).fillna("-")


def _fmt(v, f: str, unit: str = "") -> str:
    return "-" if v is None or pd.isna(v) else format(v, f) + unit


NOTES = (
    "decode speedup: ours, the median over questions of the baseline's decode time per token / the configuration's "
    "(paired by question id and prompt; prefill excluded). Spec-Bench speedup: its evaluation/speed.py — the mean "
    "over questions of new tokens / wall time (prefill included, every turn) of the configuration, over the same mean "
    "of the baseline — except that the baseline's tokens are its new_tokens, where speed.py re-tokenizes the "
    "baseline's answer text (len(input_ids) - 1 per turn): the two agree when that gives back the generated tokens "
    "plus one BOS. tau: Spec-Bench's mean accepted tokens, tokens per target pass with the prefill's first token as a "
    "pass of 1 (plain decoding 1.00; the main table's tau leaves the prefill out). consistency: ROUGE-L F of the "
    "answer (turns joined) against the baseline's / share of token positions equal to the baseline's. mt_bench = "
    "MT-bench's 8 categories together; `python -m harness.export spec_bench RUN_DIR OUT.jsonl` writes a run as "
    "Spec-Bench's answer file.")


def markdown(t: pd.DataFrame) -> str:
    """One section per model: a table per figure, rows = configurations, columns = category columns."""
    out = []
    for model, g in t.groupby("model", sort=False):
        parts = [f"### Spec-Bench by category ({model})\n\n{NOTES}"]
        for title, cell in (
                ("decode speedup (ours: median of per-question ratios)",
                 lambda r: _fmt(r["decode_speedup"], ".2f", "x")),
                ("Spec-Bench speedup (speed.py's formula, the baseline's tokens = its new_tokens)",
                 lambda r: _fmt(r["specbench_speedup"], ".2f", "x")),
                ("tau (Spec-Bench's mean accepted tokens, prefill included)", lambda r: _fmt(r["tau"], ".2f")),
                ("consistency with the baseline (ROUGE-L F / token exact match)",
                 lambda r: "-" if pd.isna(r["consistency_rougeL"]) else
                 f"{r['consistency_rougeL']:.3f} / {_fmt(r['consistency_tokens'], '.3f')}")):
            grid = _grid(g, cell)
            parts.append(f"#### {title}\n\n" + grid.to_markdown(index=False, disable_numparse=True))
        n = g.drop_duplicates("category").set_index("category")["n"]
        parts.append("Questions per column: " + ", ".join(f"{c} {int(v)}" for c, v in n.items()) + ".")
        out.append("\n\n".join(parts))
    return "\n\n".join(out) + "\n"


def plot(t: pd.DataFrame, out: Path) -> list[Path]:
    """spec_bench_speedup.png: category column x configuration (the baseline left out), cell = decode speedup."""
    from .plots import pyplot, save

    rows = t[t["run_id"] != t["baseline"]]  # the baseline's row names itself as its baseline
    if rows.empty:
        return []
    several = rows["model"].nunique() > 1
    grid = _grid(rows, lambda r: r["decode_speedup"])
    if several:
        models = rows.drop_duplicates("run_id").set_index("run_id")["model"]
        grid["method"] = [f"{m}: {x}" for m, x in zip(models, grid["method"])]
    values = grid.drop(columns="method").replace("-", np.nan).to_numpy(dtype=float)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(1.6 + 0.75 * values.shape[1], 1.8 + 0.42 * values.shape[0]))
    from matplotlib.colors import TwoSlopeNorm

    finite = values[np.isfinite(values)]
    # 1.0 (as fast as the baseline) is the colour scale's middle: red slower, green faster
    norm = TwoSlopeNorm(1.0, min(finite.min(initial=1.0), 0.9), max(finite.max(initial=1.0), 1.1))
    im = ax.imshow(values, cmap="RdYlGn", norm=norm, aspect="auto")
    ax.set_xticks(range(values.shape[1]), list(grid.columns[1:]), rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(values.shape[0]), list(grid["method"]), fontsize=8)
    for (a, b), v in np.ndenumerate(values):
        ax.text(b, a, "-" if np.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=7)
    ax.set_title("Spec-Bench: decode speedup over the baseline by category\n(median of per-question ratios)",
                 fontsize=10)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return [save(fig, out / "spec_bench_speedup.png")]


def write(runs: list[dict], df: pd.DataFrame, out: Path, plots: bool = True) -> tuple[str, list[Path]]:
    """spec_bench.csv (and the heatmap) when some tabled run is of spec_bench; returns the Markdown section to append
    to report.md ("" otherwise) and the files written."""
    if not (df["dataset"] == TASK).any():
        return "", []
    t = spec_bench_table(runs, df)
    path = out / "spec_bench.csv"
    t.to_csv(path, index=False)
    return markdown(t), [path, *(plot(t, out) if plots else [])]
