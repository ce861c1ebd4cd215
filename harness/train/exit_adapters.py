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
  training text; 0 = all rows): those are the rows a reduced draft head scores, and it makes a step ~6x cheaper.
  Agreement is reported both with the full head (what every method reads) and on the candidate rows (drafts);
- at the end it measures this machine's layer and head costs and recommends the self-speculative exit layer,
  draft length and draft-confidence threshold with the highest predicted speedup on held-out text
  (harness/speculation_model.py); `self_speculative` uses them when no --exit_layer is given.
The final layer is untouched by construction.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import _f
from ..trained_exits import ExitAdapter
from . import recipe
from .common import Loop, TrainConfig, autocast, hidden_states, provenance, start_artifact, train_eval_split


@dataclass
class AdapterOptions:
    """exit_adapters flags."""

    adapters_width: int = _f(1152, "hidden width of each adapter's MLP")
    adapters_vocab: int = _f(8192, "candidate vocabulary size for the loss and reduced draft heads; 0 = all rows")
    adapters_cache_sequences: int = _f(256, "training sequences whose trunk states are cached (x --seq_len tokens)")
    adapters_self_generated: int = _f(16, "greedy continuations of validation prompts added to the training text")
    adapters_self_tokens: int = _f(64, "tokens per greedy continuation")
    adapters_tokens_per_step: int = _f(2048, "token positions per optimizer step (--batch_size is ignored)")


@torch.no_grad()
def self_generated(model, cfg: TrainConfig, opts: AdapterOptions) -> list[list[int]]:
    """Prompt tails + the model's own greedy continuations, from xsum validation articles."""
    from ..config import GenerationConfig
    from ..generators import StopCondition, build_generator
    from ..tasks import DATA_DIR, read_jsonl

    docs = [r for _, r in read_jsonl(DATA_DIR / "xsum_validation.jsonl.gz")]
    docs = docs[-opts.adapters_self_generated:] if opts.adapters_self_generated else []  # far from max_docs' head
    gen = build_generator(model, GenerationConfig(max_steps=opts.adapters_self_tokens))
    out = []
    for r in docs:
        ids = model.encode(f"Article: {r['document']}\nSummary:")[-(cfg.seq_len - opts.adapters_self_tokens):]
        res = gen.generate(ids, StopCondition(model, opts.adapters_self_tokens, fixed_length=True))
        out.append(ids + res.tokens)
    return out


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
    layers = cfg.layers(model.num_layers)
    train_rows, eval_rows = train_eval_split(cfg, model.tokenizer)
    train_rows = train_rows[:opts.adapters_cache_sequences]
    extra = self_generated(model, cfg, opts)
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
        from ..config import UsageError
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
    rec, table = recommend(model, held, held_target, layers, vocab)
    art.recommended["self_speculative"] = {k: rec[k] for k in ("exit_layer", "num_speculations", "draft_threshold")}
    art.recommended["self_speculative"]["draft_vocab"] = int(len(vocab))
    art.recommended.update(per_token_defaults(metrics, layers, model.num_layers))
    art.provenance["exit_adapters"] = provenance(
        cfg, time.perf_counter() - t_start, metrics, options=opts.__dict__, train_tokens=int(len(tokens)),
        held_out_tokens=int(len(held_target)), data_note="train/validation splits only; held-out = last "
        f"{cfg.eval_sequences} sequences of the packed stream", recommendation=rec,
        predicted=sorted(table, key=lambda r: -r["predicted_speedup"])[:10])
    _, out = cfg.paths()
    art.save(out)
    agree = ", ".join(f"L{d} {metrics['agree_' + str(d)]:.3f}" for d in layers)
    print(f"exit_adapters: agreement {agree}; "
          f"recommended self_speculative {art.recommended['self_speculative']} "
          f"(predicted {rec['predicted_speedup']:.2f}x)")
    return art


def per_token_defaults(metrics: dict, layers: list[int], L: int) -> dict:
    """Where per-token exit methods should look once exits are trained: calm/dynamic check no layer below the
    first trained exit (untrained shallower exits are confidently wrong); FREE's shallow exit is the trained
    layer with the largest agreement x fraction of layers saved."""
    from ..config import CRITERIA

    shallow = max(layers, key=lambda d: metrics.get(f"agree_vocab_{d}", 0.0) * (1 - d / L))
    out = {"free": {"shallow_exit_layer": shallow}, "calm": {"min_exit_layer": layers[0]}}
    out.update({f"dynamic:{c}": {"min_exit_layer": layers[0]} for c in CRITERIA})
    return out


@torch.no_grad()
def held_out_agreement(exit_state, held: dict, target: torch.Tensor, W: torch.Tensor, vocab: torch.Tensor,
                       layers: list[int]) -> dict:
    """Top-1 agreement with the last layer on the held-out states, per exit d: through the full head (agree_d)
    and through the candidate-vocabulary exit the artifact ships (agree_vocab_d). exit_state(d, x) -> normed."""
    def top(z: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
        return torch.cat([(z[i:i + 4096] @ M.T).argmax(-1) for i in range(0, len(z), 4096)])

    out = {}
    for d in layers:
        z = exit_state(d, held["layers"][d])
        out[f"agree_{d}"] = float((top(z, W) == target).float().mean())
        out[f"agree_vocab_{d}"] = float((vocab[top(z, W[vocab])] == target).float().mean())
    return out


@torch.no_grad()
def recommend(model, held: dict, target: torch.Tensor, layers: list[int], vocab: torch.Tensor):
    """Best (E, k, threshold) by predicted speedup from measured costs and held-out draft agreement."""
    from ..speculation_model import best_setting, measure_costs

    costs = measure_costs(model, vocab.to(model.device))
    vocab = vocab.to(model.device)
    Wv = model.lm_head.weight.detach().float()[vocab]
    per_layer = {}
    for d in layers:
        z = model.norm(model.adapt(held["layers"][d].to(model.dtype), d)).float()
        p = torch.softmax(z @ Wv.T, dim=-1)
        conf, arg = p.max(-1)
        per_layer[d] = ((vocab[arg] == target).tolist(), conf.tolist())
    return best_setting(per_layer, costs)
