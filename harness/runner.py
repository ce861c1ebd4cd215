"""The benchmark loop: load, warm up, generate, score, log — one record at a time."""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import torch
from tqdm import tqdm

from .config import GenerationConfig, RunConfig, UsageError, for_strategy, parse_value
from .identity import library_versions
from .generators import Generator, GenerationResult, StopCondition, build_generator
from .distributed import Dist, barrier, broadcast, gather
from .logs import (SCHEMA_VERSION, ExampleRecord, RunInfo, RunWriter, Summary, config_sha256, identity_mismatch,
                   lock_run, new_run_dir, summarize)
from .metrics import METRICS
from .model import LayeredModel, load_model
from .tasks import DATA_DIR, Example, Task, get_task, load_examples

SINGLE = Dist(0, 1, 0)


@functools.lru_cache(maxsize=1)
def git_commit() -> Optional[str]:
    """HEAD (+ "-dirty" if tracked files differ), read once per process: the code this process loaded at its
    start, even if the working tree is edited while a long run goes on (benchmark.py calls it first thing)."""
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if sha.returncode != 0:
        return None
    return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def environment(device: torch.device) -> dict:
    versions = library_versions()
    env = {"python": sys.version.split()[0], "platform": platform.platform(), "cpu_count": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "packages": versions, "git_commit": git_commit(),
           "device": str(device), "device_name": platform.processor() or platform.machine(),
           "world_size": int(os.environ.get("WORLD_SIZE", 1)),
           "nodes": max(1, int(os.environ.get("WORLD_SIZE", 1)) // int(os.environ.get("LOCAL_WORLD_SIZE", 1) or 1)),
           "processes_per_node": int(os.environ.get("LOCAL_WORLD_SIZE", 1))}
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
    return env


def speculation_verdict(generator: Generator) -> Optional[dict]:
    """The attached artifact's self-speculation recommendation, for the methods it is about (else None)."""
    from .speedup_model import costed_on, recommendation

    art = getattr(generator.model, "exits", None)
    if art is None or generator.artifact_key() != "self_speculative":
        return None
    rec = recommendation(art)
    if rec is None:
        return None
    # the prediction rests on costs timed on one device in one dtype: say which (a run elsewhere is told so); a
    # verdict re-costed where this run happens (trained_exits.recost_where_run) names its own
    on = costed_on(art, rec)
    hardware = None if "recosted_from" in rec else art.provenance.get("exit_adapters", {}).get("hardware")
    return dict(rec, fitted_dtype=on["dtype"], fitted_device=on["device"], fitted_hardware=hardware)


def invocation_cost_curve(model: LayeredModel) -> Optional[dict]:
    """The core's cost curve (k = 1, 2, 4, 8 after 400 cached positions; harness.cost_curve), measured once per
    loaded model (~3 s here) so that every run.json says what a pass cost in this invocation; None where a pass
    is not cheap to time (weights offloaded by a device map)."""
    if getattr(model, "cost_curve", None) is None:
        if model.device_map and any(v in ("cpu", "disk") for v in model.device_map.values()):
            return None
        from .cost_curve import measure

        context = max(1, min(400, model.max_context - 16))
        model.cost_curve = measure(model, context=context, reps=3, ks=(1, 2, 4, 8), quick=True).as_dict()
    return model.cost_curve


def trained_note(generator: Generator) -> str:
    """One line: which knobs a configuration took from the exit artifact, and whether its calibration never exits."""
    art = generator.model.exits
    taken = ", ".join(f"{k}={v}" for k, v in sorted(generator.trained_knobs.items()))
    cal = art.thresholds.get(generator.artifact_key(), {}) if art is not None else {}
    never = " (calibrated to never exit early: its certificate found no faster setting)" \
        if cal.get("exits_early") is False and set(cal.get("knobs", {})) <= set(generator.trained_knobs) else ""
    return f"{taken} from the exit artifact{never}; a flag you type wins (--exits none: untrained defaults)"


def load_run_examples(run: RunConfig, seed: int) -> list[Example]:
    examples = load_examples(run.dataset, run.num_samples, run.n_shot, seed, run.data_path, run.data_source,
                             shuffle=run.protocol == "layerskip")
    if not examples:
        raise UsageError(f"no examples to evaluate in {run.data_path or get_task(run.dataset).eval_file}")
    return examples


def cut_at_stop(text: str, stops: tuple) -> str:
    """The continuation up to (not including) the first stop string."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=len(text))
    return text[:cut]


def sha256_of(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, ensure_ascii=False).encode()).hexdigest()


def data_sha256(run: RunConfig, task: Task) -> Optional[str]:
    """Content hash of the evaluated data file (None for --data_source hf)."""
    if run.data_path is None and run.data_source == "hf":
        return None
    path = Path(run.data_path) if run.data_path else DATA_DIR / task.eval_file
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _per(total: float, n: int) -> Optional[float]:
    return total / n if n > 0 else None


def decode_time_per_token(res: GenerationResult) -> Optional[float]:
    """The headline speed: decode seconds per token produced after the prefill (prefill excluded)."""
    return res.decode_seconds / (len(res.tokens) - 1) if len(res.tokens) > 1 else None


def make_record(index: int, ex: Example, prompt_ids: list, truncated: bool, runs: list[tuple[GenerationResult, int]],
                prediction: str, kept: tuple[int, str], metrics: dict) -> ExampleRecord:
    """One example's record from its timed repeats [(result, slot in the rotation)]; tokens from the first."""
    res = runs[0][0]
    n, d = len(res.tokens), max(len(res.tokens) - 1, 0)
    prefill = statistics.median(r.prefill_seconds for r, _ in runs)
    decode = statistics.median(r.decode_seconds for r, _ in runs)
    per_token = [t for t in (decode_time_per_token(r) for r, _ in runs) if t is not None]
    total = prefill + decode
    return ExampleRecord(
        id=ex.id, index=index, prompt=ex.prompt, prediction=prediction, reference=ex.reference, metrics=metrics,
        prompt_tokens=len(prompt_ids), prompt_truncated=truncated, prompt_sha256=sha256_of(list(prompt_ids)),
        new_tokens=n, prediction_tokens=kept[0], token_ids=res.tokens, stop_reason=kept[1],
        prefill_seconds=prefill, decode_seconds=decode, total_seconds=total,
        decode_time_per_token=statistics.median(per_token) if per_token else None,
        e2e_tokens_per_second=_per(n, total) if total > 0 else None, exit_layers=res.exit_layers,
        avg_exit_layer=_per(sum(res.exit_layers[1:]), len(res.exit_layers) - 1),
        layer_forwards=res.layer_forwards, layer_forwards_per_token=_per(res.layer_forwards, d),
        exit_head_flops=res.exit_head_flops, exit_head_flops_per_token=_per(res.exit_head_flops, d),
        confidence_flops=res.confidence_flops, confidence_flops_per_token=_per(res.confidence_flops, d),
        kv_fill_flops=res.kv_fill_flops, kv_fill_flops_per_token=_per(res.kv_fill_flops, d),
        drafted=res.drafted, accepted=res.accepted,
        acceptance_rate=res.accepted / res.drafted if res.drafted else None,
        repeats=[{"repeat": i, "slot": slot, "prefill_seconds": r.prefill_seconds,
                  "decode_seconds": r.decode_seconds, "new_tokens": len(r.tokens)} for i, (r, slot) in enumerate(runs)],
        method_log=None, breakdown=res.breakdown, verify_passes=res.verify_passes, draft_passes=res.draft_passes,
        top2_gaps=[round(g, 4) for g in res.top2_gaps] if res.top2_gaps is not None else None)


LAYERSKIP_MAX_STEPS, LAYERSKIP_TEMPERATURE, LAYERSKIP_TOP_P = 512, 0.6, 0.9  # LayerSkip's GenerationConfig


class Benchmark:
    """One configuration: a model + generator + task, ready to time and score examples."""

    def __init__(self, run: RunConfig, gen: GenerationConfig, model: Optional[LayeredModel] = None,
                 examples: Optional[list[Example]] = None, control: bool = False):
        self.run, self.control = run, control
        self.task: Task = get_task(run.dataset)
        # What the protocol decides: LayerSkip's benchmark.py has no stop strings, 512 new tokens, ROUGE
        # lowercased without stemming, and samples at temperature 0.6 / top_p 0.9 (generator_base.py).
        layerskip = run.protocol == "layerskip"
        self.stops = () if layerskip else self.task.stop
        self.metric = "rouge_layerskip" if layerskip and self.task.metric == "rouge" else self.task.metric
        if run.chat_template and self.task.chat_metric and not layerskip:  # instruct answers: markdown code blocks
            self.stops, self.metric = self.task.chat_stop, self.task.chat_metric
        if layerskip and gen.sample:
            gen = dataclasses.replace(gen, temperature=LAYERSKIP_TEMPERATURE if gen.temperature == 1.0
                                      else gen.temperature, top_p=LAYERSKIP_TOP_P if gen.top_p == 1.0 else gen.top_p)
        self.gen = gen
        self.examples = examples if examples is not None else load_run_examples(run, gen.seed)
        self.model = model or load_model(run.model, run.device, run.dtype, run.device_map, run.exits, run.core)
        self.max_steps = gen.max_steps or (LAYERSKIP_MAX_STEPS if layerskip else self.task.max_steps)
        self.generator: Generator = build_generator(self.model, dataclasses.replace(gen, max_steps=self.max_steps))
        self.generator.timer.enabled = run.breakdown and not control  # the baseline has no components anyway
        if self.generator.trained_knobs and not control:
            print(f"{self.generator.name}: {trained_note(self.generator)}", file=sys.stderr)
        skipped = getattr(self.generator, "skipped_thresholds", None)
        if skipped and not control:
            print(f"{self.generator.name}: calibrated {', '.join(sorted(skipped['knobs']))} not taken: the exit artifact "
                  f"was calibrated in {skipped['calibrated_dtype']} and this run is {skipped['run_dtype']} (its "
                  f"guarantee does not transfer); --dtype {skipped['calibrated_dtype']} uses it", file=sys.stderr)
        self.verdict = speculation_verdict(self.generator)  # the artifact's self-speculation verdict, if it has one
        verdict = self.verdict
        dtype = str(self.model.dtype).removeprefix("torch.")
        elsewhere = verdict and (verdict.get("fitted_dtype") not in (None, dtype)
                                 or verdict.get("fitted_device") not in (None, self.model.device.type))
        if verdict and "recosted_from" in verdict and not control:
            was = verdict["recosted_from"]
            said = (f"{verdict['knobs']} predicted {verdict['predicted_speedup']:.2f}x" if verdict["speculate"] else
                    f"don't speculate (best {verdict['best']['predicted_speedup']:.2f}x)")
            print(f"{self.generator.name}: the exit artifact's self-speculation recommendation was timed on "
                  f"{was['costed_on']['device']} {was['costed_on']['dtype']} ({was.get('knobs')}); re-costed on {self.model.device.type} {dtype} from its acceptance pattern: "
                  f"{said}", file=sys.stderr)
        if elsewhere and not control:
            print(f"{self.generator.name}: the exit artifact's self-speculation recommendation was timed on "
                  f"{verdict.get('fitted_hardware') or verdict.get('fitted_device')} in {verdict['fitted_dtype']} "
                  f"(predicted {verdict.get('predicted_speedup', float('nan')):.2f}x there); this run is "
                  f"{self.model.device.type} {dtype}, where that prediction was not made", file=sys.stderr)
        if verdict and not verdict["speculate"] and not control:
            print(f"{self.generator.name}: the exit artifact's recommender predicts no self-speculative setting at or "
                  f"above 1.0x on this machine (best {verdict['best'].get('predicted_speedup', float('nan')):.2f}x): "
                  "don't speculate; running the untrained defaults as asked", file=sys.stderr)
        room = self.model.max_context - self.max_steps  # the prompt and the generation must fit the context
        if room < 1:
            raise UsageError(f"--max_steps {self.max_steps} leaves no room for a prompt in this model's "
                             f"{self.model.max_context}-token context")
        if run.max_prompt_tokens is not None and run.max_prompt_tokens > room:
            raise UsageError(f"--max_prompt_tokens {run.max_prompt_tokens} + max_steps {self.max_steps} exceeds this "
                             f"model's {self.model.max_context}-token context: use at most {room}")
        self.max_prompt = run.max_prompt_tokens or room
        self._prompts: dict[int, tuple[list[int], bool]] = {}
        self.config_sha256: Optional[str] = None  # set by execute_schedule from this configuration's run.json

    @property
    def label(self) -> str:
        """Run directory name: task, strategy and the knobs that tell configurations apart."""
        knobs = "".join(f"_{k}{v}" for k, v in self.generator.knobs().items()
                        if v is not None and v is not False and k in ("exit_layer", "num_speculations", "criteria",
                                                                      "confidence", "threshold"))
        return (f"{self.task.name}_{self.generator.name}{knobs}"[:100]) + ("_control" if self.control else "")

    def prompt_ids(self, index: int) -> tuple[list[int], bool]:
        """Token ids fed for example `index` (chat template, left truncation), computed once."""
        if index not in self._prompts:
            ids = self.model.encode(self.examples[index].prompt, chat=self.run.chat_template)
            self._prompts[index] = (ids[-self.max_prompt:], True) if len(ids) > self.max_prompt else (ids, False)
        return self._prompts[index]

    def stop(self, fixed_length: Optional[bool] = None) -> StopCondition:
        fixed = self.run.fixed_length if fixed_length is None else fixed_length
        return StopCondition(self.model, self.max_steps, self.stops, fixed_length=fixed)

    def info(self, run_id: str, schedule: dict) -> RunInfo:
        task = {"name": self.task.name, "metric": self.metric, "stop": list(self.stops), "protocol": self.run.protocol,
                "max_steps": self.max_steps, "n_shot": self.run.n_shot, "num_examples": len(self.examples),
                "data": self.run.data_path or (f"hf:{self.task.hf[0]}" if self.run.data_source == "hf"
                                               else str(Path(DATA_DIR.name) / self.task.eval_file)),
                "data_sha256": data_sha256(self.run, self.task),
                "examples_sha256": sha256_of([[ex.id, sha256_of(self.prompt_ids(i)[0])]
                                              for i, ex in enumerate(self.examples)])}
        model = dict(self.model.describe(), load_seconds=self.model.load_seconds, source=self.run.model)
        knobs = self.generator.knobs()
        if self.generator.trained_knobs:
            knobs["trained_defaults"] = self.generator.trained_knobs
        verdict = self.verdict
        info = RunInfo(schema_version=SCHEMA_VERSION, run_id=run_id, created=datetime.now(timezone.utc).isoformat(),
                       command=list(sys.argv), strategy=self.generator.name, knobs=knobs,
                       generation=dataclasses.asdict(self.gen), run=dataclasses.asdict(self.run), task=task,
                       model=model, environment=environment(self.model.device), control=self.control,
                       schedule=schedule)
        skipped = getattr(self.generator, "skipped_thresholds", None)
        if skipped:
            info.model = dict(info.model, exit_thresholds_not_taken=skipped)
        info.cost_curve = invocation_cost_curve(self.model)
        if verdict is not None:  # what the shipped recommendation predicted, beside what this run measures
            info.model = dict(info.model, speculation_verdict={k: verdict.get(k) for k in (
                "speculate", "knobs", "predicted_speedup", "best", "untrained_default", "fitted_dtype",
                "fitted_device", "fitted_hardware", "recosted_from")})
        info.config_sha256 = config_sha256(info)
        return info

    def generate(self, index: int) -> GenerationResult:
        """One timed generation of example `index`."""
        return self.generator.generate(self.prompt_ids(index)[0], self.stop())

    def score(self, index: int, runs: list[tuple[GenerationResult, int]]) -> ExampleRecord:
        """The record of example `index` from its timed repeats; quality from the first repeat's text."""
        ex, (ids, truncated) = self.examples[index], self.prompt_ids(index)
        tokens = runs[0][0].tokens
        kept = self.stop(fixed_length=False).first_stop(tokens) or (len(tokens), runs[0][0].stop_reason)
        prediction = cut_at_stop(self.model.decode(tokens[:kept[0]]), self.stops)
        metrics = METRICS[self.metric](prediction, ex)
        record = make_record(index, ex, ids, truncated, runs, prediction, kept, metrics)
        record.method_log = self.generator.log_state()
        record.config_sha256 = self.config_sha256
        return record

    def warm_up(self, index: int) -> None:
        """This configuration's own untimed warm-up on one prompt (kernels for its shapes)."""
        ids = self.prompt_ids(index)[0]
        for _ in range(self.run.warmup):
            self.generator.generate(ids, StopCondition(self.model, min(self.max_steps, 16), (), eos_ids=set()))
        self.generator.reset_state()  # a method that learns over the run (FREE's estimator) starts afresh

    def execute(self, progress: bool = True, parent: Optional[Path] = None,
                resume: Optional[Path] = None, dist: Dist = SINGLE) -> tuple[Path, Summary]:
        """Run every example of this one configuration (see `execute_schedule`)."""
        (path, summary), = execute_schedule([self], parent, progress, [resume] if resume else None, dist)
        return path, summary


WARMUP_STEPS = 4  # decode steps of the per-example full-model warm-up


def rotation(num_configs: int, example: int, repeat: int = 0, repeats: int = 1) -> list[int]:
    """Configuration order for one (example, repeat): a cyclic Latin square.

    Row (example * repeats + repeat) of the square, so over any `num_configs` consecutive rows every
    configuration runs first (and in every other slot) exactly once: whatever one-time cost a new prompt
    carries is spread evenly instead of being charged to whoever runs first.
    """
    shift = (example * repeats + repeat) % num_configs
    return [(shift + j) % num_configs for j in range(num_configs)]


def execute_schedule(benches: list[Benchmark], parent: Optional[Path] = None, progress: bool = True,
                     resume: Optional[list[Path]] = None, dist: Dist = SINGLE) -> list[tuple[Path, Summary]]:
    """Every configuration on every example, interleaved; one run directory per configuration.

    Per example: (several configurations only) an untimed full-model warm-up on that prompt, then the
    timed runs, every configuration back to back in the rotated order of `rotation`, --repeats times;
    then one record per configuration is appended and flushed. Each configuration also warms up once on
    the first prompt before anything is timed. With `resume` (the configurations' existing run
    directories), recorded examples are kept and only missing (example, configuration) pairs run. Under
    torchrun each process takes every world-th example and rank 0 merges the shards at the end.
    """
    run, C = benches[0].run, len(benches)
    schedule = {"num_configs": C, "repeats": run.repeats, "warmup": run.warmup, "rotation": "cyclic_latin_square",
                "per_example_warmup_steps": WARMUP_STEPS if C > 1 and run.warmup > 0 else 0,
                "invocation": parent.name if parent is not None and C > 1 else None}
    paths, infos, writers = [], [], []
    for c, b in enumerate(benches):
        if resume is None:
            path = Path(broadcast(str(new_run_dir(parent or run.output_dir, b.label)) if dist.rank == 0 else None,
                                  dist))
            info = b.info(path.name, dict(schedule, config_index=c))
        else:
            path = resume[c]
            info = RunInfo(**read_run_info(path, dist))
            if dist.active and info.environment.get("world_size") != dist.world:
                raise UsageError(f"--resume {path}: it ran with {info.environment.get('world_size')} processes; "
                                 f"resume it with the same number (now {dist.world}): examples are sharded by rank")
            why = identity_mismatch(info, b.info(info.run_id, info.schedule))
            if why is not None:
                raise UsageError(f"--resume {path}: this run cannot be continued as it was made: {why}"[:400])
        b.config_sha256 = info.config_sha256
        writer = RunWriter(path, info, resume=resume is not None, shard=dist.rank if dist.active else None,
                           shard_dir=shard_dir(run, path, dist))
        for r in writer.records:
            if r.index >= len(b.examples) or b.examples[r.index].id != r.id:
                raise UsageError(f"--resume {path}: its example {r.index} ({r.id}) is not this run's; data changed?")
            if r.config_sha256 != info.config_sha256:
                raise UsageError(f"--resume {path}: the record of example {r.id} was made by another configuration "
                                 f"({r.config_sha256} != this run's {info.config_sha256}); it cannot be pooled")
        paths.append(path), infos.append(info), writers.append(writer)
    done = [{r.index for r in w.records} for w in writers]
    n = len(benches[0].examples)
    todo = [i for i in range(n) if i % dist.world == dist.rank and any(i not in d for d in done)]
    warm = build_generator(benches[0].model, GenerationConfig()) if C > 1 and run.warmup > 0 else None
    status, error, failure = "complete", None, None
    try:
        if todo and run.warmup > 0:
            for b in benches:
                b.warm_up(todo[0])
        for i in tqdm(todo, desc=f"{benches[0].task.name}: {C} configuration(s)", unit="ex",
                      disable=not progress or dist.rank > 0, file=sys.stderr):
            if warm is not None:  # untimed: the same prompt through the full model, a few decode steps
                for _ in range(run.warmup):
                    warm.generate(benches[0].prompt_ids(i)[0],
                                  StopCondition(benches[0].model, WARMUP_STEPS + 1, (), eos_ids=set()))
            pending = [c for c in range(C) if i not in done[c]]
            timed: dict[int, list] = {c: [] for c in pending}
            for r in range(run.repeats):
                for slot, c in enumerate(x for x in rotation(C, i, r, run.repeats) if x in timed):
                    timed[c].append((benches[c].generate(i), slot))
            for c in pending:
                writers[c].append(benches[c].score(i, timed[c]))
    except KeyboardInterrupt as e:
        status, error = "interrupted", str(e) or "interrupted by the user (SIGINT)"
        for w, info in zip(writers, infos):  # every finished record is already on disk
            w.finish(info, status, error) if not dist.active else w.close()
        raise
    except Exception as e:  # noqa: BLE001 - recorded, the records kept, and raised again below
        status, error, failure = "failed", f"{type(e).__name__}: {e}", e
    if not dist.active:
        summaries = [w.finish(info, status, error) for w, info in zip(writers, infos)]
    else:
        summaries = merge_over_ranks(writers, infos, status, error, dist)
    if failure is not None:
        raise failure
    return list(zip(paths, summaries))


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


def resume_configs(path: str, dist: Dist = SINGLE) -> tuple[list[Path], RunConfig, list[GenerationConfig], list[bool]]:
    """The configurations recorded under --resume PATH: one run directory, or a multi-configuration folder."""
    root = Path(path)
    own = f"shards/run.rank{dist.rank}.json"  # a rank without rank 0's storage has its own copy
    is_run = lambda d: (d / "run.json").is_file() or (dist.rank > 0 and (d / own).is_file())  # noqa: E731
    dirs = [root] if is_run(root) else sorted(d for d in root.glob("*") if d.is_dir() and is_run(d))
    if not dirs:
        raise UsageError(f"--resume {path}: not a run directory or a folder of run directories")
    try:
        infos = [read_run_info(d, dist) for d in dirs]
        order = sorted(range(len(dirs)), key=lambda k: infos[k].get("schedule", {}).get("config_index", 0))
        dirs, infos = [dirs[k] for k in order], [infos[k] for k in order]
        run = RunConfig(**infos[0]["run"])
        gens = [GenerationConfig(**i["generation"]) for i in infos]
        return dirs, run, gens, [bool(i.get("control")) for i in infos]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise UsageError(f"--resume {path}: not a readable run directory ({e})") from None


def refuse_flags_with_resume(path: str, args, typed: set) -> None:
    """--resume continues a run exactly as it was configured: a typed flag that differs from the run's is refused."""
    if not typed:
        return
    _, run, gens, _ = resume_configs(path)
    run_fields = {f.name for f in dataclasses.fields(RunConfig)}
    gen_fields = {f.name for f in dataclasses.fields(GenerationConfig)}
    for name in sorted(typed):
        value = getattr(args, name)
        if name in run_fields:
            recorded = [getattr(run, name)]
        elif name in gen_fields:
            recorded = [getattr(g, name) for g in gens]
        else:
            raise UsageError(f"--{name} cannot be given with --resume: the configurations come from the run directory")
        if any(value != r for r in recorded):
            raise UsageError(f"--{name} {value} differs from the run's {recorded[0] if len(set(map(str, recorded))) == 1 else recorded}: "
                             "--resume continues a run as it was made; start a new run to change it")


def resume(path: str, progress: bool = True, dist: Dist = SINGLE, device: Optional[str] = None
           ) -> list[tuple[Path, Summary]]:
    """Finish an interrupted run (or multi-configuration folder) in place; under torchrun each rank
    resumes from its own shard file."""
    dirs, run, gens, controls = resume_configs(path, dist)
    if not dist.active:  # one writer per run directory, taken before any model time is spent
        for d in dirs:
            lock_run(d)
    if device is not None:
        run = dataclasses.replace(run, device=device)
    # `--dtype auto` is resolved again by measurement: resume in the dtype the run actually used
    made_in = json.loads((dirs[0] / "run.json").read_text(encoding="utf-8")).get("model", {}).get("dtype")
    dtype = made_in if run.dtype == "auto" and made_in else run.dtype
    model = load_model(run.model, run.device, dtype, run.device_map, run.exits, run.core)
    examples = load_run_examples(run, gens[0].seed)
    benches = [Benchmark(run, g, model, examples, control=c) for g, c in zip(gens, controls)]
    return execute_schedule(benches, dirs[0].parent if len(dirs) > 1 else None, progress, dirs, dist)


# -- several configurations in one invocation -------------------------------------------------------
def parse_spec(spec: str) -> tuple[str, dict]:
    """'self_speculative:exit_layer=8:num_speculations=6' -> (strategy, typed overrides)."""
    name, *parts = spec.strip().split(":")
    overrides = {}
    for part in parts:
        if "=" not in part:
            raise UsageError(f"strategy spec {spec!r}: expected knob=value after ':', got {part!r}")
        k, v = part.split("=", 1)
        overrides[k] = parse_value(k, v)
    return name, overrides


def _in_all() -> list[tuple[str, type]]:
    """(name, class) of every method that places itself in `--strategies all`, in its place."""
    from .generators import load_all

    return sorted(((n, c) for n, c in load_all().items() if c.in_all is not None), key=lambda nc: nc[1].in_all)


def all_members() -> str:
    """What `--strategies all` runs, in order, from the registry (for --help)."""
    return ", ".join(f"{n} ({c.all_note})" if c.all_note else n for n, c in _in_all())


def expand_strategies(text: str, base: GenerationConfig, num_layers: int, exits=None) -> list[GenerationConfig]:
    """--strategies a,b:k=v,... or all -> configs, the full-depth autoregressive baseline first.

    `exits`: the attached exit artifact, if any: `all` then adds the methods that need trained exits
    (hybrid_speculative; policy when it holds ConsistentEE policies), and self-speculation without an explicit
    --exit_layer takes the artifact's recommended one instead of L/4.
    """
    from .generators import baseline_name, load_all

    specs: list[tuple[str, dict]] = []
    for item in text.split(","):
        if item.strip() == "all":  # every method that places itself in `all`, with the configurations it asks for
            specs += [(n, over) for n, c in _in_all() for over in c.all_specs(base, exits)]
        elif item.strip():
            specs.append(parse_spec(item))
    known, baseline = load_all(), baseline_name()
    configs = [for_strategy(base, baseline)]
    for name, over in specs:
        if name not in known:
            raise UsageError(f"unknown strategy {name!r} in --strategies; choose from: {', '.join(sorted(known))}")
        if name == baseline and not over:
            continue  # the baseline is already first
        over = {**known[name].spec_defaults(base, over, num_layers, exits), **over}
        configs.append(for_strategy(base, name, **over))
    return configs


def expand_sweep(items: list[str], base: GenerationConfig) -> list[GenerationConfig]:
    """--sweep exit_layer=4,6,8 num_speculations=2,4 -> the grid for --generation_strategy, baseline first."""
    import itertools

    axes = []
    for item in items:
        if "=" not in item:
            raise UsageError(f"--sweep expects knob=v1,v2,..., got {item!r}")
        k, vals = item.split("=", 1)
        if not vals.strip() or any(not v.strip() for v in vals.split(",")):
            raise UsageError(f"--sweep {item!r}: every value must be non-empty, e.g. {k}=0.8,0.9")
        axes.append([(k, parse_value(k, v.strip())) for v in vals.split(",")])
    from .generators import baseline_name

    strategy = base.generation_strategy
    configs = [for_strategy(base, baseline_name())]
    for combo in itertools.product(*axes):
        configs.append(for_strategy(base, strategy, **dict(combo)))
    return configs


def run_many(run: RunConfig, configs: list[GenerationConfig], progress: bool = True,
             model: Optional[LayeredModel] = None, dist: Dist = SINGLE,
             control: bool = True) -> tuple[Path, list[Summary]]:
    """Every configuration on the same examples with one loaded model, interleaved; one run directory each.

    configs[0] is the baseline; with `control` a second copy of it joins the rotation as the A/A control
    (marked `control` in its run log), whose speedup over the baseline is the noise floor.
    """
    model = model or load_model(run.model, run.device, run.dtype, run.device_map, run.exits, run.core)
    examples = load_run_examples(run, configs[0].seed)
    benches = [Benchmark(run, cfg, model, examples) for cfg in configs]  # validate all before running any
    if control:
        benches.insert(1, Benchmark(run, configs[0], model, examples, control=True))
    parent = Path(broadcast(str(new_run_dir(run.output_dir, f"{run.dataset}_multi")) if dist.rank == 0 else None,
                            dist))
    results = execute_schedule(benches, parent, progress, dist=dist)
    return parent, [s for _, s in results]
