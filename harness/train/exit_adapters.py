"""Recipe `exit_adapters`: a frozen trunk, a small trained module before the shared exit head (Kangaroo-style).

Kangaroo (Liu et al. 2024, arXiv 2404.18911) trains a light adapter on a shallow sub-network of a frozen model
so that the shared LM head reads the shallow state as if it came from the last layer, then drafts with it. Here:
- one `ExitAdapter` (residual MLP; Kangaroo's is one attention layer, see harness/trained_exits.py for why ours
  is stateless) per exit layer in --exit_layers, trained to match the last layer's distribution (KL, temperature
  1) on real text of train/validation splits and on the model's own greedy continuations of validation prompts
  (--adapters_self_generated);
- the trunk is frozen, so its hidden states are computed once and cached (the expensive part on a CPU), and the
  adapters train on random token positions of the cache;
- the loss is taken over a candidate vocabulary (--adapters_vocab most frequent last-layer argmax tokens of the
  training text; 0 = all rows): those are the rows a reduced draft head scores, and it makes a step ~6x cheaper;
- at the end it measures this machine's layer and head costs, generates the full model's greedy continuations
  of held-out prompts (the last --holdout_docs documents of each --data source, which no recipe trains on) and
  recommends the self-speculative exit layer, draft length, draft-confidence threshold and draft vocabulary with
  the highest predicted speedup on them (harness/speedup_model.py), or recommends not to speculate when the
  best setting's 95% interval does not lie above 1.0x (speedup_model.worth_speculating). `self_speculative` uses the recommendation when no --exit_layer is
  given; "don't speculate" leaves it at its untrained defaults (recommended.self_speculative = {}) and is
  recorded with the predictions in provenance.exit_adapters.recommendation (speedup_model.recommendation).
The final layer is untouched by construction. Trained exits are candidate-vocabulary exits (the model scores
only the candidate rows at a layer with an adapter), so what training is judged by is the held-out KL on the
candidate rows (heldout_kl_d, the objective) and candidate-row agreement (agree_vocab_d); agree_d, through the
full head, is reported for comparison only (no method reads a trained exit that way).
The provenance records the documents trained on (`training_data`: per source, record indices and a content hash).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import UsageError, _f
from ..trained_exits import ExitAdapter
from . import recipe
from .common import (Loop, TrainConfig, autocast, documents_record, greedy_continuations_of, heldout_documents,
                     hidden_states, provenance, source_records, split_source, start_artifact, train_eval_split,
                     training_documents)


@dataclass
class AdapterOptions:
    """exit_adapters flags."""

    adapters_width: int = _f(1152, "hidden width of each adapter's MLP")
    adapters_vocab: int = _f(8192, "candidate vocabulary size for the loss and reduced draft heads; 0 = all rows")
    adapters_cache_sequences: int = _f(256, "training sequences whose trunk states are cached (x --seq_len tokens)")
    adapters_self_generated: int = _f(16, "greedy continuations of validation prompts added to the training text")
    adapters_self_tokens: int = _f(64, "tokens per greedy continuation")
    adapters_tokens_per_step: int = _f(2048, "token positions per optimizer step (--batch_size is ignored)")
    adapters_fit_prompts: int = _f(16, "held-out prompts (the --holdout_docs tail of each --data source, never "
                                   "trained on) whose greedy continuations fit the self-speculation recommendation; "
                                   "0 = recommend nothing")
    adapters_fit_tokens: int = _f(64, "new tokens per greedy continuation of the fit (task stop strings and EOS "
                                  "also end it, as in evaluation)")
    adapters_fit_prompt_tokens: int = _f(384, "fit prompts are cut from the left to this many tokens")


@torch.no_grad()
def self_generated(model, cfg: TrainConfig, opts: AdapterOptions) -> tuple[list[list[int]], list[int]]:
    """Prompt tails + the model's own greedy continuations of xsum validation articles of the training pool (its
    last ones in file order; never the held-out tail), and their record indices."""
    from ..config import GenerationConfig
    from ..generators import StopCondition, build_generator

    records = source_records("xsum_validation")
    pool, _ = split_source(len(records), cfg.holdout_docs)
    chosen = pool[-opts.adapters_self_generated:] if opts.adapters_self_generated else []
    gen = build_generator(model, GenerationConfig(max_steps=opts.adapters_self_tokens))
    out = []
    for i in chosen:
        r = records[i]
        ids = model.encode(f"Article: {r['document']}\nSummary:")[-(cfg.seq_len - opts.adapters_self_tokens):]
        res = gen.generate(ids, StopCondition(model, opts.adapters_self_tokens, fixed_length=True))
        out.append(ids + res.tokens)
    return out, chosen


@torch.no_grad()
def cache_states(model, rows: torch.Tensor, layers: list[int], batch: int = 4) -> dict:
    """Trunk states at each exit layer and the last layer's normed state, flattened over positions."""
    per = {d: [] for d in layers}
    final = []
    for i in range(0, len(rows), batch):
        hs = hidden_states(model, rows[i:i + batch])
        for d in layers:
            per[d].append(hs[d].reshape(-1, model.hidden_size).float())
        final.append(hs[-1].reshape(-1, model.hidden_size).float())
    return {"layers": {d: torch.cat(v) for d, v in per.items()}, "final": torch.cat(final)}


def candidate_vocab(model, final: torch.Tensor, size: int) -> torch.Tensor:
    """The `size` most frequent last-layer argmax tokens of the training text (EOS always kept)."""
    W = model.lm_head.weight.detach().float()
    top = torch.cat([(final[i:i + 4096] @ W.T).argmax(-1) for i in range(0, len(final), 4096)])
    counts = torch.bincount(top.cpu(), minlength=model.vocab_size).float()
    for e in model.eos_ids():
        counts[e] = counts.max() + 1
    order = torch.argsort(counts, descending=True, stable=True)
    return order[:size].sort().values


@recipe("exit_adapters", AdapterOptions)
def run(cfg: TrainConfig, opts: AdapterOptions, model):
    """Frozen trunk + a residual MLP adapter before the shared head at each exit layer (Kangaroo-style), KL to the last layer."""
    t_start = time.perf_counter()
    if opts.adapters_fit_prompts and (opts.adapters_fit_tokens < 2 or opts.adapters_fit_prompt_tokens < 1):
        raise UsageError("--adapters_fit_tokens must be >= 2 (a continuation with a decode step to draft for) and "
                         "--adapters_fit_prompt_tokens >= 1")
    layers = cfg.layers(model.num_layers)
    train_rows, eval_rows = train_eval_split(cfg, model.tokenizer)
    train_rows = train_rows[:opts.adapters_cache_sequences]
    extra, extra_docs = self_generated(model, cfg, opts)
    # what training read, per source (the packed stream may end before its last documents: recorded all the same)
    read = training_documents(cfg)
    read["xsum_validation"] = read.get("xsum_validation", []) + extra_docs
    training_data = {name: documents_record(name, ids) for name, ids in read.items() if ids}
    if extra:
        extra_rows = torch.tensor([s[:cfg.seq_len] + [model.tokenizer.eos_token_id or 0] * (cfg.seq_len - len(s))
                                   for s in extra])
        train_rows = torch.cat([train_rows, extra_rows])
    print(f"exit_adapters: caching trunk states of {train_rows.numel()} training + {eval_rows.numel()} held-out tokens")
    train = cache_states(model, train_rows, layers)
    held = cache_states(model, eval_rows, layers)
    dev = model.device
    W = model.lm_head.weight.detach().float()
    vocab = (candidate_vocab(model, train["final"], opts.adapters_vocab) if opts.adapters_vocab else
             torch.arange(model.vocab_size)).to(dev)
    Wv = W[vocab]

    def final_norm(x: torch.Tensor) -> torch.Tensor:  # the shared final norm (frozen), in fp32
        return model._norm(x.to(model.dtype)).float()

    eps = getattr(model.config, "rms_norm_eps", 1e-5)
    torch.manual_seed(cfg.seed)
    adapters = {str(d): ExitAdapter(model.hidden_size, opts.adapters_width, eps).to(dev) for d in layers}
    held_target = torch.cat([(held["final"][i:i + 4096] @ W.T).argmax(-1) for i in range(0, len(held["final"]), 4096)])
    in_vocab = torch.isin(held_target, vocab)

    def loss(idx: torch.Tensor, step: int):
        idx = idx.to(dev)
        with torch.no_grad():
            teacher = F.log_softmax(train["final"][idx] @ Wv.T, dim=-1)
        total, parts = 0.0, {}
        for d in layers:
            with autocast(dev):  # bf16 matmuls on CUDA; the log-softmax and KL stay fp32
                z = final_norm(adapters[str(d)](train["layers"][d][idx])) @ Wv.T
            student = F.log_softmax(z.float(), dim=-1)
            kl = F.kl_div(student, teacher, log_target=True, reduction="batchmean")
            total = total + kl
            parts[f"kl_{d}"] = float(kl.detach())
        return total / len(layers), parts

    @torch.no_grad()
    def evaluate() -> dict:
        out = held_out_agreement(lambda d, x: final_norm(adapters[str(d)](x)), held, held_target, W, vocab, layers)
        return {**out, "vocab_coverage": float(in_vocab.float().mean())}

    untrained = evaluate()
    tokens = torch.arange(len(train["final"]))  # Loop samples positions on the CPU; loss() moves them
    loop = Loop(cfg, adapters, lambda idx, step: loss(idx, step), evaluate)
    saved_batch = cfg.batch_size
    cfg.batch_size = opts.adapters_tokens_per_step  # positions per step: adapters are position-wise
    try:
        metrics = loop.run(tokens)
    finally:
        cfg.batch_size = saved_batch
    metrics = {**metrics, **{f"untrained_{k}": v for k, v in untrained.items()}}

    art = start_artifact(cfg, model)
    if art.adapters and art.adapter_width != opts.adapters_width:
        raise UsageError(f"--exits artifact has adapters of width {art.adapter_width}, not {opts.adapters_width}")
    art.adapter_width = opts.adapters_width
    for d in layers:
        # stored in fp16 (the 20 MB budget); what is evaluated below is what the file holds
        art.adapters[d] = {k: v.detach().cpu().to(torch.float16) for k, v in adapters[str(d)].state_dict().items()}
    art.vocab = vocab.cpu()
    model.set_exits(art)
    stored = held_out_agreement(lambda d, x: model.norm(model.adapt(x.to(model.dtype), d)).float(), held, held_target,
                                W, vocab, layers)  # the attached, fp16-rounded adapters: what the file holds
    metrics.update({f"stored_{k}": v for k, v in stored.items()})
    rec, table, pattern = recommend(model, cfg, opts, layers, training_data) if opts.adapters_fit_prompts \
        else (None, [], {})
    # {} = don't speculate: self_speculative keeps its untrained defaults; no fit = no recommendation (a previous
    # one was fitted to other adapters)
    art.recommended.pop("self_speculative", None)
    art.tensors = {k: v for k, v in art.tensors.items() if not k.startswith("exit_adapters.fit.")}
    if rec is not None:
        art.recommended["self_speculative"] = dict(rec["knobs"])
        art.tensors.update(pattern)
    art.recommended.update(per_token_defaults(metrics, layers, model.num_layers))
    art.provenance["exit_adapters"] = provenance(
        cfg, time.perf_counter() - t_start, metrics, options=opts.__dict__, train_tokens=int(len(tokens)),
        held_out_tokens=int(len(held_target)), training_data=training_data,
        data_note=f"training pools of {cfg.data} (the last --holdout_docs {cfg.holdout_docs} documents of each are "
        f"never read) + {len(extra_docs)} self-generated continuations; agreement held-out = last "
        f"{cfg.eval_sequences} sequences of the packed stream (never trained on); the self-speculation fit = greedy "
        "continuations of held-out documents", recommendation=rec,
        predicted=sorted(table, key=lambda r: -r["predicted_speedup"])[:10])
    _, out = cfg.paths()
    art.save(out)
    agree = ", ".join(f"L{d} {metrics['agree_vocab_' + str(d)]:.3f}" for d in layers)
    print(f"exit_adapters: candidate-row agreement {agree}")
    if rec is not None:
        best = rec["best"]
        verdict = (f"recommended self_speculative {rec['knobs']}" if rec["speculate"] else
                   "recommended: don't speculate (self_speculative keeps its untrained defaults)")
        print(f"exit_adapters: {verdict}; best setting E{best['exit_layer']} k{best['num_speculations']} "
              f"threshold {best['draft_threshold']} predicted {best['predicted_speedup']:.2f}x on "
              f"{rec['fitted_on']['prompts']} greedy continuations of held-out prompts")
    return art


def per_token_defaults(metrics: dict, layers: list[int], L: int) -> dict:
    """Where per-token exit methods should look once exits are trained: calm/dynamic check no layer below the
    first trained exit (untrained shallower exits are confidently wrong); FREE's shallow exit is the trained
    layer with the largest agreement x fraction of layers saved."""
    from ..generators.dynamic import CRITERIA

    shallow = max(layers, key=lambda d: metrics.get(f"agree_vocab_{d}", 0.0) * (1 - d / L))
    out = {"free": {"shallow_exit_layer": shallow}, "calm": {"min_exit_layer": layers[0]}}
    out.update({f"dynamic:{c}": {"min_exit_layer": layers[0]} for c in CRITERIA})
    return out


@torch.no_grad()
def held_out_agreement(exit_state, held: dict, target: torch.Tensor, W: torch.Tensor, vocab: torch.Tensor,
                       layers: list[int], chunk: int = 1024) -> dict:
    """Per exit d on the held-out states (exit_state(d, x) -> normed state): the training objective there,
    KL(last layer || exit) over the candidate rows (heldout_kl_d); top-1 agreement with the last layer through the
    candidate-vocabulary exit the artifact ships (agree_vocab_d) and through the full head (agree_d)."""
    Wv = W[vocab]
    z = {d: exit_state(d, held["layers"][d]) for d in layers}
    hits = {d: 0 for d in layers}
    hits_vocab = {d: 0 for d in layers}
    kl = {d: 0.0 for d in layers}
    n = len(target)
    for i in range(0, n, chunk):
        t = target[i:i + chunk]
        teacher = torch.log_softmax(held["final"][i:i + chunk] @ Wv.T, dim=-1)
        for d in layers:
            zi = z[d][i:i + chunk]
            hits[d] += int(((zi @ W.T).argmax(-1) == t).sum())
            s = zi @ Wv.T
            hits_vocab[d] += int((vocab[s.argmax(-1)] == t).sum())
            kl[d] += float((teacher.exp() * (teacher - torch.log_softmax(s, dim=-1))).sum())
    out = {}
    for d in layers:
        out[f"agree_{d}"] = hits[d] / n
        out[f"agree_vocab_{d}"] = hits_vocab[d] / n
        out[f"heldout_kl_{d}"] = kl[d] / n
    return out


# self_speculative's draft depth without --exit_layer or a recommendation (harness/plan.py expand_strategies:
# LayerSkip's typical E ~ L/4); the fit predicts it too, as what runs when the recommendation is "don't speculate"
def untrained_exit_layer(num_layers: int) -> int:
    return max(1, num_layers // 4)


@torch.no_grad()
def greedy_continuations(model, cfg: TrainConfig, opts: AdapterOptions) -> tuple[list[tuple[list[int], int]], dict]:
    """The full model's greedy continuations of held-out prompts, alternating over the --data sources (their
    --holdout_docs tails in file order, in each task's prompt format, cut to --adapters_fit_prompt_tokens), ended
    by the task's stop strings, EOS or --adapters_fit_tokens as evaluation ends them. Prompts whose continuation
    is one token (the prefill's) have no decode step to draft for and are skipped.
    Returns ([(prompt + continuation ids, prompt length)], record of what was used)."""

    sources = [s.strip() for s in cfg.data.split(",") if s.strip()]
    pending = {s: list(heldout_documents(s, cfg.holdout_docs)) for s in sources}
    if not any(pending.values()):
        raise UsageError(f"--holdout_docs {cfg.holdout_docs} leaves no held-out documents for the self-speculation "
                         "fit; raise it or pass --adapters_fit_prompts 0")
    seqs, used, skipped = greedy_continuations_of(model, pending, opts.adapters_fit_prompts, opts.adapters_fit_tokens,
                                                  opts.adapters_fit_prompt_tokens, min_new=2)
    if not seqs:
        raise UsageError("no held-out prompt's greedy continuation is longer than one token; nothing to fit the "
                         "self-speculation recommendation on")
    record = {"prompts": len(seqs), "skipped_one_token": skipped, "max_new_tokens": opts.adapters_fit_tokens,
              "max_prompt_tokens": opts.adapters_fit_prompt_tokens,
              "decode_positions": sum(len(ids) - n - 1 for ids, n in seqs),
              "documents": {s: documents_record(s, v) for s, v in used.items() if v}}
    return seqs, record


def _draws(model, h: torch.Tensor, d: int, rows, target: torch.Tensor) -> tuple[list, list]:
    """The exit after d layers drafting as the generator drafts (its adapter, `rows` or the full head): whether
    each draft is the target, and its confidence (top-1 probability on the draft head)."""
    p = torch.softmax(model.exit_logits(h, rows, layer=d)[0].float(), dim=-1)
    conf, j = p.max(-1)
    tok = rows[j] if rows is not None else j
    return (tok == target).tolist(), conf.tolist()


@torch.no_grad()
def recommend(model, cfg: TrainConfig, opts: AdapterOptions, layers: list[int], training_data: dict):
    """Best (E, k, threshold, draft vocabulary) by predicted speedup, or "don't speculate", from measured costs
    and the draft exits' acceptance pattern on greedy continuations of held-out prompts. Returns (record, table).

    Drafts are scored as the generator scores them (model.exit_logits with the attached adapters and candidate
    rows); the target at each decode position is the full model's top-1 in the same teacher-forced pass (on
    these sequences it is the greedy token, up to float ties: `target_is_greedy` says how often)."""
    from ..generators.self_speculative import DEFAULT_SPECULATIONS
    from ..speedup_model import costs_record, measure_costs, pack_pattern, verdict, where

    seqs, fitted_on = greedy_continuations(model, cfg, opts)
    for s, rec in fitted_on["documents"].items():  # the held-out tail is never trained on; checked, not assumed
        if set(rec["records"]) & set(training_data.get(s, {}).get("records", [])):
            raise UsageError(f"self-speculation fit prompts of {s} overlap the training documents")
    rows = model.exit_vocab  # the generator's candidate rows (None: no candidate vocabulary)
    n_rows = 0 if rows is None else int(rows.numel())
    E0 = untrained_exit_layer(model.num_layers)
    per_exit = {(d, n_rows): ([], []) for d in layers}
    default = ([], [])
    same = total = 0
    for ids, n in seqs:
        hs = hidden_states(model, torch.tensor([ids]))
        pos = slice(n, len(ids) - 1)  # inputs: the generated tokens but the last; each predicts the next one
        target = model.lm_head(hs[-1][:, pos])[0].argmax(-1)
        same += int((target.cpu() == torch.tensor(ids[n + 1:])).sum())
        total += len(target)

        for d in layers:
            ag, cf = _draws(model, hs[d][:, pos], d, rows, target)
            per_exit[(d, n_rows)][0].append(ag)
            per_exit[(d, n_rows)][1].append(cf)
        ag, cf = _draws(model, hs[E0][:, pos], E0, None, target)
        default[0].append(ag)
        default[1].append(cf)
    context = round(sum(len(ids) for ids, _ in seqs) / len(seqs))
    costs = measure_costs(model, rows, context=context)
    record, table = verdict(per_exit, default, E0, costs, DEFAULT_SPECULATIONS)
    fitted_on.update(target_is_greedy=same / total if total else 1.0, cost_context=context,
                     costs_ms=costs_record(costs))
    record["fitted_on"] = fitted_on
    record["costed_on"] = where(model)
    # the acceptance pattern is kept with the artifact: a run on another device or dtype re-costs the verdict
    return record, table, pack_pattern(per_exit, default, E0)


@recipe("speculation_pattern")
def speculation_pattern(cfg: TrainConfig, _opts, model):
    """Add the self-speculation fit's acceptance pattern to an artifact whose fit predates keeping it (the verdict
    is not changed): the fit is replayed with the options it recorded and must reach the same prompts and tokens."""
    t0 = time.perf_counter()
    art = start_artifact(cfg, model)
    prov = art.provenance.get("exit_adapters") or {}
    old = prov.get("recommendation")
    if not art.adapters or not isinstance(old, dict):
        raise UsageError("--exits: this artifact has no exit adapters with a self-speculation fit to replay")
    fields = {f.name for f in dataclasses.fields(AdapterOptions)}
    opts = AdapterOptions(**{k: v for k, v in (prov.get("options") or {}).items() if k in fields})
    made = prov.get("config") or {}
    fit_cfg = dataclasses.replace(cfg, data=made.get("data", cfg.data), holdout_docs=made.get("holdout_docs",
                                                                                             cfg.holdout_docs))
    if str(model.dtype).removeprefix("torch.") != art.recipe_dtype("exit_adapters"):
        raise UsageError(f"--dtype: replay the fit in the dtype it was made in ({art.recipe_dtype('exit_adapters')})")
    layers = sorted(art.adapters)
    rec, _, pattern = recommend(model, fit_cfg, opts, layers, prov.get("training_data") or {})
    same = {k: (rec["fitted_on"].get(k), old["fitted_on"].get(k))
            for k in ("documents", "decode_positions", "target_is_greedy")}
    if any(a != b for a, b in same.values()):
        raise UsageError("the replayed fit differs from the recorded one ("
                         + ", ".join(k for k, (a, b) in same.items() if a != b) + "): retrain with make exits")
    art.tensors.update(pattern)
    art.provenance["speculation_pattern"] = provenance(
        cfg, time.perf_counter() - t0, {"decode_positions": rec["fitted_on"]["decode_positions"]},
        note="the exit_adapters fit replayed with its recorded options: same prompts, same greedy tokens; its "
             "verdict is unchanged (this replay's own verdict is not used)")
    _, out = cfg.paths()
    art.save(out)
    print(f"speculation_pattern: kept the acceptance pattern of {rec['fitted_on']['decode_positions']} decode "
          f"positions x {len(layers)} exits in {out}")
    return art
