"""The report's Markdown: one table per (model, dataset) with its notes (a lossless method's mismatches, the A/A
control's noise floor, the findings), a summary across tasks, the legend, and the runs not in the tables."""
from __future__ import annotations

from typing import Optional

import numpy as np
import pandas as pd

from .guards import NEVER_ENGAGED
from .labels import tagged
from .pairing import is_baseline_row
from .stats import CONTROL_BAND, MIN_PAIRS_FOR_CI, NOT_DISTINGUISHABLE, quality_verdict, speed_verdict
from .table import primary_quality


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
            lo, hi = sorted((c["decode_speedup"], 1 / c["decode_speedup"]))  # a ratio's noise is symmetric in log
            notes.append(f"WARNING: the A/A control is {100 * dev:.1f}% away from 1.0 (more than "
                         f"{100 * CONTROL_BAND:.0f}%): speedups between {lo:.2f}x and {hi:.2f}x cannot be "
                         "told from 1.0 in this measurement.")
    return notes


def exactness_notes(g: pd.DataFrame) -> list[str]:
    """Lossless methods whose greedy output is not plain greedy decoding's: a REAL mismatch is a bug line; mismatches
    that cannot be classified (the baseline logged no top-2 gaps) are said to be so."""
    from ..generators import baseline_name

    notes = []
    for _, r in g.iterrows():
        if not pd.isna(r["real"]) and r["real"] > 0:
            notes.append(f"BUG: lossless method {tagged(r)} differs from {baseline_name()} at a clear margin on "
                         f"{r['real']} example{'s' * (r['real'] > 1)} (max margin {r['real_margin_max']:.4g} >= "
                         f"tolerance {r['tolerance']:.4g}).")
        if not pd.isna(r["unknown"]) and r["unknown"] > 0:
            notes.append(f"Lossless method {tagged(r)} differs from {baseline_name()} on {r['unknown']} "
                         f"example{'s' * (r['unknown'] > 1)} where the baseline logged no top-2 logit gaps: near-tie "
                         "or real cannot be told.")
    return notes


def never_engaged(r) -> bool:
    """A row's `never_engaged` (False where the column is missing or blank)."""
    v = r.get("never_engaged", False)
    return isinstance(v, (bool, np.bool_)) and bool(v)


def marked(label: str, r) -> str:
    """A row's label as the Markdown tables print it: `(never engaged)` after it when the row never engaged."""
    return label + (f" ({NEVER_ENGAGED})" if never_engaged(r) else "")


def never_engaged_note(rows: pd.DataFrame, where: bool = False) -> list[str]:
    """The note naming the rows that never engaged (with their tasks when `where`), or none."""
    names: dict = {}
    for _, r in rows.iterrows():
        if never_engaged(r):
            names.setdefault(tagged(r), []).append(r["dataset"])
    if not names:
        return []
    return ["Never engaged (drafted nothing, or never exited before the last layer, over the whole run: its time is "
            "the method's overhead alone; marked `(never engaged)` in the tables): "
            + ", ".join(n + (f" ({', '.join(dict.fromkeys(ds))})" if where else "") for n, ds in names.items()) + "."]


def against_verdict_note(rows: pd.DataFrame) -> list[str]:
    """The note naming rows that ran although their exit artifact's recommender said "don't speculate" (report.csv
    `against_verdict`), so that a slow row is read as the untrained defaults it is, not as the recommendation."""
    said = [f"{tagged(r)} ({r['against_verdict']})" for _, r in rows.iterrows()
            if isinstance(r.get("against_verdict"), str) and r["against_verdict"]]
    if not said:
        return []
    return ["Run against its exit artifact's verdict (the recommender predicted no setting clearly above 1.0x on "
            "this device and dtype and said don't speculate; the method ran its defaults without a recommendation, "
            "as asked): "
            + ", ".join(said) + "."]


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
                     "whatever the speedup): " + ", ".join(f"{tagged(r)} ({r['flag'].split('(')[1]}"
                                                           for _, r in degenerate.iterrows()) + ".")
    notes += never_engaged_note(rows)
    notes += against_verdict_note(rows)
    rows = rows[~rows["degenerate"].astype(bool)]
    speed: dict = {}
    for _, r in rows.iterrows():
        v = speed_verdict(r)
        cell = tagged(r) + (f" {r['decode_speedup']:.2f}x [{r['decode_speedup_ci95_low']:.2f}-"
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
            cell = tagged(r) + (f" {r[f'delta_{q}']:+.3f} [{r[f'delta_{q}_ci95_low']:+.3f}, "
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
    folder its invocation wrote to beside its label (`series`, so that one row still spans the tasks), or the
    invocation where the folder does not tell them apart."""
    cells: dict = {}
    if df.empty:
        return pd.DataFrame()
    base = df.apply(is_baseline_row, axis=1)
    folders = df[~base].groupby(["model", "exits", "label"])["series"].nunique()
    for (model, dataset), g in df.groupby(["model", "dataset"], sort=False):
        q = primary_quality(g)
        for i, r in g.iterrows():
            if base[i]:
                continue
            key = (model, r["exits"], r["label"])
            if folders[key] > 1 and r.get("series"):  # run by invocations that wrote to different folders
                key = (model, r["exits"], f"{r['label']} ({r['series']})")
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
          "(verification) pass, Spec-Bench's mean accepted tokens without the prefill's token (plain decoding "
          "1.00); oracle speedup = what the "
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
            note = never_engaged_note(df[~df["control"].astype(bool) & ~df.apply(is_baseline_row, axis=1)], True)
            out.append("### Summary across tasks (decode speedup [95% CI] n; delta of the task's main metric "
                       "[95% CI] n)\n\n" + s.to_markdown(index=False) + "".join(f"\n\n{n}" for n in note))
    if len(df):
        out.append(LEGEND)
    for (model, dataset), g in df.groupby(["model", "dataset"], sort=False):
        q = primary_quality(g)
        t = pd.DataFrame({
            "method": [marked(r["method"], r) for _, r in g.iterrows()], "exits": g["exits"], "n": g["n"],
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
