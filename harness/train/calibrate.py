"""Calibrate exit thresholds with a statistical guarantee (CALM's Learn-then-Test calibration).

CALM (Schuster et al., NeurIPS 2022, Sec. 4) turns local per-token exit decisions into a global, sequence-level
guarantee with Learn then Test (Angelopoulos, Bates, Candes, Jordan & Lei 2021): for a tolerance delta and a
confidence 1 - epsilon, the threshold lambda_hat it returns satisfies

    P( E[ L(Y_early(lambda_hat), .) ] <= delta ) >= 1 - epsilon

over the draw of the calibration set, for test prompts exchangeable with the calibration prompts. Procedure
(what `calibrate` does per method):

1. candidates lambda_1, ..., lambda_G ordered from safest (lambda_1 = never exit) to most aggressive;
2. for each candidate j, the null hypothesis H_j: R(lambda_j) > delta, and a valid p-value p_j computed from
   the n per-example losses in [0, 1] (`p_value`; LTT's Hoeffding-Bentkus p-value, as CALM):
       p_HB = min( exp(-n * h1(min(R_hat, delta), delta)),  e * P(Binomial(n, delta) <= ceil(n * R_hat)) ),
       h1(a, b) = a log(a/b) + (1 - a) log((1 - a)/(1 - b));
   (`--calibrate_pvalue hoeffding` keeps only the first term);
3. fixed-sequence testing (`fixed_sequence_test`; LTT's fixed-sequence procedure, one of the FWER-controlling
   algorithms it plugs p-values into, arXiv 2110.01052; CALM uses it the same way): reject H_1, H_2, ... in
   order while p_j <= epsilon and stop at the first candidate that fails; the chosen threshold is the most
   aggressive rejected candidate. FST controls the family-wise error at epsilon without a multiplicity
   correction because the order is fixed in advance, before seeing the calibration data. Candidates after the
   first failure are never generated (that is also what makes it cheap), so the order decides what can be
   certified: a coarse first step (e.g. never-exit then 0.889) that fails certifies nothing in between.
   If even lambda_1 is not rejected (too few examples for delta, or delta = 0), the never-exit value is kept
   and the entry says `"passed": false`.

Quality loss per example (`--calibrate_risk`), both in [0, 1] as the p-value requires:
- consistency (default; CALM's *textual consistency*): 1 - ROUGE-L F(method output, full-model greedy output on
  the same prompt); identical texts cost 0 (rouge-score gives 0 for two empty strings);
- reference (CALM's *risk consistency*): max(0, ROUGE-L(full, reference) - ROUGE-L(method, reference)), the drop
  in quality against the dataset's reference, clipped at 0.
ROUGE is the harness's (harness.metrics.rouge: rouge-score, Porter stemming). Outputs are cut at the task's stop
strings exactly as the evaluation runner cuts predictions (harness.runner.cut_at_stop).

Prompts whose full-model output ends at its first token (e.g. XSum articles cut from the left, where the model
answers "Summary:" with a newline) are skipped by default (`--calibrate_skip_empty`): every method takes its
first token from the full-depth prefill, so their loss is exactly 0 for every threshold. The guarantee then holds
for the remaining prompts, and since the skipped ones add zero loss, R(all prompts) <= R(non-trivial prompts)
<= delta still holds for the prompt distribution, with n counting only informative examples.

Which knob each method calibrates (one scalar per method; other knobs stay at their defaults or the attached
artifact's `recommended` values, i.e. the exits are calibrated as they will be used):

| artifact key             | GenerationConfig knob(s) set to the value  | never exits | most aggressive   |
|--------------------------|--------------------------------------------|-------------|-------------------|
| calm                     | threshold (softmax margin, conf > value)   | 1.0         | 0.0               |
| free                     | threshold (softmax margin, conf > value)   | 1.0         | 0.0               |
| dynamic:max_probability  | max_prob_start = max_prob_end = value      | 1.0         | 0.0               |
|                          | (constant schedule: maxprob > value)       |             |                   |
| dynamic:entropy_based    | entropy_start = entropy_end = value        | 0.0         | ln(vocab size)    |
|                          | (constant schedule: entropy < value)       |             |                   |

Candidates (`--calibrate_grid` G, never-exit included), descending from never-exit in geometric steps:
value_0 = never, value_j = never + (aggressive - never) * f * (1/f)^((j-1)/(G-2)) for j = 1..G-1, with
f = `--calibrate_finest` (0.001): the first step moves 0.1% of the range, each next one ~(1/f)^(1/(G-2)) times
further, the last candidate is the aggressive end. For calm/free/max_probability and G = 8: 1.0, 0.999, 0.99684,
0.99, 0.968377, 0.9, 0.683772, 0.0 (G = 4: 1.0, 0.999, 0.968377, 0.0). The dynamic schedules are calibrated flat
(start = end) on purpose: the fork's start/end/scale shape has three knobs and LTT needs a one-dimensional,
ordered family; a flat schedule is that family.

Calibration data: the held-out tail of the split (its last `--holdout_docs` documents in file order, which no
training recipe reads: harness/train/common.py), in a seeded order. The guarantee assumes calibration losses
exchangeable with test losses, which training on the calibration documents breaks (it can bias them
optimistically), so the recipe refuses with one line when any of those documents is one the artifact's training
read: exact records (`training_data` in a recipe's provenance) or, for recipes that did not record them, the
documents their recorded config (data, seed, max_docs, holdout_docs) selects. An artifact trained with a smaller
--holdout_docs than the one calibrate is given overlaps; pass the training's value.

Deviations from CALM, on purpose: CALM calibrates on encoder-decoder T5 with task data of thousands of examples;
here the defaults are 24 prompts x 32 new tokens of the bundled XSum validation split so the recipe runs on CPU
in minutes (the guarantee holds at any n, it is just conservative: with zero losses candidate 1 passes only
if (1 - delta)^n <= epsilon, which the recipe checks and reports). Prompts are truncated from the left to
`--calibrate_max_prompt_tokens` (700) to bound prefill cost. Generation runs in the model's dtype: the train CLI
loads float32 on CUDA too, so pass `--dtype bfloat16` there to calibrate the exits as evaluation (bf16 on CUDA by
default) runs them.

Scope: the guarantee covers what was calibrated and nothing else: prompts exchangeable with the calibration
prompts (the split's task and prompt format, cut to the recorded prompt length), greedy outputs of at most
`--calibrate_max_steps` new tokens (XSum evaluation generates up to 64; calibrate with as many to cover it), the
recorded risk, and the knobs as set here (another --confidence or --min_exit_layer at run time is another
method). Other tasks and lengths are outside it. Each entry records that scope (`scope`, `guarantee`).

Writes `art.thresholds[key] = {"knobs": {...}, "delta", "epsilon", "risk", "examples", "split", "tested":
[[value, mean loss, p-value], ...], "passed" (a candidate was certified, possibly only the never-exit one),
"exits_early" (the chosen value is not the never-exit one), "scope": {task, split, documents, prompt format,
max_prompt_tokens, max_steps, n, delta, epsilon, risk, risk_definition, pvalue, procedure}, "guarantee": the
certified statement in one sentence, ...}`; Generator.apply_trained_defaults gives `knobs`
to every generator of that key whose knobs were left at their defaults. Each tested candidate is one JSON line in
`<work_dir>/train_log.jsonl`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Sequence

from ..config import GenerationConfig, UsageError, _f
from ..tasks import TASKS, Example
from . import recipe
from .common import (SOURCES, SPLITS, TrainConfig, documents_record, heldout_documents, provenance, source_records,
                     start_artifact, trained_records)

# --calibrate_dataset -> (task whose prompt format, reference and stop strings are used, split named in the entry)
DATASETS = SPLITS
RISK_DEFINITIONS = {
    "consistency": "1 - ROUGE-L F(output, full-model greedy output on the same prompt), outputs cut at the task's "
                   "stop strings (0 when identical)",
    "reference": "max(0, ROUGE-L F(full-model output, reference) - ROUGE-L F(output, reference)), outputs cut at the "
                 "task's stop strings",
}
RISKS = ("consistency", "reference")
PVALUES = ("hoeffding_bentkus", "hoeffding")


@dataclass(frozen=True)
class Knob:
    """The scalar calibrated for one artifact key."""

    strategy: str
    criteria: Optional[str]
    names: tuple  # GenerationConfig fields all set to the value
    never: float  # value under which the rule never fires
    aggressive: Optional[float]  # value under which it (almost) always fires; None = ln(vocab size)

    def grid(self, size: int, vocab_size: int, finest: float = 1e-3) -> list[float]:
        """Never-exit first, then geometric steps towards the aggressive end (the last candidate), the first one
        `finest` of the range: fixed-sequence testing stops at the first failure, so the candidates just past
        never-exit must be close to it for anything in between to be certifiable."""
        end = math.log(vocab_size) if self.aggressive is None else self.aggressive
        if size == 2:
            return [self.never, round(end, 6)]
        fracs = [0.0] + [finest * (1 / finest) ** ((j - 1) / (size - 2)) for j in range(1, size)]
        return [round(self.never + (end - self.never) * f, 6) for f in fracs]

    def config(self, value: float, max_steps: int) -> GenerationConfig:
        return GenerationConfig(generation_strategy=self.strategy, criteria=self.criteria, max_steps=max_steps,
                                **{n: value for n in self.names})


def _knobs() -> dict[str, Knob]:
    """Artifact key -> what is calibrated, from each method's `calibratable` (the registry is the one source)."""
    from ..generators import load_all

    return {f"{name}:{c}" if c else name: Knob(name, c, names, never, aggressive)
            for name, cls in load_all().items() for c, names, never, aggressive in cls.calibratable}


KNOBS: dict[str, Knob] = _knobs()


@dataclass
class CalibrateOptions:
    """Flags of --recipe calibrate."""

    calibrate_dataset: str = _f("xsum_validation", "calibration prompts (train/validation splits only): "
                                "xsum_validation = 'Article: ...\\nSummary:', gsm8k_train = 'Question: ...\\nAnswer:'",
                                choices=tuple(DATASETS))
    calibrate_examples: int = _f(24, "calibration prompts n (the guarantee holds at any n; small n is conservative)")
    calibrate_max_steps: int = _f(32, "new tokens per generation (task stop strings also end it)")
    calibrate_max_prompt_tokens: int = _f(700, "truncate prompts from the left to this many tokens (CPU cost)")
    calibrate_methods: str = _f("calm,free,dynamic:max_probability",
                                "comma-separated artifact keys to calibrate: " + ", ".join(KNOBS))
    calibrate_delta: float = _f(0.2, "tolerance delta: the expected loss (risk) the chosen threshold may have")
    calibrate_epsilon: float = _f(0.1, "the guarantee risk <= delta holds with probability >= 1 - epsilon")
    calibrate_grid: int = _f(8, "candidate values per method, never-exit included, safest first: geometric steps "
                             "from never-exit (see --calibrate_finest) to the most aggressive value")
    calibrate_finest: float = _f(1e-3, "the first candidate after never-exit lies this fraction of the "
                                 "never-exit..aggressive range from never-exit (1.0 -> 0.999 for calm)")
    calibrate_risk: str = _f("consistency", "per-example loss: consistency = 1 - ROUGE-L(output, full-model "
                             "output) (CALM's textual consistency); reference = max(0, ROUGE-L(full, reference) - "
                             "ROUGE-L(output, reference)) (CALM's risk consistency)", choices=RISKS)
    calibrate_skip_empty: bool = _f(True, "skip prompts whose full-model output ends at its first token (the "
                                    "full model picks that token in every method, so their loss is 0): calibrating "
                                    "on the rest bounds the risk of all prompts too, with more evidence per example")
    calibrate_pvalue: str = _f("hoeffding_bentkus", "p-value of H: risk > delta: hoeffding_bentkus (LTT, CALM) or "
                               "hoeffding (its first term only)", choices=PVALUES)


# -- statistics ---------------------------------------------------------------------------------------------
def _h1(a: float, b: float) -> float:
    """Bernoulli KL divergence KL(a || b) (LTT's h1), 0 log 0 = 0."""
    out = 0.0
    if a > 0:
        out += a * math.log(a / b)
    if a < 1:
        out += (1 - a) * math.log((1 - a) / (1 - b))
    return out


def _binom_cdf(k: int, n: int, p: float) -> float:
    """P(Binomial(n, p) <= k), summed in log space (no scipy)."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    lp, lq = math.log(p), math.log1p(-p)
    return min(1.0, sum(math.exp(math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp
                                 + (n - i) * lq) for i in range(k + 1)))


def p_value(losses: Sequence[float], delta: float, kind: str = "hoeffding_bentkus") -> float:
    """Valid p-value of H: E[loss] > delta from i.i.d. losses in [0, 1] (Learn then Test, Sec. 3).

    delta <= 0: H cannot be rejected from finitely many samples (p = 1); delta >= 1: H is impossible (p = 0).
    """
    n = len(losses)
    if n == 0 or delta <= 0:
        return 1.0
    if delta >= 1:
        return 0.0
    if any(not 0.0 <= x <= 1.0 for x in losses):
        raise ValueError("losses must lie in [0, 1]")
    r = sum(losses) / n
    hoeffding = math.exp(-n * _h1(min(r, delta), delta))
    if kind == "hoeffding":
        return min(1.0, hoeffding)
    if kind != "hoeffding_bentkus":
        raise ValueError(f"unknown p-value {kind!r}")
    bentkus = math.e * _binom_cdf(math.ceil(n * r - 1e-9), n, delta)
    return min(1.0, hoeffding, bentkus)


def fixed_sequence_test(candidates: Sequence, losses_of: Callable[[int], Sequence[float]], delta: float,
                        epsilon: float, kind: str = "hoeffding_bentkus",
                        on_tested: Optional[Callable[[int, list], None]] = None) -> tuple[Optional[int], list]:
    """Test candidates in order (safest first), stop at the first whose p-value exceeds epsilon.

    `losses_of(j)` is called only for the candidates actually tested. Returns (index of the most aggressive
    candidate that passed, or None if the first failed; [[candidate, mean loss, p-value], ...] as tested).
    """
    chosen, tested = None, []
    for j, value in enumerate(candidates):
        losses = list(losses_of(j))
        mean = sum(losses) / len(losses) if losses else float("nan")
        p = p_value(losses, delta, kind)
        tested.append([value, mean, p])
        if on_tested:
            on_tested(j, tested[-1])
        if p > epsilon:
            break
        chosen = j
    return chosen, tested


def min_certifiable_delta(n: int, epsilon: float) -> float:
    """Smallest delta that n zero losses can certify: (1 - delta)^n <= epsilon (Hoeffding term; HB is no better)."""
    return 1 - epsilon ** (1 / n) if n > 0 else 1.0


# -- losses -------------------------------------------------------------------------------------------------
def _rouge_l(prediction: str, reference: str) -> float:
    from ..metrics import rouge

    return rouge(prediction, Example("", "", reference))["rougeL"]


def consistency_loss(text: str, full: str) -> float:
    """1 - ROUGE-L F of the method's text against the full model's text (0 when they are the same text)."""
    if text.strip() == full.strip():
        return 0.0
    return min(1.0, max(0.0, 1.0 - _rouge_l(text, full)))


def reference_loss(text: str, full: str, reference: str) -> float:
    """ROUGE-L drop against the reference relative to the full model, clipped to [0, 1]."""
    if text.strip() == full.strip():
        return 0.0
    return min(1.0, max(0.0, _rouge_l(full, reference) - _rouge_l(text, reference)))


def guarantee(key: str, knobs: dict, scope: dict) -> str:
    """The certified statement with its scope, in one sentence."""
    values = ", ".join(f"{k} = {v:g}" for k, v in knobs.items())
    return (f"{key} with {values}: with probability >= {1 - scope['epsilon']:g} over the draw of the calibration "
            f"set, the expected loss {scope['risk_definition']} is <= {scope['delta']:g}, for {scope['decoding']} "
            f"outputs of at most {scope['max_steps']} new tokens on {scope['split']} prompts ({scope['task']} "
            f"format, cut to {scope['max_prompt_tokens']} tokens) exchangeable with the n = {scope['n']} "
            "calibration prompts; other tasks, lengths and knobs are not covered")


# -- data ---------------------------------------------------------------------------------------------------
def calibration_examples(cfg: TrainConfig, opts: CalibrateOptions, art) -> tuple[list[Example], list[int]]:
    """The split's held-out tail (its last --holdout_docs documents) in the task's own format, in calibration order
    (seeded shuffle), and their record indices. UsageError when the artifact's training read any of them."""
    source = opts.calibrate_dataset
    task, split = TASKS[DATASETS[source][0]], DATASETS[source][1]
    held = heldout_documents(source, cfg.holdout_docs)
    if not held:
        raise UsageError(f"--holdout_docs {cfg.holdout_docs}: no {split} documents are held out from training; "
                         "calibration needs documents training never read")
    trained, by = trained_records(art, source)
    overlap = set(held) & trained
    if overlap:
        raise UsageError(f"calibrate: {len(overlap)} of the {len(held)} held-out {split} documents (the last "
                         f"--holdout_docs {cfg.holdout_docs}) were read by the artifact's training ({', '.join(by)}); "
                         "calibration data must be disjoint from training data: pass the --holdout_docs it was "
                         "trained with, or retrain it with this one")
    order = list(held)
    random.Random(f"calibrate:{cfg.seed}").shuffle(order)
    records = source_records(source)
    return [Example(str(i), task.prompt(records[i]), task.reference(records[i])) for i in order], order


# -- generation ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _artifact_view(model, art):
    """Let generators read `art` as the model's exit artifact (adapters stay attached as they are)."""
    saved = model.exits
    model.exits = art
    try:
        yield
    finally:
        model.exits = saved


def _without(art, key: str, names: Sequence[str]):
    """`art` minus the entry being calibrated, so earlier calibrated / recommended values cannot replace a candidate
    that happens to equal a knob's default."""
    if art is None:
        return None
    rec = dict(art.recommended)
    if key in rec:
        rec[key] = {k: v for k, v in rec[key].items() if k not in names}
    return dataclasses.replace(art, thresholds={k: v for k, v in art.thresholds.items() if k != key},
                               recommended=rec)


def _generate(model, generator, ids: list[int], stop, stops: tuple):
    """(text cut at the first stop string as the runner scores it, exit layers, the GenerationResult)."""
    from ..runner import cut_at_stop

    res = generator.generate(ids, stop)
    return cut_at_stop(model.decode(res.tokens), stops), res.exit_layers, res


def _parse_methods(spec: str) -> list[str]:
    keys = [k.strip() for k in spec.split(",") if k.strip()]
    bad = [k for k in keys if k not in KNOBS]
    if bad or not keys:
        raise UsageError(f"--calibrate_methods {spec!r}: each must be one of {', '.join(KNOBS)}")
    return list(dict.fromkeys(keys))


def _check(opts: CalibrateOptions) -> None:
    if opts.calibrate_examples < 1:
        raise UsageError(f"--calibrate_examples must be >= 1, got {opts.calibrate_examples}")
    if opts.calibrate_max_steps < 1 or opts.calibrate_max_prompt_tokens < 1:
        raise UsageError("--calibrate_max_steps and --calibrate_max_prompt_tokens must be >= 1")
    if opts.calibrate_grid < 2:
        raise UsageError(f"--calibrate_grid must be >= 2 (never-exit and at least one threshold), got "
                         f"{opts.calibrate_grid}")
    if not 0 < opts.calibrate_finest < 1:
        raise UsageError(f"--calibrate_finest must be in (0, 1), got {opts.calibrate_finest}")
    if not 0 <= opts.calibrate_delta <= 1:
        raise UsageError(f"--calibrate_delta must be in [0, 1] (losses are in [0, 1]), got {opts.calibrate_delta}")
    if not 0 < opts.calibrate_epsilon < 1:
        raise UsageError(f"--calibrate_epsilon must be in (0, 1), got {opts.calibrate_epsilon}")


@recipe("calibrate", CalibrateOptions)
def calibrate(cfg: TrainConfig, opts: CalibrateOptions, model):
    """Calibrate calm/free/dynamic exit thresholds on a validation split (CALM's Learn-then-Test guarantee)."""
    from tqdm.auto import tqdm

    from ..generators import StopCondition, build_generator

    _check(opts)
    keys = _parse_methods(opts.calibrate_methods)
    t_start = time.perf_counter()
    art = start_artifact(cfg, model)
    work, out_path = cfg.paths()
    work.mkdir(parents=True, exist_ok=True)
    log_path = work / "train_log.jsonl"
    task = TASKS[DATASETS[opts.calibrate_dataset][0]]
    split = DATASETS[opts.calibrate_dataset][1]
    cap = max(1, min(opts.calibrate_max_prompt_tokens, model.max_context - opts.calibrate_max_steps))
    stop = StopCondition(model, opts.calibrate_max_steps, task.stop)
    ordered, _ = calibration_examples(cfg, opts, art)  # refuses documents the artifact trained on

    # full-model greedy outputs, once per prompt (autoregressive at full depth: no artifact knobs apply)
    examples, prompts, full, skipped = [], [], [], 0
    bar = tqdm(total=opts.calibrate_examples, desc="calibrate: full model", dynamic_ncols=True)
    with _artifact_view(model, None):
        ar = build_generator(model, GenerationConfig(max_steps=opts.calibrate_max_steps))
        for ex in ordered:
            ids = model.encode(ex.prompt)[-cap:]
            text, _, res = _generate(model, ar, ids, stop, task.stop)
            if opts.calibrate_skip_empty and len(res.tokens) <= 1 and res.stop_reason != "max_steps":
                skipped += 1  # its first token (always the full model's) ends it: loss 0 for every method
                bar.set_postfix(skipped=skipped)
                continue
            examples.append(ex)
            prompts.append(ids)
            full.append(text)
            bar.update(1)
            if len(examples) == opts.calibrate_examples:
                break
    bar.close()
    n = len(examples)
    if n == 0:
        raise UsageError(f"--calibrate_dataset {opts.calibrate_dataset}: the full model ends every prompt at its "
                         "first token; nothing to calibrate on (try --no-calibrate_skip_empty or longer prompts)")
    if n < opts.calibrate_examples:
        print(f"calibrate: only {n} prompts of {split} have an output longer than one token")
    floor = min_certifiable_delta(n, opts.calibrate_epsilon)
    if opts.calibrate_delta < floor:
        print(f"calibrate: with {n} examples and epsilon {opts.calibrate_epsilon}, no delta below {floor:.3f} can "
              f"be certified even at zero loss; --calibrate_delta {opts.calibrate_delta} keeps the never-exit values")

    scope = {"task": task.name, "split": split, "prompt_format": "the task's prompt, no shots",
             "documents": documents_record(opts.calibrate_dataset, [int(ex.id) for ex in examples]),
             "held_out": f"last {cfg.holdout_docs} records of {SOURCES[opts.calibrate_dataset][0]}, disjoint from the "
                         "artifact's training data",
             "skipped": f"{skipped} prompts whose full-model output is its first token (zero loss for every "
                        "threshold)" if opts.calibrate_skip_empty else "none",
             "max_prompt_tokens": cap, "max_steps": opts.calibrate_max_steps, "decoding": "greedy", "n": n,
             "delta": opts.calibrate_delta, "epsilon": opts.calibrate_epsilon, "risk": opts.calibrate_risk,
             "risk_definition": RISK_DEFINITIONS[opts.calibrate_risk], "pvalue": opts.calibrate_pvalue,
             "procedure": "Learn then Test, fixed-sequence testing from never-exit (arXiv 2110.01052; CALM Sec. 4)"}

    def loss(text: str, i: int) -> float:
        if opts.calibrate_risk == "reference":
            return reference_loss(text, full[i], examples[i].reference)
        return consistency_loss(text, full[i])

    metrics = {}
    for key in keys:
        knob = KNOBS[key]
        grid = knob.grid(opts.calibrate_grid, model.vocab_size, opts.calibrate_finest)
        depth_means: list[float] = []  # per tested candidate: mean exit depth of the generated tokens
        seconds: dict[int, float] = {}
        bar = tqdm(total=n * len(grid), desc=f"calibrate: {key}", dynamic_ncols=True)

        def losses_of(j: int) -> list[float]:
            t0 = time.perf_counter()
            with _artifact_view(model, _without(model.exits, key, knob.names)):
                g = build_generator(model, knob.config(grid[j], opts.calibrate_max_steps))
                losses, depths = [], []
                for i, ids in enumerate(prompts):
                    text, layers, _ = _generate(model, g, ids, stop, task.stop)
                    losses.append(loss(text, i))
                    depths += layers
                    bar.update(1)
            depth_means.append(sum(depths) / len(depths) if depths else float(model.num_layers))
            seconds[j] = time.perf_counter() - t0
            return losses

        def log(j: int, row: list) -> None:
            line = {"recipe": "calibrate", "method": key, "candidate": j, "knobs": {k: row[0] for k in knob.names},
                    "mean_loss": row[1], "p_value": row[2], "passed": row[2] <= opts.calibrate_epsilon,
                    "avg_exit_layer": depth_means[j], "delta": opts.calibrate_delta,
                    "epsilon": opts.calibrate_epsilon, "examples": n, "seconds": round(seconds[j], 2)}
            with open(log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(line) + "\n")
            bar.set_postfix(value=row[0], loss=f"{row[1]:.3f}", p=f"{row[2]:.3g}")

        chosen, tested = fixed_sequence_test(grid, losses_of, opts.calibrate_delta, opts.calibrate_epsilon,
                                             opts.calibrate_pvalue, on_tested=log)
        bar.close()
        value = grid[0] if chosen is None else grid[chosen]
        entry = {"knobs": {k: value for k in knob.names}, "delta": opts.calibrate_delta,
                 "epsilon": opts.calibrate_epsilon, "risk": opts.calibrate_risk, "examples": n, "split": split,
                 "tested": tested, "passed": chosen is not None, "exits_early": bool(chosen),
                 "pvalue": opts.calibrate_pvalue, "never_exit": grid[0], "grid": grid,
                 "avg_exit_layer": depth_means, "max_steps": opts.calibrate_max_steps, "max_prompt_tokens": cap,
                 "overlap_with_training": 0, "skipped_empty": skipped, "scope": scope,
                 "guarantee": guarantee(key, {k: value for k in knob.names}, scope) if chosen is not None else None}
        art.thresholds[key] = entry
        metrics[key] = {"knobs": entry["knobs"], "passed": entry["passed"], "exits_early": entry["exits_early"],
                        "tested": len(tested),
                        "mean_loss": tested[chosen][1] if chosen is not None else None,
                        "avg_exit_layer": depth_means[chosen] if chosen is not None else None}
        if chosen is None:
            print(f"calibrate {key}: no candidate passed (p = {tested[0][2]:.3g} > epsilon "
                  f"{opts.calibrate_epsilon} at the never-exit value); keeping the never-exit value "
                  f"{entry['knobs']}")
        elif chosen == 0:
            print(f"calibrate {key}: only the never-exit value passed (the next, {grid[1]}, has risk "
                  f"{tested[1][1]:.3f}, p = {tested[1][2]:.3g} > epsilon {opts.calibrate_epsilon}); keeping "
                  f"{entry['knobs']}")
        else:
            print(f"calibrate {key}: {entry['knobs']} (risk {tested[chosen][1]:.3f}, p = {tested[chosen][2]:.3g}, "
                  f"avg exit layer {depth_means[chosen]:.1f} of {model.num_layers}; "
                  f"{len(tested)} of {len(grid)} candidates tested)")

    art.provenance["calibrate"] = provenance(cfg, time.perf_counter() - t_start, metrics, options=asdict(opts),
                                             data=split, examples=n, overlap_with_training=0,
                                             skipped_empty=skipped, scope=scope)
    art.save(out_path)
    return art
