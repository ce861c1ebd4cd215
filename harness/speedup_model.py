"""Predicting self-speculative speed from measured costs and the draft exit's acceptance pattern.

Used by the `exit_adapters` recipe to recommend an exit layer / draft length / draft threshold / draft vocabulary
or not to speculate at all, and by the diagnostics to put a predicted speedup beside a measured one. The cost
figures are measured on the machine at hand (`measure_costs`). The acceptance pattern is the draft exit's top-1
agreement with the full model along a token sequence. Greedy verification checks drafts against the full model's
own greedy tokens, so the recipe fits it on the model's greedy continuations of held-out prompts: teacher forcing
on those tokens is then exact (an accepted draft equals the greedy token, so the next draft sees the context the
generator gives it; the first rejected draft ends the step). Teacher forcing on human text instead measures
agreement on contexts the generator never drafts in.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch


@dataclass
class Costs:
    """Seconds, medians of repeated timings with the device synchronized."""

    layer: float  # one decoder layer, one position, at the measured context
    layer_chunk: dict  # positions q -> one decoder layer over q positions at once
    head: dict  # positions q -> full exit head (norm + lm_head) over q positions at once
    head_rows: float  # exit head on the candidate vocabulary rows, one position
    adapter: float  # one exit adapter, one position
    context: int  # prompt length the timings were taken at
    rows: int = 0  # candidate rows head_rows was timed on (0: none; head_rows is then the full head)

    def step(self) -> float:
        """One autoregressive decode step: every layer + the full head."""
        return self.layer * self.layer_count + self.head[1]

    layer_count: int = 0


def median_time(fn, sync, reps: int = 7) -> float:
    """Median seconds of `fn` over `reps` synchronized runs, after one untimed warm-up run."""
    return interleaved_medians({"fn": fn}, sync, reps)["fn"]


def interleaved_medians(fns: dict, sync, reps: int = 7) -> dict:
    """Median seconds of each of `fns` (name -> callable), after one untimed warm-up of each: every repetition times
    all of them in turn, so that a machine whose speed drifts while they are timed (just after a model loads, say)
    moves them alike and the ratios between them, which are what a verdict or a cost curve reads, stay true."""
    for fn in fns.values():
        fn()
    times: dict = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            sync()
            t = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


@torch.inference_mode()
def measure_costs(model, rows: Optional[torch.Tensor] = None, context: int = 512, max_q: int = 8) -> Costs:
    """Time a layer, the full head and the reduced head on this model and device at `context` positions."""
    m = model
    ids = torch.randint(0, m.vocab_size, (1, context), generator=torch.Generator().manual_seed(0)).to(m.device)
    cache = m.new_cache()
    m.run_layers(m.embed(ids), 0, 1, cache, 0)
    fns: dict = {}
    for q in range(1, max_q + 1):
        h = torch.randn(1, q, m.hidden_size, device=m.device, dtype=m.dtype)
        rope = m.rope(h, context)

        def one_layer(h=h, rope=rope):
            m.run_layers(h, 0, 1, cache, context, rope=rope)
            m.crop(cache, context, [0])

        fns[("layer", q)] = one_layer
        fns[("head", q)] = lambda h=h: m.exit_logits(h)
    h1 = torch.randn(1, 1, m.hidden_size, device=m.device, dtype=m.dtype)
    if rows is not None:
        fns[("head_rows", 1)] = lambda: m.exit_logits(h1, rows)
    if m.adapters:
        a = next(iter(m.adapters.values()))
        fns[("adapter", 1)] = lambda: a(h1)
    t = interleaved_medians(fns, m.synchronize, reps=15)
    m.reset_counters()
    layer_chunk = {q: t[("layer", q)] for q in range(1, max_q + 1)}
    head = {q: t[("head", q)] for q in range(1, max_q + 1)}
    return Costs(layer=layer_chunk[1], layer_chunk=layer_chunk, head=head, head_rows=t.get(("head_rows", 1), head[1]),
                 adapter=t.get(("adapter", 1), 0.0), context=context, layer_count=m.num_layers,
                 rows=0 if rows is None else int(rows.numel()))


def _walk(agree: Sequence[bool], conf: Sequence[float], E: int, k: int, threshold: float, costs: Costs,
          draft_step: float) -> tuple[float, int, int, int, int]:
    """One sequence: (seconds, tokens emitted, steps, drafted, accepted)."""
    L = costs.layer_count
    q_max = max(costs.layer_chunk)
    t, n = 0, len(agree)
    seconds = 0.0
    tokens = steps_total = drafted = accepted = 0
    while t < n:
        room = min(k, n - t - 1)  # a step emits accepted drafts + 1: never draft past the sequence's end
        kept = attempts = 0
        while kept < room:
            attempts += 1
            if conf[t + kept] < threshold:
                break  # Kangaroo's early stop: this draft is dropped, its input's layer-E state kept
            kept += 1
        a = 0
        while a < kept and agree[t + a]:
            a += 1
        q = min(kept + 1, q_max)
        # the last position's layers 0..E: already run by a draft attempt that stopped on the threshold (the
        # generator keeps that state), else run by the scorer
        last = 0.0 if attempts > kept else E * costs.layer
        seconds += attempts * draft_step + last + (L - E) * costs.layer_chunk[q] + costs.head[q]
        tokens += a + 1
        steps_total += 1
        drafted += kept
        accepted += a
        t += a + 1
    return seconds, tokens, steps_total, drafted, accepted


def simulate(agree, conf, E: int, k: int, threshold: float, costs: Costs, draft_vocab: Optional[int] = None) -> dict:
    """Greedy self-speculation along teacher-forced sequences: predicted tokens per step, acceptance, speedup.

    agree[t]: the draft exit's top-1 at decode position t (input: the t-th token after the prefill's first one)
    equals the full model's next token; conf[t]: the draft's confidence (its top-1 probability on the draft
    head). `agree` / `conf` are one sequence, or a list of sequences (each decoded from its start; totals
    pooled). At each step the generator drafts up to min(k, tokens still to emit - 1) tokens, stopping at the
    first draft whose confidence is below `threshold` (that draft is dropped); the verifier runs layers E..L-1
    over the kept drafts + 1 positions and the full head on them, accepts the longest agreeing prefix and emits
    one more token. A draft costs E layers + the exit adapter + the draft head: the candidate rows the costs were
    measured with (draft_vocab None or costs.rows) or the full head (draft_vocab 0). Autoregressive decoding of
    the same tokens costs L layers + the full head per token; predicted_speedup = its time / this time.
    """
    if agree and isinstance(agree[0], (list, tuple)):
        seqs = list(zip(agree, conf))
    else:
        seqs = [(agree, conf)]
    rows = costs.rows if draft_vocab is None else draft_vocab
    if rows not in (0, costs.rows):
        raise ValueError(f"draft_vocab {rows}: costs were measured for 0 (full head) or {costs.rows} rows")
    head = costs.head[1] if rows == 0 else costs.head_rows
    draft_step = E * costs.layer + costs.adapter + head
    seconds, tokens, steps, drafted, accepted = 0.0, 0, 0, 0, 0
    for ag, cf in seqs:
        if len(ag) != len(cf):
            raise ValueError("agree and conf must have the same length")
        s, tk, st, dr, ac = _walk(ag, cf, E, k, threshold, costs, draft_step)
        seconds, tokens, steps, drafted, accepted = seconds + s, tokens + tk, steps + st, drafted + dr, accepted + ac
    ar = costs.step() * tokens
    return {"exit_layer": E, "num_speculations": k, "draft_threshold": threshold, "draft_vocab": rows,
            "tokens_per_step": tokens / steps if steps else 0.0,
            "acceptance": accepted / drafted if drafted else 0.0, "drafted_per_step": drafted / steps if steps else 0.0,
            "predicted_speedup": ar / seconds if seconds else 0.0}


def speedup_interval(agree, conf, E: int, k: int, threshold: float, costs: Costs,
                     draft_vocab: Optional[int] = None, reps: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of `simulate`'s predicted speedup over the sequences (resampled whole:
    the fit's unit of independence is a prompt). One sequence gives a zero-width interval."""
    import random

    seqs = list(zip(agree, conf)) if agree and isinstance(agree[0], (list, tuple)) else [(agree, conf)]
    rows = costs.rows if draft_vocab is None else draft_vocab
    draft_step = E * costs.layer + costs.adapter + (costs.head[1] if rows == 0 else costs.head_rows)
    per = [_walk(ag, cf, E, k, threshold, costs, draft_step)[:2] for ag, cf in seqs]
    rng = random.Random(seed)
    stats = []
    for _ in range(reps):
        pick = [per[rng.randrange(len(per))] for _ in per]
        seconds = sum(p[0] for p in pick)
        stats.append(costs.step() * sum(p[1] for p in pick) / seconds if seconds else 0.0)
    stats.sort()
    return stats[int(0.025 * (reps - 1))], stats[int(0.975 * (reps - 1))]


def best_setting(per_exit: dict, costs: Costs, ks: Sequence[int] = (1, 2, 3, 4, 6),
                 thresholds: Sequence[float] = (0.0, 0.3, 0.5, 0.7, 0.8, 0.9)) -> tuple[dict, list[dict]]:
    """The (exit layer, draft length, threshold, draft vocabulary) with the highest predicted speedup, and whether
    to speculate at all.

    per_exit: E -> (agree, conf), drafting on the measured candidate rows, or (E, draft_vocab) -> (agree, conf)
    where draft_vocab is 0 (full head) or costs.rows (agree / conf as `simulate` takes them: what that draft head
    does). Returns (best row, every row). Whether the best is worth running is `worth_speculating`'s call, on
    the best row's interval.
    """
    table = []
    for key, (ag, cf) in per_exit.items():
        E, vocab = key if isinstance(key, tuple) else (key, None)
        table += [simulate(ag, cf, E, k, th, costs, vocab) for k in ks for th in thresholds]
    if not table:
        raise ValueError("best_setting needs at least one exit layer")
    return max(table, key=lambda r: r["predicted_speedup"]), table


RULE = "speculate iff the best setting's 95% interval lies above 1.0x"


def worth_speculating(interval: Sequence[float]) -> bool:
    """The verdict on a predicted speedup's 95% interval: speculate only when the interval excludes 1.0x, i.e.
    the gain is a finding. A point prediction at 1.02x [0.98-1.05] measured 0.97x here (results/core_speed): the
    model counts layers and heads, not the generator's own per-step work, so it leans optimistic near 1.0."""
    return interval[0] > 1.0


def predicted(best: dict) -> str:
    """A setting's prediction for a console line: "1.02x [0.98-1.05]" (the interval where it was recorded)."""
    ci = best.get("predicted_speedup_ci95")
    return f"{best.get('predicted_speedup', float('nan')):.2f}x" + (f" [{ci[0]:.2f}-{ci[1]:.2f}]" if ci else "")


DRAFTER_RECIPES = ("eagle", "kangaroo")  # recipes whose fit (train/drafters.fit_and_recommend) recommends settings


def drafter_verdict(art, key: str) -> Optional[dict]:
    """A trained drafter's verdict for the artifact key `key` (eagle, kangaroo, self_speculative:drafter=NAME) from
    its recipe's fit, under today's rule (worth_speculating on the fit's interval: a fit recorded under an earlier
    rule says what this rule says), shaped as `recommendation`'s; None without a fit for that key. Unlike the exit
    adapters' verdict it is not re-costed where a run happens: the fit keeps no acceptance pattern."""
    for recipe in DRAFTER_RECIPES:
        fit = ((getattr(art, "provenance", None) or {}).get(recipe) or {}).get("fit") or {}
        best = (fit.get(key) or {}).get("best")
        if not isinstance(best, dict) or not best.get("interval"):
            continue
        go = worth_speculating(best["interval"])
        on = fit.get("fitted_on") or {}
        knobs = {k: best[k] for k in ("num_speculations", "draft_threshold") if k in best} if go else {}
        return {"speculate": go, "rule": RULE, "knobs": knobs,
                "best": dict(best, predicted_speedup_ci95=best["interval"]),
                "predicted_speedup": best.get("predicted_speedup") if go else None,
                "costed_on": {"device": on.get("device"), "dtype": on.get("dtype")}, "fitted_on": on}
    return None


def follow_drafter_rule(art) -> list[str]:
    """Make the artifact's drafter recommendations say what today's rule says (in memory): a key whose fit does not
    clear it keeps only its candidate vocabulary, as a fit under the rule writes it. Returns the keys changed."""
    changed = []
    for key in list(art.recommended):
        v = drafter_verdict(art, key)
        if v is not None and not v["speculate"] and set(art.recommended[key]) - {"draft_vocab"}:
            art.recommended[key] = {k: x for k, x in art.recommended[key].items() if k == "draft_vocab"}
            changed.append(key)
    return changed


def recommendation(art) -> Optional[dict]:
    """The self-speculation verdict an exit artifact's `exit_adapters` recipe recorded (None before it recorded
    one): {"speculate": bool, "knobs": what recommended["self_speculative"] holds ({} = don't speculate: the
    method keeps its untrained defaults), "best": best setting tried, "untrained_default": the setting
    self_speculative runs without a recommendation, "predicted_speedup": prediction for what self_speculative
    runs with this artifact and no explicit knobs, "fitted_on": the prompts and continuations it was fitted on}."""
    rec = ((getattr(art, "provenance", None) or {}).get("exit_adapters") or {}).get("recommendation")
    return rec if isinstance(rec, dict) and "speculate" in rec else None


# -- the acceptance pattern kept in the artifact, and the verdict re-costed where a run happens ----------------------
# A verdict = acceptance pattern x costs. The pattern (which drafts the full model accepted on the fit's greedy
# continuations, and the drafts' confidences) is a property of the adapters; the costs belong to a device and dtype.
# Keeping the pattern lets a run on another device or dtype re-cost the verdict where it runs instead of taking
# one timed elsewhere (a GPU is host-bound: a draft pass there costs nearly a full pass).
PATTERN = "exit_adapters.fit"  # tensor-name prefix in the artifact


def pack_pattern(per_exit: dict, default: tuple, untrained_layer: int) -> dict:
    """Tensors for the artifact: per draft exit (and the untrained full-head default) the flat agree / conf of every
    sequence, and the sequences' lengths (the same for every exit)."""
    lengths = [len(a) for a in default[0]]
    out = {f"{PATTERN}.lengths": torch.tensor(lengths, dtype=torch.int32),
           f"{PATTERN}.untrained_layer": torch.tensor([untrained_layer], dtype=torch.int32)}
    for key, (ag, cf) in list(per_exit.items()) + [(("untrained", 0), default)]:
        d, rows = key
        assert [len(a) for a in ag] == lengths
        out[f"{PATTERN}.agree.{d}.{rows}"] = torch.tensor([x for a in ag for x in a], dtype=torch.bool)
        out[f"{PATTERN}.conf.{d}.{rows}"] = torch.tensor([x for c in cf for x in c], dtype=torch.float32)
    return out


def unpack_pattern(tensors: dict) -> Optional[tuple[dict, tuple, int]]:
    """(per_exit, untrained default, its layer) from an artifact's tensors; None when it holds no pattern."""
    if f"{PATTERN}.lengths" not in tensors:
        return None
    lengths = tensors[f"{PATTERN}.lengths"].tolist()

    def split(flat):
        out, i = [], 0
        for n in lengths:
            out.append(flat[i:i + n].tolist())
            i += n
        return out

    per_exit, default = {}, None
    for name in tensors:
        if name.startswith(f"{PATTERN}.agree."):
            d, rows = name[len(f"{PATTERN}.agree."):].split(".")
            pair = (split(tensors[name]), split(tensors[f"{PATTERN}.conf.{d}.{rows}"]))
            if d == "untrained":
                default = pair
            else:
                per_exit[(int(d), int(rows))] = pair
    return per_exit, default, int(tensors[f"{PATTERN}.untrained_layer"][0])


def verdict(per_exit: dict, default: tuple, untrained_layer: int, costs: Costs, k_default: int) -> tuple[dict, list]:
    """The self-speculation record (speculate, knobs, best, untrained_default, predicted_speedup) from an acceptance
    pattern and costs, and every setting's prediction."""
    best, table = best_setting(per_exit, costs)
    untrained = simulate(default[0], default[1], untrained_layer, k_default, 0.0, costs, draft_vocab=0)
    # uncertainty from the few fitted prompts (resampled whole); the verdict itself is the point prediction's
    best["predicted_speedup_ci95"] = speedup_interval(*per_exit[(best["exit_layer"], best["draft_vocab"])],
                                                      best["exit_layer"], best["num_speculations"],
                                                      best["draft_threshold"], costs, best["draft_vocab"])
    untrained["predicted_speedup_ci95"] = speedup_interval(default[0], default[1], untrained_layer, k_default, 0.0,
                                                           costs, draft_vocab=0)
    go = worth_speculating(best["predicted_speedup_ci95"])
    knobs = {k: best[k] for k in ("exit_layer", "num_speculations", "draft_threshold", "draft_vocab")} if go else {}
    return {"speculate": go, "rule": RULE, "knobs": knobs, "best": best, "untrained_default": untrained,
            "predicted_speedup": best["predicted_speedup"] if go else untrained["predicted_speedup"]}, table


def where(model) -> dict:
    """The device type and dtype a model runs in: what a verdict's costs belong to."""
    return {"device": model.device.type, "dtype": str(model.dtype).removeprefix("torch.")}


def costed_on(art, rec: dict) -> dict:
    """Where a verdict's costs were timed: its own record, else (older artifacts) the exit_adapters recipe's run."""
    return rec.get("costed_on") or {"device": art.recipe_device("exit_adapters"),
                                    "dtype": art.recipe_dtype("exit_adapters")}


def costs_record(costs: Costs) -> dict:
    """The costs a verdict rests on, in milliseconds (for provenance and run.json)."""
    return {"layer": costs.layer * 1e3, "head": costs.head[1] * 1e3, "head_rows": costs.head_rows * 1e3,
            "adapter": costs.adapter * 1e3}


def recost(art, model) -> Optional[dict]:
    """The artifact's self-speculation verdict re-costed on `model`'s device and dtype (costs timed now, the stored
    acceptance pattern), or None when the artifact keeps no pattern. The fit's own record is kept under
    `recosted_from`."""
    from .generators.self_speculative import DEFAULT_SPECULATIONS

    old = recommendation(art)
    unpacked = unpack_pattern(art.tensors)
    if old is None or unpacked is None:
        return None
    per_exit, default, E0 = unpacked
    if any(rows not in (0, int(model.exit_vocab.numel()) if model.exit_vocab is not None else 0)
           for _, rows in per_exit):
        return None  # drafted on another candidate vocabulary than the attached one: not this artifact's pattern
    context = old.get("fitted_on", {}).get("cost_context", 512)
    costs = measure_costs(model, model.exit_vocab, context=context)
    rec, _ = verdict(per_exit, default, E0, costs, DEFAULT_SPECULATIONS)
    rec["fitted_on"] = dict(old.get("fitted_on", {}), costs_ms=costs_record(costs))
    rec["costed_on"] = where(model)
    rec["recosted_from"] = dict({k: old.get(k) for k in ("speculate", "knobs", "predicted_speedup")},
                                costed_on=costed_on(art, old))
    return rec
