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
3. fixed-sequence testing (`fixed_sequence_test`): reject H_1, H_2, ... in order while p_j <= epsilon and stop
   at the first candidate that fails; the chosen threshold is the most aggressive rejected candidate. FST
   controls the family-wise error at epsilon without a multiplicity correction because the order is fixed in
   advance. Candidates after the first failure are never generated (that is also what makes it cheap).
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

Candidates (`--calibrate_grid` G, never-exit included): value_j = never + (aggressive - never) * (j/(G-1))^2,
j = 0..G-1: quadratic spacing, dense near the safe end where usable thresholds are (1.0, 0.98, 0.92, ... for
G = 8). The dynamic schedules are calibrated flat (start = end) on purpose: the fork's start/end/scale shape
has three knobs and LTT needs a one-dimensional, ordered family; a flat schedule is that family.

Deviations from CALM, on purpose: CALM calibrates on encoder-decoder T5 with task data of thousands of examples;
here the defaults are 24 prompts x 32 new tokens of the bundled XSum validation split so the recipe runs on CPU
in minutes (the guarantee holds at any n, it is just conservative: with zero losses candidate 1 passes only
if (1 - delta)^n <= epsilon, which the recipe checks and reports). Prompts are truncated from the left to
`--calibrate_max_prompt_tokens` (700) to bound prefill cost. Calibration documents that a recipe recorded in the
artifact's provenance trained on (same source, seed and max_docs as common.load_texts) are used last; if some
had to be used, the entry counts them in `overlap_with_training` (the guarantee assumes calibration losses
exchangeable with test losses, which training on those documents can bias optimistically). Generation runs in
the model's dtype: the train CLI loads float32 on CUDA too, so pass `--dtype bfloat16` there to calibrate the
exits as evaluation (bf16 on CUDA by default) runs them. The guarantee covers what was calibrated: greedy outputs
of `--calibrate_max_steps` tokens (XSum evaluation generates up to 64; calibrate with that many to cover it) and
the knobs as set here (another --confidence or --min_exit_layer at run time is another method).

Writes `art.thresholds[key] = {"knobs": {...}, "delta", "epsilon", "risk", "examples", "split", "tested":
[[value, mean loss, p-value], ...], "passed" (a candidate was certified, possibly only the never-exit one),
"exits_early" (the chosen value is not the never-exit one), ...}`; Generator.apply_trained_defaults gives `knobs`
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
from ..tasks import DATA_DIR, TASKS, Example, read_jsonl
from . import recipe
from .common import SOURCES, TrainConfig, provenance, start_artifact

# --calibrate_dataset -> (task whose prompt format, reference and stop strings are used, split named in the entry)
DATASETS = {"xsum_validation": ("xsum_summarization", "xsum validation"), "gsm8k_train": ("gsm8k", "gsm8k train")}
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

    def grid(self, size: int, vocab_size: int) -> list[float]:
        end = math.log(vocab_size) if self.aggressive is None else self.aggressive
        return [round(self.never + (end - self.never) * (j / (size - 1)) ** 2, 6) for j in range(size)]

    def config(self, value: float, max_steps: int) -> GenerationConfig:
        return GenerationConfig(generation_strategy=self.strategy, criteria=self.criteria, max_steps=max_steps,
                                **{n: value for n in self.names})


KNOBS: dict[str, Knob] = {
    "calm": Knob("calm", None, ("threshold",), 1.0, 0.0),
    "free": Knob("free", None, ("threshold",), 1.0, 0.0),
    "dynamic:max_probability": Knob("dynamic", "max_probability", ("max_prob_start", "max_prob_end"), 1.0, 0.0),
    "dynamic:entropy_based": Knob("dynamic", "entropy_based", ("entropy_start", "entropy_end"), 0.0, None),
}


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
    calibrate_grid: int = _f(8, "candidate values per method, never-exit included, safest first")
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


# -- data ---------------------------------------------------------------------------------------------------
def _trained_on(art, source: str, size: int) -> set[int]:
    """Record indices of `source` that the artifact's training recipes read (common.load_texts' selection)."""
    used: set[int] = set()
    for name, prov in (art.provenance or {}).items():
        c = prov.get("config") or {}
        if name == "calibrate" or source not in [s.strip() for s in str(c.get("data", "")).split(",")]:
            continue
        order = list(range(size))
        random.Random(c.get("seed", 0)).shuffle(order)  # same permutation as shuffling the formatted docs
        used.update(order[:c.get("max_docs", size)])
    return used


def calibration_order(cfg: TrainConfig, opts: CalibrateOptions, art) -> tuple[list[Example], set[str]]:
    """Every example of the chosen split in the task's own format, in calibration order (seeded shuffle, documents
    the artifact's training read last), and the ids of those training read."""
    task = TASKS[DATASETS[opts.calibrate_dataset][0]]
    records = [r for _, r in read_jsonl(DATA_DIR / SOURCES[opts.calibrate_dataset][0])]
    order = list(range(len(records)))
    random.Random(f"calibrate:{cfg.seed}").shuffle(order)
    used = _trained_on(art, opts.calibrate_dataset, len(records))
    order = [i for i in order if i not in used] + [i for i in order if i in used]
    return [Example(str(i), task.prompt(records[i]), task.reference(records[i])) for i in order], \
        {str(i) for i in used}


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
    ordered, trained = calibration_order(cfg, opts, art)

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
    overlap = sum(ex.id in trained for ex in examples)
    if overlap:
        print(f"calibrate: {overlap} of {n} calibration documents were read by the artifact's training "
              "(the guarantee assumes calibration data exchangeable with test data)")
    floor = min_certifiable_delta(n, opts.calibrate_epsilon)
    if opts.calibrate_delta < floor:
        print(f"calibrate: with {n} examples and epsilon {opts.calibrate_epsilon}, no delta below {floor:.3f} can "
              f"be certified even at zero loss; --calibrate_delta {opts.calibrate_delta} keeps the never-exit values")

    def loss(text: str, i: int) -> float:
        if opts.calibrate_risk == "reference":
            return reference_loss(text, full[i], examples[i].reference)
        return consistency_loss(text, full[i])

    metrics = {}
    for key in keys:
        knob = KNOBS[key]
        grid = knob.grid(opts.calibrate_grid, model.vocab_size)
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
                 "pvalue": opts.calibrate_pvalue, "never_exit": grid[0], "avg_exit_layer": depth_means,
                 "max_steps": opts.calibrate_max_steps, "max_prompt_tokens": cap,
                 "overlap_with_training": overlap, "skipped_empty": skipped}
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
                                             data=split, examples=n, overlap_with_training=overlap,
                                             skipped_empty=skipped)
    art.save(out_path)
    return art
