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

Consistency with the full model (report.csv `consistency_rougeL`, `consistency_tokens`; every row but the baseline
and the A/A control): per paired example, the ROUGE-L F of its prediction against the baseline's and the share of
token positions (up to the longer output) where its tokens equal the baseline's, averaged (harness/report/
consistency.py; a greedy lossless method's is 1.0 in float32). Never engaged (report.csv `never_engaged`, and
"(never engaged)" after the label in the Markdown tables, with a note): a drafting method that drafted nothing over
the whole run, or a method reading exits that never exited before the last layer (run.json model.num_layers); its time
is the method's overhead alone. Acceptance by draft position (report.csv `accept_pos_1..K`, only when some run logged
step_drafts and accept_lengths; acceptance_by_position.png): of the steps that drafted at least i tokens, the share
that kept at least i. Spec-Bench (only when a run is of the spec_bench task): spec_bench.csv, a section appended to
report.md and spec_bench_speedup.png, per category, "mt_bench" and "overall": our decode speedup, Spec-Bench's
speedup (its evaluation/speed.py, the baseline's tokens counted as its new_tokens), its tau (mean tokens per target
pass, the prefill's first token included) and consistency (harness/report/spec_bench.py); `python -m harness.export
spec_bench RUN_DIR OUT.jsonl` writes a run as Spec-Bench's answer file.

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

# what other code and the tests import; everything else from its module (harness.report.stats, .plots, ...)
from .auc import speed_quality_auc
from .cli import main, write_report
from .render import control_notes, markdown
from .plots import FAMILY_COLOURS
from .runs import load_runs
from .stats import CONTROL_BAND
from .table import build_table

__all__ = ["CONTROL_BAND", "FAMILY_COLOURS", "build_table", "control_notes", "load_runs", "main", "markdown",
           "speed_quality_auc", "write_report"]
