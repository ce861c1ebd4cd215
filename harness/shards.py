"""Where each rank keeps its records under torchrun, and how rank 0 merges them over the process group."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

from .config import RunConfig, UsageError
from .distributed import Dist, barrier, gather
from .logs import ExampleRecord, RunInfo, RunWriter, Summary, summarize


def shard_dir(run: RunConfig, path: Path, dist: Dist) -> Optional[Path]:
    """Where this rank keeps its shard of run directory `path` (--shard_dir, '{rank}' filled in)."""
    if not dist.active or not run.shard_dir:
        return None
    return Path(run.shard_dir.replace("{rank}", str(dist.rank))) / path.name


def read_run_info(path: Path, dist: Dist) -> dict:
    """run.json of a run directory; a rank other than 0 may only have its own copy (no shared storage)."""
    for f in (path / "run.json", path / "shards" / f"run.rank{dist.rank}.json"):
        if f.is_file():
            return json.loads(f.read_text(encoding="utf-8"))
    raise UsageError(f"--resume {path}: no run.json here (nor this rank's copy in shards/)")


def merge_over_ranks(writers: list[RunWriter], infos: list[RunInfo], status: str, error: Optional[str],
                     dist: Dist) -> list[Summary]:
    """Every rank sends its records to rank 0 over the process group; rank 0 writes the merged logs.

    No rank reads another rank's files. A rank that failed still sends what it finished, and rank 0's
    summary names it with its error; if a rank cannot be reached at all, rank 0 says so and keeps what it has
    (that rank's records stay in its shard file).
    """
    for w in writers:
        w.close()
    payload = {"rank": dist.rank, "status": status, "error": error,
               "records": [[dataclasses.asdict(r) for r in w.records] for w in writers]}
    lost = None
    try:
        gathered = gather(payload, dist)
    except RuntimeError as e:  # a peer died: keep what this rank has
        gathered = [payload] if dist.rank == 0 else None
        lost = f"lost contact with the other ranks while merging ({str(e).splitlines()[0]}); their records " \
               "stay in their shard files"
    if dist.rank != 0:
        _barrier_quietly(dist, lost)  # rank 0 has written the merged logs before anyone exits (or raises)
        return [summarize(info, w.records, status, error) for w, info in zip(writers, infos)]
    bad = [g for g in gathered if g["status"] != "complete"]
    if bad or lost:
        status = "interrupted" if bad and all(g["status"] == "interrupted" for g in bad) and not lost else "failed"
        error = "; ".join([f"rank {g['rank']}: {g['error']}" for g in bad] + ([lost] if lost else []))
    summaries = []
    for c, (w, info) in enumerate(zip(writers, infos)):
        w.write_merged([ExampleRecord(**r) for g in gathered for r in g["records"][c]])
        summaries.append(w.finish_merged(info, status, error))
    _barrier_quietly(dist, lost)
    return summaries


def _barrier_quietly(dist: Dist, lost: Optional[str]) -> None:
    if lost is None:
        try:
            barrier(dist)
        except RuntimeError:
            pass
