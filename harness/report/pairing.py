"""A row's baseline: which runs are baselines, what a run must share with its baseline to be paired (PAIRING), and
which baseline a run is paired with."""
from __future__ import annotations

import json
from typing import Optional

from .runs import field


def is_baseline(run: dict) -> bool:
    """A full-depth run of the baseline method (the registry's baseline_name()) that is not the A/A control."""
    from ..generators import baseline_name

    return run["strategy"] == baseline_name() and not run["knobs"].get("exit_layer") and not run.get("control")


def is_baseline_row(r) -> bool:
    """`is_baseline` for a row of the report table (knobs as JSON)."""
    return is_baseline({"strategy": r["strategy"], "knobs": json.loads(r["knobs"] or "{}"),
                        "control": bool(r["control"])})


# Everything that changes what a speed or quality figure measures; a pair must agree on all of it.
PAIRING: tuple = (
    ("model", lambda i: field(i, "model", "name")),
    ("checkpoint", lambda i: field(i, "model", "checkpoint")),
    ("device", lambda i: field(i, "model", "device")),
    ("dtype", lambda i: field(i, "model", "dtype")),
    ("dataset", lambda i: field(i, "task", "name")),
    ("data file (content hash)", lambda i: field(i, "task", "data_sha256")),
    ("example ids and prompt hashes", lambda i: field(i, "task", "examples_sha256")),
    ("n_shot", lambda i: field(i, "task", "n_shot")),
    ("protocol", lambda i: field(i, "run", "protocol") or "harness"),
    ("seed", lambda i: field(i, "generation", "seed")),
    ("max_steps", lambda i: field(i, "task", "max_steps")),
    ("fixed_length", lambda i: field(i, "run", "fixed_length")),
    ("sampling", lambda i: [field(i, "generation", k) for k in ("sample", "temperature", "top_p", "top_k")]
     if field(i, "generation", "sample") else False),
    ("chat_template", lambda i: field(i, "run", "chat_template")),
    ("world_size", lambda i: field(i, "environment", "world_size")),
    ("device map", lambda i: field(i, "model", "device_map") or "none"),
)


def pairing_mismatch(a: dict, b: dict) -> Optional[str]:
    """None if run.json dicts `a` and `b` may be paired, else which field differs and how."""
    for name, get in PAIRING:
        va, vb = get(a), get(b)
        if va is None or vb is None or va != vb:
            shown = lambda v: "missing" if v is None else str(v)[:24]  # noqa: E731
            return f"{name} differs ({shown(va)} vs baseline {shown(vb)})"
    return None


def baseline_for(run: dict, runs: list[dict]) -> tuple[Optional[dict], Optional[str]]:
    """(matching baseline, None) or (None, why no baseline could be paired)."""
    info = run["run"]
    cands = [r for r in runs if is_baseline(r["run"]) and r is not run
             and r["run"]["model"]["name"] == info["model"]["name"]
             and r["run"]["task"]["name"] == info["task"]["name"]]
    if not cands:
        from ..generators import baseline_name

        return None, f"no {baseline_name()} baseline for this model and dataset"
    # same invocation folder first, then newest
    cands.sort(key=lambda r: (r["path"].parent == run["path"].parent, r["run"].get("created") or ""), reverse=True)
    for c in cands:
        if pairing_mismatch(info, c["run"]) is None:
            return c, None
    return None, "not paired: " + pairing_mismatch(info, cands[0]["run"])
