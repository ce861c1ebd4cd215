"""The benchmark loop: load, warm up, generate, score, log — one record at a time, every configuration on every
example in a rotated, interleaved schedule."""
from __future__ import annotations

import dataclasses
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from tqdm import tqdm

from .config import GenerationConfig, RunConfig, UsageError
from .distributed import SINGLE, Dist, broadcast
from .generators import Generator, GenerationResult, StopCondition, build_generator
from .logs import (SCHEMA_VERSION, ExampleRecord, RunInfo, RunWriter, Summary, config_sha256, identity_mismatch,
                   new_run_dir)
from .metrics import METRICS
from .model import LayeredModel, load_model
from .provenance import data_sha256, environment, invocation_cost_curve, sha256_of, speculation_verdict, trained_note
from .shards import merge_over_ranks, read_run_info, shard_dir
from .speedup_model import predicted
from .tasks import DATA_DIR, Example, Task, get_task, load_examples


def load_run_examples(run: RunConfig, seed: int) -> list[Example]:
    examples = load_examples(run.dataset, run.num_samples, run.n_shot, seed, run.data_path, run.data_source,
                             shuffle=run.protocol == "layerskip", categories=run.categories)
    if not examples:
        raise UsageError(f"no examples to evaluate in {run.data_path or get_task(run.dataset).eval_file}")
    return examples


def cut_at_stop(text: str, stops: tuple) -> str:
    """The continuation up to (not including) the first stop string."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=len(text))
    return text[:cut]


def _per(total: float, n: int) -> Optional[float]:
    return total / n if n > 0 else None


def decode_time_per_token(res: GenerationResult) -> Optional[float]:
    """The headline speed: decode seconds per token produced after the prefill (prefill excluded; a conversation
    has one prefill per turn)."""
    decoded = decoded_count(res)
    return res.decode_seconds / decoded if decoded > 0 else None


def decoded_count(res: GenerationResult) -> int:
    """Tokens decoded after the prefills: one prefill token per turn (logs.decoded_tokens says it of records)."""
    return max(len(res.tokens) - (len(res.turns) if res.turns else 1), 0)


def _sum(values: list) -> Optional[float]:
    """The sum of a counter over turns; None where a turn has none (the method does not count it)."""
    return None if any(v is None for v in values) else sum(values)


def conversation(turns: list[tuple[GenerationResult, str]]) -> GenerationResult:
    """One result for a conversation from each turn's result and kept text: tokens, depths and per-step counts
    concatenated, times and counters summed, and each turn's own figures in `turns` (Spec-Bench times each)."""
    results = [r for r, _ in turns]

    def cat(field: str) -> Optional[list]:
        lists = [getattr(r, field) for r in results]
        return None if any(x is None for x in lists) else [v for x in lists for v in x]

    return GenerationResult(
        tokens=cat("tokens"), exit_layers=cat("exit_layers"),
        prefill_seconds=sum(r.prefill_seconds for r in results), decode_seconds=sum(r.decode_seconds for r in results),
        stop_reason=results[-1].stop_reason, layer_forwards=sum(r.layer_forwards for r in results),
        head_calls=sum(r.head_calls for r in results), head_rows=sum(r.head_rows for r in results),
        exit_head_flops=sum(r.exit_head_flops for r in results),
        confidence_flops=sum(r.confidence_flops for r in results), kv_fill_flops=sum(r.kv_fill_flops for r in results),
        drafted=_sum([r.drafted for r in results]), accepted=_sum([r.accepted for r in results]),
        breakdown=None, verify_passes=_sum([r.verify_passes for r in results]),
        draft_passes=_sum([r.draft_passes for r in results]), top2_gaps=cat("top2_gaps"),
        accept_lengths=cat("accept_lengths"), step_drafts=cat("step_drafts"),
        graph_captures=sum(r.graph_captures for r in results),
        graph_capture_seconds=sum(r.graph_capture_seconds for r in results),
        turns=[{"text": text, "new_tokens": len(r.tokens), "prefill_seconds": r.prefill_seconds,
                "decode_seconds": r.decode_seconds, "accept_lengths": r.accept_lengths, "step_drafts": r.step_drafts}
               for r, text in turns])


def make_record(index: int, ex: Example, prompt_ids: list, truncated: bool, runs: list[tuple[GenerationResult, int]],
                prediction: str, kept: tuple[int, str], metrics: dict) -> ExampleRecord:
    """One example's record from its timed repeats [(result, slot in the rotation)]; tokens from the first."""
    res = runs[0][0]
    n, d = len(res.tokens), decoded_count(res)
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
                  "decode_seconds": r.decode_seconds, "new_tokens": len(r.tokens),
                  **({"graph_captures": r.graph_captures, "graph_capture_seconds": r.graph_capture_seconds}
                     if r.graph_captures else {})} for i, (r, slot) in enumerate(runs)],
        method_log=None, breakdown=res.breakdown, verify_passes=res.verify_passes, draft_passes=res.draft_passes,
        top2_gaps=[round(g, 4) for g in res.top2_gaps] if res.top2_gaps is not None else None,
        accept_lengths=res.accept_lengths, step_drafts=res.step_drafts, category=ex.meta.get("category"),
        turns=res.turns)


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
        self.verdict = speculation_verdict(self.generator)  # the artifact's speculation verdict, if it has one
        verdict = self.verdict
        drafter = self.generator.artifact_key() != "self_speculative"  # a trained drafter's verdict (its recipe's fit)
        what = "speculation recommendation" if drafter else "self-speculation recommendation"
        dtype = str(self.model.dtype).removeprefix("torch.")
        elsewhere = verdict and (verdict.get("fitted_dtype") not in (None, dtype)
                                 or verdict.get("fitted_device") not in (None, self.model.device.type))
        if verdict and "recosted_from" in verdict and not control:
            was = verdict["recosted_from"]
            said = (f"{verdict['knobs']} predicted {verdict['predicted_speedup']:.2f}x" if verdict["speculate"] else
                    f"don't speculate (best {predicted(verdict['best'])})")
            print(f"{self.generator.name}: the exit artifact's self-speculation recommendation was timed on "
                  f"{was['costed_on']['device']} {was['costed_on']['dtype']} ({was.get('knobs')}); re-costed on {self.model.device.type} {dtype} from its acceptance pattern: "
                  f"{said}", file=sys.stderr)
        if elsewhere and not control:
            print(f"{self.generator.name}: the exit artifact's {what} was timed on "
                  f"{verdict.get('fitted_hardware') or verdict.get('fitted_device')} in {verdict['fitted_dtype']} "
                  f"(predicted {predicted(verdict['best'])} there); this run is "
                  f"{self.model.device.type} {dtype}, where that prediction was not made", file=sys.stderr)
        if verdict and not verdict["speculate"] and not control:
            where = ("as timed at its fit" if drafter else "on this machine") if not elsewhere else "where it was timed"
            print(f"{self.generator.name}: the exit artifact's recommender predicts no "
                  f"{'' if drafter else 'self-speculative '}setting clearly above 1.0x {where} (best "
                  f"{predicted(verdict['best'])}): don't speculate; running "
                  f"{'its defaults without a recommendation' if drafter else 'the untrained defaults'} as asked",
                  file=sys.stderr)
        room = self.model.max_context - self.max_steps  # the prompt and the generation must fit the context
        if room < 1:
            raise UsageError(f"--max_steps {self.max_steps} leaves no room for a prompt in this model's "
                             f"{self.model.max_context}-token context")
        if run.max_prompt_tokens is not None and run.max_prompt_tokens > room:
            raise UsageError(f"--max_prompt_tokens {run.max_prompt_tokens} + max_steps {self.max_steps} exceeds this "
                             f"model's {self.model.max_context}-token context: use at most {room}")
        self.max_prompt = run.max_prompt_tokens or room
        if self.task.chat_only and not run.chat_template and not control:
            print(f"{self.task.name}: every turn goes through the model's chat template, as the benchmark does "
                  "(--chat_template is implied)", file=sys.stderr)
        self._prompts: dict[int, tuple[list[int], bool]] = {}
        self.config_sha256: Optional[str] = None  # set by execute_schedule from this configuration's run.json

    @property
    def label(self) -> str:
        """Run directory name: task, strategy and the knobs that tell configurations apart."""
        knobs = "".join(f"_{k}{v}" for k, v in self.generator.knobs().items()
                        if v is not None and v is not False and k in ("exit_layer", "num_speculations", "criteria",
                                                                      "confidence", "threshold"))
        return (f"{self.task.name}_{self.generator.name}{knobs}"[:100]) + ("_control" if self.control else "")

    @property
    def chat(self) -> bool:
        """Whether prompts go through the chat template: --chat_template, or a conversation task's own rule."""
        return self.run.chat_template or self.task.chat_only

    def truncated(self, ids: list[int]) -> tuple[list[int], bool]:
        return (ids[-self.max_prompt:], True) if len(ids) > self.max_prompt else (ids, False)

    def prompt_ids(self, index: int) -> tuple[list[int], bool]:
        """Token ids fed for example `index` (its first turn: chat template, left truncation), computed once."""
        if index not in self._prompts:
            self._prompts[index] = self.truncated(self.model.encode(self.examples[index].prompt, chat=self.chat))
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
        if self.task.chat_only:  # a conversation benchmark: always the chat template; which categories ran
            task.update(chat_template=True, categories=sorted({ex.meta["category"] for ex in self.examples}))
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
        """One timed generation of example `index`; a conversation task's example is its whole conversation."""
        if not self.task.chat_only:
            return self.generator.generate(self.prompt_ids(index)[0], self.stop())
        return self.converse(index)

    def converse(self, index: int) -> GenerationResult:
        """Every turn of example `index` in order, each timed on its own; a later turn's prompt holds the method's
        own earlier answers (Spec-Bench evaluation/eval.py 170-227: the answer, cut at the stop, joins the chat)."""
        messages, turns = [], []
        for i, text in enumerate(self.examples[index].meta.get("turns") or [self.examples[index].prompt]):
            messages.append({"role": "user", "content": text})
            ids = self.prompt_ids(index)[0] if i == 0 else self.truncated(self.model.encode_chat(messages))[0]
            res = self.generator.generate(ids, self.stop())
            kept = self.stop(fixed_length=False).first_stop(res.tokens) or (len(res.tokens), res.stop_reason)
            answer = cut_at_stop(self.model.decode(res.tokens[:kept[0]]), self.stops).strip()
            messages.append({"role": "assistant", "content": answer})
            turns.append((res, answer))
        return conversation(turns)

    def score(self, index: int, runs: list[tuple[GenerationResult, int]]) -> ExampleRecord:
        """The record of example `index` from its timed repeats; quality from the first repeat's text."""
        ex, (ids, truncated) = self.examples[index], self.prompt_ids(index)
        tokens, turns = runs[0][0].tokens, runs[0][0].turns
        kept = self.stop(fixed_length=False).first_stop(tokens) or (len(tokens), runs[0][0].stop_reason)
        prediction = cut_at_stop(self.model.decode(tokens[:kept[0]]), self.stops)
        if turns:  # a conversation: its answers, each cut at its own stop
            prediction = "\n\n".join(t["text"] for t in turns)
            kept = (len(tokens), runs[0][0].stop_reason)
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


def warm_prompt(warm: Generator, ids: list[int], times: int = 1) -> None:
    """Untimed: a prompt through the full model and a few decode steps, so that no configuration of the rotation
    pays for a new prompt's one-time costs (the schedule's and the lm-eval plug-in's per-example warm-up)."""
    for _ in range(times):
        warm.generate(ids, StopCondition(warm.model, WARMUP_STEPS + 1, (), eos_ids=set()))


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
            if warm is not None:
                warm_prompt(warm, benches[0].prompt_ids(i)[0], run.warmup)
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
