"""`python -m harness.report RUN_DIR_OR_GLOB [...] [--out DIR] [--no_plots]`: write_report writes every table and
plot of the runs into one folder; main is its command line."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

import pandas as pd

from ..config import UsageError
from . import breakdown, spec_bench
from .auc import speed_quality_auc
from .guards import plot_acceptance
from .labels import assign_labels, exits_status
from .render import across_tasks, markdown
from .plots import plot_exit_layers, plot_speed_quality, plot_sweep
from .runs import find_run_dirs, load_runs, not_tabled
from .table import build_table, output_flag


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

    bt, bfiles = breakdown.write(tabled, df, out_dir, label, plots)
    never = frozenset(df.loc[df["never_engaged"].astype(bool), "run_id"])
    extra = "\n" + breakdown.markdown(bt, breakdown.baseline_ms(df), never) + "\n" if bt is not None else ""
    # Spec-Bench's figures only when a run is of spec_bench: other reports stay as they were, byte for byte
    sb_md, sb_files = spec_bench.write(tabled, df, out_dir, plots)
    files[1].write_text(markdown(df) + extra + ("\n" + sb_md if sb_md else ""), encoding="utf-8")
    files += bfiles + sb_files
    if plots:
        files += plot_speed_quality(df, out_dir)
        files += plot_exit_layers(tabled, out_dir, labels)
        files += plot_sweep(df, out_dir)
        files += plot_acceptance(df, out_dir)
    return df, files


def main(argv: Optional[list[str]] = None) -> int:
    from ..cli import Parser
    from . import __doc__ as description  # the package's: what the report holds and how to read it

    p = Parser(prog="python -m harness.report", description=description,
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
