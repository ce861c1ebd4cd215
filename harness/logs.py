"""The run-log schema: one directory per benchmark invocation.

    run.json        RunInfo: what was run, on what, with which versions
    examples.jsonl  one ExampleRecord per line, appended and flushed as each example finishes
    summary.json    Summary: aggregates over the records (rewritten at the end, also after a crash)

All files are strict JSON (no NaN/Infinity: missing values are null); durations are float seconds.
The README's "Run logs" section documents every field; keep the two in step (bump SCHEMA_VERSION on
any incompatible change).
"""
from __future__ import annotations

import gzip
import json
import math
import os
import statistics
import sys
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Optional

SCHEMA_VERSION = 2


@dataclass
class ExampleRecord:
    """One evaluated example (one line of examples.jsonl)."""

    id: str  # example id from the dataset (or its 1-based line number)
    index: int  # position in the evaluated list, 0-based
    prompt: str  # prompt text given to the model (before any chat template)
    prediction: str  # decoded continuation, cut at the first stop (EOS or stop string)
    reference: str  # gold text
    metrics: dict  # task metric values (e.g. rouge1/rouge2/rougeL, exact_match, pass_at_1) and diagnostics
    prompt_tokens: int  # prompt length in tokens after chat template and truncation
    prompt_truncated: bool  # whether the prompt was cut from the left to fit
    prompt_sha256: str  # hash of the prompt token ids actually fed (pairs runs only on identical prompts)
    new_tokens: int  # generated tokens that were timed (EOS included when produced; max_steps with --fixed_length)
    prediction_tokens: int  # tokens up to the first stop, the ones the prediction is made of (<= new_tokens)
    token_ids: list  # the generated token ids (all new_tokens of them)
    stop_reason: str  # what ends the prediction: "eos" | "stop_string" | "max_steps"
    prefill_seconds: float  # prompt forward + first token, device synchronized (median over repeats)
    decode_seconds: float  # all later tokens, device synchronized (median over repeats)
    total_seconds: float  # prefill_seconds + decode_seconds
    decode_time_per_token: Optional[float]  # headline speed: decode seconds / (new_tokens - 1), median over repeats
    e2e_tokens_per_second: Optional[float]  # end to end, prefill included: new_tokens / total_seconds
    exit_layers: list  # per token: layers run before the exit head that chose it (1..num_layers); [0] is prefill's
    avg_exit_layer: Optional[float]  # mean of exit_layers over decoded tokens (the prefill-chosen token excluded)
    layer_forwards: int  # decoder-layer applications to one position during decode (prefill excluded)
    layer_forwards_per_token: Optional[float]  # layer_forwards / (new_tokens - 1) decoded tokens
    exit_head_flops: float  # FLOPs of every exit-head evaluation during decode (2 * hidden * vocab rows)
    exit_head_flops_per_token: Optional[float]  # exit_head_flops / (new_tokens - 1)
    confidence_flops: float  # part of exit_head_flops spent only on deciding whether to exit (not picking the token)
    confidence_flops_per_token: Optional[float]  # confidence_flops / (new_tokens - 1)
    kv_fill_flops: float  # FLOPs of state-copying K/V projections for skipped layers (calm, dynamic)
    kv_fill_flops_per_token: Optional[float]  # kv_fill_flops / (new_tokens - 1)
    drafted: Optional[int]  # speculative methods: drafted tokens; null otherwise
    accepted: Optional[int]  # speculative methods: drafted tokens accepted (and kept); null otherwise
    acceptance_rate: Optional[float]  # accepted / drafted; null when not speculative
    repeats: list  # every timed repeat: {repeat, slot (0 = ran first on this example), prefill_seconds, decode_seconds, new_tokens; graph_captures, graph_capture_seconds where CUDA graphs were captured (left out of decode_seconds)}
    method_log: Optional[dict]  # method state after this example, e.g. FREE's adaptive threshold trajectory entry
    breakdown: Optional[dict] = None  # first repeat's decode seconds per component, section calls, timer cost (--breakdown)
    config_sha256: Optional[str] = None  # the configuration that made this record (RunInfo.config_sha256); resume checks it
    verify_passes: Optional[int] = None  # full-depth passes during decode; tau = (new_tokens - 1) / verify_passes
    draft_passes: Optional[int] = None  # drafter forwards during decode (early-exit drafts; lookup drafts cost none)
    top2_gaps: Optional[list] = None  # greedy full-depth autoregressive only: top-1 minus top-2 logit per token
    accept_lengths: Optional[list] = None  # speculative methods: tokens emitted by each decode full-model pass
    step_drafts: Optional[list] = None  # drafting methods: tokens drafted before each of those passes
    category: Optional[str] = None  # the example's category (tasks with categories: spec_bench)
    turns: Optional[list] = None  # conversation tasks: per turn {text, new_tokens, prefill_seconds, decode_seconds, accept_lengths}


@dataclass
class RunInfo:
    """Everything needed to reproduce or compare a run (run.json)."""

    schema_version: int  # SCHEMA_VERSION of these files
    run_id: str  # the run directory's name
    created: str  # ISO-8601 UTC start time
    command: list  # sys.argv of the invocation
    strategy: str  # registered generator name
    knobs: dict  # the strategy's behaviour-defining knobs (exit_layer, num_speculations, thresholds...)
    generation: dict  # the full GenerationConfig
    run: dict  # the full RunConfig
    task: dict  # name, metric, stop strings, max_steps, n_shot, data file, data_sha256, examples_sha256
    model: dict  # name, type, layers, hidden size, vocab, parameters, device, dtype, checkpoint, load seconds
    environment: dict  # python, torch, transformers and other package versions, platform, cpu/gpu, git commit
    control: bool  # the A/A control: a second copy of the baseline, timed in the same rotation
    schedule: dict  # configuration index and count, repeats, warm-up, rotation, invocation folder
    config_sha256: Optional[str] = None  # hash of config_identity(): what must match for records to be pooled or resumed
    cost_curve: Optional[dict] = None  # the core's cost curve measured in this invocation (harness.cost_curve), or None


@dataclass
class Summary:
    """Aggregates over examples.jsonl (summary.json)."""

    run_id: str  # the run directory's name
    status: str  # "complete" | "interrupted" | "failed"
    error: Optional[str]  # one-line reason when status is not complete
    num_examples: int  # examples recorded
    strategy: str  # registered generator name
    dataset: str  # task name
    model: str  # model name
    control: bool  # the A/A control run (a copy of the baseline)
    metrics: dict  # mean of each score (rouge1, rouge2, rougeL, exact_match, pass_at_1) over examples
    decode_time_per_token_median: Optional[float]  # median over examples of decode_time_per_token (seconds)
    e2e_tokens_per_second_median: Optional[float]  # median over examples of e2e_tokens_per_second
    prefill_seconds_median: Optional[float]  # median prefill seconds
    decode_seconds_median: Optional[float]  # median decode seconds
    total_new_tokens: int  # sum of new_tokens
    total_seconds: float  # sum of total_seconds
    avg_exit_layer: Optional[float]  # mean exit layer over all decoded tokens (prefill-chosen tokens excluded)
    layer_forwards_per_token: Optional[float]  # total layer forwards / total decoded tokens
    exit_head_flops_per_token: Optional[float]  # total exit-head FLOPs / total decoded tokens
    confidence_flops_per_token: Optional[float]  # total confidence-estimation FLOPs / total decoded tokens
    kv_fill_flops_per_token: Optional[float]  # total state-copying FLOPs / total decoded tokens
    acceptance_rate: Optional[float]  # total accepted / total drafted (speculative methods), else null
    drafted: Optional[int]  # total drafted tokens (speculative methods), else null
    accepted: Optional[int]  # total accepted tokens (speculative methods), else null
    tau: Optional[float] = None  # decoded tokens per full-depth pass (Spec-Bench's mean accepted tokens; plain = 1.00)


def config_identity(info: RunInfo) -> dict:
    """What makes two sets of records the same measurement: the method and its knobs, the run settings (not where
    files go or which device index), the model's content fingerprint, dtype and exit artifact, the data, and the
    library versions. `--resume` refuses to continue a run when any of these differs."""
    run = {k: v for k, v in info.run.items() if k not in ("device", "shard_dir", "output_dir")}
    model, task = info.model or {}, info.task or {}
    return json.loads(dumps({
        "strategy": info.strategy, "knobs": info.knobs, "generation": info.generation, "run": run,
        "control": info.control, "model checkpoint": model.get("checkpoint"), "model dtype": model.get("dtype"),
        "device type": str(model.get("device", "")).split(":")[0],
        "exit artifact": (model.get("exits") or {}).get("sha256"), "data file": task.get("data_sha256"),
        "examples": task.get("examples_sha256"), "task max_steps": task.get("max_steps"),
        "task metric": task.get("metric"), "task stops": task.get("stop"),
        "library versions": (info.environment or {}).get("packages")}))


def config_sha256(info: RunInfo) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(config_identity(info), sort_keys=True).encode()).hexdigest()[:16]


def identity_mismatch(stored: RunInfo, fresh: RunInfo) -> Optional[str]:
    """The first field of config_identity that differs, as 'field: stored vs fresh' (None: same)."""
    a, b = config_identity(stored), config_identity(fresh)
    for key in a:
        if a[key] != b.get(key):
            if isinstance(a[key], dict) and isinstance(b.get(key), dict):
                sub = sorted(k for k in set(a[key]) | set(b[key]) if a[key].get(k) != b[key].get(k))
                return f"{key} ({', '.join(sub[:4])}): the run has {[a[key].get(k) for k in sub[:4]]}, now " \
                       f"{[b[key].get(k) for k in sub[:4]]}"
            return f"{key}: the run has {a[key]!r}, now {b.get(key)!r}"
    return None


# -- one writer per run directory ------------------------------------------------------------------------
_HELD: dict[str, Any] = {}  # resolved lock path -> open file holding an flock for this process


def lock_run(path: Path, name: str = ".lock") -> None:
    """Hold an exclusive OS lock (flock) on a run directory until release_run or process exit; a second process gets
    one line. The kernel drops the lock when its holder dies, so a crash never leaves a stale lock behind."""
    import fcntl

    from .config import UsageError

    lock = (Path(path) / name).resolve()
    if str(lock) in _HELD:
        return
    f = open(lock, "a+", encoding="utf-8")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        who = f.read().strip()
        f.close()
        raise UsageError(f"{path} is being written by another process{f' ({who})' if who else ''}: wait for it to "
                         "end, or stop it, before resuming") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()}\n")
    f.flush()
    _HELD[str(lock)] = f


def release_run(path: Path, name: str = ".lock") -> None:
    f = _HELD.pop(str((Path(path) / name).resolve()), None)
    if f is not None:
        f.close()  # closing the descriptor releases the flock


def _clean(obj: Any) -> Any:
    """Make a value strict-JSON safe: NaN/inf -> null, tuples -> lists, numpy/torch scalars -> Python."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):
        return _clean(obj.item())
    return obj


def dumps(obj: Any) -> str:
    return json.dumps(_clean(asdict(obj) if hasattr(obj, "__dataclass_fields__") else obj),
                      ensure_ascii=False, allow_nan=False)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(json.loads(dumps(obj)), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def new_run_dir(output_dir: str | Path, label: str) -> Path:
    """A fresh, writable directory under output_dir; never reuses an existing one."""
    from .config import UsageError

    root = Path(output_dir)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    try:
        root.mkdir(parents=True, exist_ok=True)
        for k in range(1000):
            path = root / (f"{stamp}_{label}" + (f"_{k}" if k else ""))
            try:
                path.mkdir()
            except FileExistsError:
                continue
            probe = path / ".write_test"  # fail before any model time is spent, not after the first example
            probe.write_text("")
            probe.unlink()
            return path
    except OSError as e:
        raise UsageError(f"cannot create or write the output directory {root}: {e.strerror or e}") from None
    raise UsageError(f"could not create a new run directory under {root}")


class RunWriter:
    """Writes one run directory; every example is on disk as soon as it is scored.

    A process of a torchrun job (`shard` = its rank) appends to its own file, `shard_dir` /
    examples.rank<R>.jsonl, on its own storage: no rank ever reads another rank's file. Rank 0 receives
    the others' records over the process group and writes the merged examples.jsonl (see shards).
    """

    def __init__(self, path: Path, info: RunInfo, resume: bool = False, shard: Optional[int] = None,
                 shard_dir: Optional[Path] = None):
        self.path = path
        self.records: list[ExampleRecord] = []
        if shard is None:
            file = path / "examples.jsonl"
        else:
            shard_dir = shard_dir or path / "shards"
            shard_dir.mkdir(parents=True, exist_ok=True)  # on a node without rank 0's storage too
            file = shard_dir / f"examples.rank{shard}.jsonl"
            if shard > 0:  # what this rank ran, kept beside its records (run.json lives on rank 0's storage)
                _write_json(shard_dir / f"run.rank{shard}.json", info)
        self.file = file
        self.lock_name = ".lock" if not shard else f".lock.rank{shard}"
        lock_run(file.parent, self.lock_name)
        if resume:
            self.records = self._read_for_resume(file)
            file.write_text("".join(dumps(r) + "\n" for r in self.records), encoding="utf-8")
        elif not shard:
            _write_json(path / "run.json", info)
        self._examples = open(file, "a", encoding="utf-8")

    @staticmethod
    def _read_for_resume(file: Path) -> list[ExampleRecord]:
        """Every complete, valid record; an unreadable or duplicate line (a crash mid-write, a damaged file) is moved
        aside into a file beside it and named in one line, never dropped silently. Its example runs again."""
        good: list[ExampleRecord] = []
        bad: list[tuple[int, str]] = []
        seen: set[int] = set()
        raw = file.read_bytes() if file.exists() else b""
        for n, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = ExampleRecord(**json.loads(line))
            except (json.JSONDecodeError, TypeError, ValueError):
                bad.append((n, line))
                continue
            if rec.index in seen:
                bad.append((n, line))
                continue
            seen.add(rec.index)
            good.append(rec)
        if bad:
            stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
            aside = file.with_name(f"{file.name}.set-aside-{stamp}")
            aside.write_text("".join(f"{line}\n" for _, line in bad), encoding="utf-8")
            print(f"resume: {len(bad)} unreadable or duplicate line(s) of {file} (line {', '.join(str(n) for n, _ in bad)})"
                  f" moved aside to {aside.name}; {len(good)} complete record(s) kept", file=sys.stderr)
        return good

    def append(self, record: ExampleRecord) -> None:
        self._examples.write(dumps(record) + "\n")
        self._examples.flush()
        os.fsync(self._examples.fileno())
        self.records.append(record)

    def close(self) -> None:
        self._examples.close()
        release_run(self.file.parent, self.lock_name)

    def finish(self, info: RunInfo, status: str = "complete", error: Optional[str] = None) -> Summary:
        self.close()
        summary = summarize(info, self.records, status, error)
        _write_json(self.path / "summary.json", summary)
        return summary

    def finish_merged(self, info: RunInfo, status: str = "complete", error: Optional[str] = None) -> Summary:
        """Rank 0: the summary of the merged records (its own file is already closed)."""
        summary = summarize(info, self.records, status, error)
        _write_json(self.path / "summary.json", summary)
        release_run(self.path)
        return summary

    def write_merged(self, records: list[ExampleRecord]) -> None:
        """Rank 0: the whole run's records (received from every rank), in example order, as examples.jsonl."""
        self.records = sorted({r.index: r for r in records}.values(), key=lambda r: r.index)
        tmp = self.path / "examples.jsonl.tmp"
        tmp.write_text("".join(dumps(r) + "\n" for r in self.records), encoding="utf-8")
        os.replace(tmp, self.path / "examples.jsonl")


def _median(xs: Iterable[Optional[float]]) -> Optional[float]:
    vals = [x for x in xs if x is not None]
    return statistics.median(vals) if vals else None


def _mean(xs: Iterable[Optional[float]]) -> Optional[float]:
    vals = [x for x in xs if x is not None]
    return statistics.fmean(vals) if vals else None


def summarize(info: RunInfo, records: list[ExampleRecord], status: str, error: Optional[str]) -> Summary:
    from .metrics import SCORE_KEYS

    metrics = {k: _mean(r.metrics.get(k) for r in records) for k in SCORE_KEYS
               if any(k in r.metrics for r in records)}
    exits = [layer for r in records for layer in r.exit_layers[1:]]  # decoded tokens only
    decoded = sum(decoded_tokens(r) for r in records)
    drafted = sum(r.drafted for r in records if r.drafted is not None)
    accepted = sum(r.accepted for r in records if r.accepted is not None)
    speculative = any(r.drafted is not None for r in records)
    per_token = lambda xs: sum(xs) / decoded if decoded else None  # noqa: E731
    return Summary(
        run_id=info.run_id, status=status, error=error, num_examples=len(records), strategy=info.strategy,
        dataset=info.task["name"], model=info.model["name"], control=info.control, metrics=metrics,
        decode_time_per_token_median=_median(r.decode_time_per_token for r in records),
        e2e_tokens_per_second_median=_median(r.e2e_tokens_per_second for r in records),
        prefill_seconds_median=_median(r.prefill_seconds for r in records),
        decode_seconds_median=_median(r.decode_seconds for r in records),
        total_new_tokens=sum(r.new_tokens for r in records),
        total_seconds=sum(r.total_seconds for r in records),
        avg_exit_layer=statistics.fmean(exits) if exits else None,
        layer_forwards_per_token=per_token(r.layer_forwards for r in records),
        exit_head_flops_per_token=per_token(r.exit_head_flops for r in records),
        confidence_flops_per_token=per_token(r.confidence_flops for r in records),
        kv_fill_flops_per_token=per_token(r.kv_fill_flops for r in records),
        acceptance_rate=(accepted / drafted if drafted else None) if speculative else None,
        drafted=drafted if speculative else None, accepted=accepted if speculative else None,
        tau=tau(records),
    )


def decoded_tokens(record) -> int:
    """Tokens a record decoded after its prefills (dict or ExampleRecord): new_tokens less one per prefill (a
    conversation has one per turn)."""
    get = record.get if isinstance(record, dict) else lambda k: getattr(record, k, None)
    return max(int(get("new_tokens") or 0) - len(get("turns") or [None]), 0)


def tau(records) -> Optional[float]:
    """Mean tokens per full-depth pass over records (dicts or ExampleRecords) that count their passes, else None."""
    get = (lambda r, k: r.get(k)) if records and isinstance(records[0], dict) else getattr
    rows = [r for r in records if get(r, "verify_passes")]
    if not rows:
        return None
    return sum(decoded_tokens(r) for r in rows) / sum(get(r, "verify_passes") for r in rows)


def read_run(path: str | Path) -> dict:
    """Load a run directory: {"run": run.json, "examples": [records], "summary": summary.json or None}."""
    path = Path(path)
    run = json.loads((path / "run.json").read_text(encoding="utf-8"))
    examples, text = [], None
    ex_path, gz_path = path / "examples.jsonl", path / "examples.jsonl.gz"  # .gz: compacted (committed results)
    if ex_path.exists():
        text = ex_path.read_text(encoding="utf-8")
    elif gz_path.exists():
        text = gzip.decompress(gz_path.read_bytes()).decode("utf-8")
    if text is not None:
        examples = [json.loads(line) for line in text.splitlines() if line.strip()]
    summary_path = path / "summary.json"
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.exists() else None
    return {"run": run, "examples": examples, "summary": summary}
