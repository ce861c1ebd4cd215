"""Reading run logs: which run directories the paths name, refusing what the report does not understand (an
unknown or mixed schema_version, a foreign or damaged log: one line, not a traceback), and which runs are no row
of any table."""
from __future__ import annotations

import glob
import zlib
from pathlib import Path
from typing import Optional

from ..config import UsageError
from ..logs import SCHEMA_VERSION, read_run

READABLE_SCHEMAS = frozenset({2, SCHEMA_VERSION})  # 2: the committed reference logs


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


def field(info: dict, *keys: str):
    """info[k1][k2]..., or None where a level is missing (run.json fields of older logs)."""
    for k in keys:
        info = info.get(k) if isinstance(info, dict) else None
    return info
