"""Run logs in another benchmark's answer format, for its own evaluation scripts.

    python -m harness.export spec_bench RUN_DIR OUT.jsonl

spec_bench: one configuration's run of the `spec_bench` task as a Spec-Bench answer file (hemingkx/Spec-Bench
evaluation/eval.py:229-243, one JSON line per question, sorted by question_id as its reorg_answer_file does):
{"question_id": int, "category", "answer_id": "<run_id>-<id>", "model_id": "<model>-<strategy>", "choices": [{"index":
0, "turns": [answer text per turn], "decoding_steps": [target passes per turn], "new_tokens": [per turn],
"wall_time": [seconds per turn], "accept_lengths": [tokens per target pass, every turn]}], "tstamp": run.json's
created (epoch seconds; the export's time without it)}.

As Spec-Bench counts them: a turn's wall_time is its whole generation, prefill included (our prefill_seconds +
decode_seconds, both device synchronized); its accept_lengths are the tokens each target forward pass produced,
the prefill's first token included as a 1 (its inference_baseline.py gives plain decoding [1] * new_tokens), so a
turn's list is [1] + its decode passes' accept_lengths ([1] per decoded token for a method without any), and its
decoding_steps the length of that list. The turn texts are the record's, cut at the stop, not stripped.
Spec-Bench's speed.py then gives the speedup against a baseline file made the same way; note that it counts the
BASELINE's tokens by re-tokenizing its text (len(input_ids) - 1 per turn), not from new_tokens.

Refused (one line, exit 2): a folder without run.json, a run of another task, records without `turns` (logs
older than the spec_bench task), a question id that is not an integer, an unknown format.
"""
from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

from .config import UsageError


def turn_accept_lengths(turn: dict) -> list[int]:
    """Spec-Bench's accept_lengths of one turn: the prefill's token (1), then each decode pass's tokens (1 per decoded
    token when the method logged none)."""
    n = int(turn.get("new_tokens") or 0)
    if n <= 0:
        return []
    decoded = turn.get("accept_lengths")
    return [1] + [int(a) for a in (decoded if decoded is not None else [1] * (n - 1))]


def _question_id(record: dict) -> int:
    try:
        return int(str(record["id"]))
    except ValueError:
        raise UsageError(f"example id {record['id']!r} is not an integer: Spec-Bench's question_id is one") from None


def _tstamp(info: dict) -> float:
    """run.json's created as epoch seconds (a time without a zone is UTC), else now."""
    try:
        t = datetime.fromisoformat(str(info.get("created")))
    except ValueError:
        return time.time()
    return (t if t.tzinfo else t.replace(tzinfo=timezone.utc)).timestamp()


def spec_bench_answers(run: dict) -> list[dict]:
    """A spec_bench run ({"run": run.json, "examples": records}) as Spec-Bench answer lines, sorted by question_id
    (the first record of an id wins, as in the report). Records without `turns` are refused."""
    info = run["run"]
    if info["task"]["name"] != "spec_bench":
        raise UsageError(f"the run's task is {info['task']['name']}, not spec_bench: only a spec_bench run has "
                         "Spec-Bench's questions")
    missing = sum(e.get("turns") is None for e in run["examples"])
    if missing:
        raise UsageError(f"{missing} of {len(run['examples'])} records have no `turns` (a log older than the "
                         "spec_bench task, or not written by its runner): nothing per turn to export")
    first: dict = {}
    for e in run["examples"]:
        first.setdefault(_question_id(e), e)
    stamp, model_id = _tstamp(info), f"{info['model']['name']}-{info['strategy']}"
    lines = []
    for qid, e in sorted(first.items()):
        turns = e["turns"]
        accepts = [turn_accept_lengths(t) for t in turns]
        lines.append({
            "question_id": qid, "category": e.get("category"), "answer_id": f"{info['run_id']}-{e['id']}",
            "model_id": model_id,
            "choices": [{"index": 0, "turns": [t.get("text") or "" for t in turns],
                         "decoding_steps": [len(a) for a in accepts],
                         "new_tokens": [int(t.get("new_tokens") or 0) for t in turns],
                         "wall_time": [float(t.get("prefill_seconds") or 0.0) + float(t.get("decode_seconds") or 0.0)
                                       for t in turns],
                         "accept_lengths": [x for a in accepts for x in a]}],
            "tstamp": stamp})
    return lines


FORMATS: dict[str, Callable[[dict], list[dict]]] = {"spec_bench": spec_bench_answers}


def read_one_run(path: str) -> dict:
    """One configuration's run directory (run.json directly in it), read and checked as the report reads runs."""
    from .report.runs import load_runs

    d = Path(path)
    if not (d / "run.json").is_file():
        hint = " (it holds run directories: name one of them)" if d.is_dir() and any(d.rglob("run.json")) else ""
        raise UsageError(f"{path} is not a run directory: no run.json in it{hint}")
    (run,) = load_runs([str(d)])
    return run


def export(fmt: str, run_dir: str, out: str) -> int:
    """Write run_dir's records in format fmt to out; returns the number of lines."""
    if fmt not in FORMATS:
        raise UsageError(f"unknown format {fmt!r}; known: {', '.join(sorted(FORMATS))}")
    lines = FORMATS[fmt](read_one_run(run_dir))
    try:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines), encoding="utf-8")
    except OSError as e:
        raise UsageError(f"cannot write {out}: {e.strerror or e}") from None
    return len(lines)


def main(argv: Optional[list[str]] = None) -> int:
    import argparse

    from .cli import Parser

    p = Parser(prog="python -m harness.export", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("format", help=f"answer format: {', '.join(sorted(FORMATS))}")
    p.add_argument("run_dir", help="one configuration's run directory (holding run.json)")
    p.add_argument("out", help="the answer file to write (JSON lines)")
    a = p.parse_args(argv)
    n = export(a.format, a.run_dir, a.out)
    print(f"wrote {n} answers to {a.out}")
    return 0


if __name__ == "__main__":
    import sys

    from .cli import run_main

    sys.exit(run_main(main))
