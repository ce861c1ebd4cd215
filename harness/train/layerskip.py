"""LayerSkip training (Elhoushi et al. 2024, arXiv 2404.16710, Sec. 4.1): layer dropout + early-exit loss.

Reference code: LayerSkip's training recipe lives in torchtune (facebookresearch/LayerSkip README.md:166-167 points
there): pytorch/torchtune at bd2a0fc, recipes/dev/7B_full_early_exit.yaml with its LayerSkip override line (:19:
`early_exit_loss.scale=1.0 early_exit_loss.curriculum=...GradualEarlyExitCurriculum early_exit_loss.scale_fn=
...linear_l_loss_scale layer_dropout.prob=0.2 layer_dropout.scale=exp`) on the file's own settings (:127-138:
early_exit_loss.layers "0::4", layer_dropout.layers ":", layers_scale exp), implemented in
torchtune/modules/early_exit_loss.py and torchtune/modules/layer_dropout.py. Our defaults are those settings; what
is ours is a named option.

The trunk itself is trained, so the result is a NEW model (saved as a transformers directory at
`<work_dir>/model`, loadable with `--model <work_dir>/model`) plus an exit artifact made for that new model that
records what training did and recommends a self-speculative draft depth.

What it does (layer l = 0..L-1, 0-based; the exit "after layer l" reads x_{l+1}):
- every exit is the model's own final norm + lm_head applied to a layer's hidden state (no new modules);
- early-exit loss  J = sum_l  e~(t,l) CE(g(x_{l+1}), Y) over the layers whose loss is on at step t (C(t,l)), the
  last layer's always (torchtune's `train_last_layer`), e~ = e normalised over them; e (`--layerskip_loss_scale`):
  linear_l (default) = l + 1 (early_exit_loss.py:27-32), sum_l = the running sum of l + 1 over the layers on
  (:35-40, the yaml's own default at :130), times e_scale (`--layerskip_early_exit_scale`) for all but the last
  layer; paper = the paper's e(l) = e_scale * sum_{i=0..l} i, e(L-1) = L-1 + e_scale * sum_{i=0..L-2} i
  (e(0) = 0: it never trains the first exit);
- curriculum C(t,l) over the layers l = 0, R, 2R, ... (`--layerskip_loss_every` R, the yaml's "0::4") and the last
  (`--layerskip_curriculum`): gradual (default; GradualEarlyExitCurriculum, early_exit_loss.py:267-286) = layer l
  on at step t once (t-1)/T >= 0.5 (L-l)/L, from the last layer toward the first (torchtune computes step t's mask
  at the end of step t-1, so only the last layer trains at step 0); rotational (RotationalEarlyExitCurriculum,
  :211-217) = that set rolled forward by one layer per step, cyclically over the L layers; none = the set at every
  step;
- layer dropout: layer l is skipped for a whole sequence with probability p_{l,t} = S(t) D(l) p_max
  (`--layerskip_dropout_max` = p_max, 0.2 as the reference), drawn per sequence of the batch (layer_dropout.py:80-98);
  D(l) = 2^{l/(L-1)} - 1 (exp, the reference's and the paper's, layer_dropout.py:214) or l/(L-1) (linear): 0 for
  the first layer, p_max for the last (`--layerskip_dropout_layer_scale`); S(t) = 1 (constant, as torchtune, which
  has no time schedule) or 2^{t/(T-1)} - 1 (exp: the paper's pretraining-from-scratch curriculum;
  `--layerskip_dropout_time_scale`). No dropout at evaluation (the yaml's disable_on_eval).

The training forward is our own (embeddings -> layers, each skippable per sequence -> exits): rotary from the
HF model's rotary_emb, no cache, attention_mask=None (plain causal SDPA, as LayeredModel's prefill).

Trainable: LoRA adapters (peft) on every nn.Linear inside the decoder layers (`--layerskip_lora_rank` r, alpha
2r, merged into the weights at the end), or the whole model with `--layerskip_lora_rank 0`, as the reference (a
full fine-tune, AdamW lr 2e-5: 7B_full_early_exit.yaml:70-75). Always on a deep copy of the caller's model: the
model passed in is never modified.

Our choices, and deviations on purpose:
- LoRA by default (`--layerskip_lora_rank 0` = the reference's full fine-tuning): one device holds an adapter's
  optimizer state for models whose full optimizer state it cannot;
- `--lr` left at its default (1e-3, sized for fresh adapters) means 2e-4 with LoRA and 2e-5 (the yaml's, :75) for
  full fine-tuning; any other --lr is used as given;
- the recommended self-speculative exit is the exit of `--exit_layers` with the largest *estimated* speedup,
  (1 - a^(k+1)) / (1 - a) tokens per ((k+1) E + L - E) / L full-model passes (a = the exit's held-out top-1
  agreement with the trained last layer, k = the self_speculative default draft length, verification reusing
  the first E layers as our self_speculative generator does), not simply the highest agreement (that is
  nearly always the deepest exit, which drafts too slowly to help);
- the saved config.json carries a `layerskip` entry (base model fingerprint, a digest of the trained weights):
  the harness fingerprints a directory by config.json and weight-file sizes, which fine-tuning alone leaves
  unchanged, so without it the new model would pass for the original and take the original's exit artifacts;
- what it does to the final layer is measured, not assumed: on the held-out rows, the trained model's last-layer
  top-1 agreement with the ORIGINAL model's last layer (`final_layer_agreement_with_original`, provenance
  metrics), next to every exit's agreement with the trained last layer and their cross-entropies.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import UsageError, _f
from ..trained_exits import ExitArtifact
from . import recipe
from .common import Loop, TrainConfig, autocast, provenance, train_eval_split

CURRICULA = ("gradual", "rotational", "none")
LOSS_SCALES = ("linear_l", "sum_l", "paper")
LAYER_SCALES = ("exp", "linear")
TIME_SCALES = ("constant", "exp")
LORA_LR, FULL_LR = 2e-4, 2e-5
YAML = "torchtune recipes/dev/7B_full_early_exit.yaml"
EEL = "torchtune/modules/early_exit_loss.py"


@dataclass
class LayerSkipOptions:
    """Flags of --recipe layerskip."""

    layerskip_lora_rank: int = _f(
        16, f"LoRA rank on every linear of the decoder layers; 0 = full fine-tuning, the reference's ({YAML} is a "
        "full-finetune recipe, lr 2e-5 at :75). LoRA is ours: its optimizer state fits one device for large models")
    layerskip_early_exit_scale: float = _f(
        1.0, f"e_scale: multiplies every early exit's loss scale but the last layer's ({YAML}:131, :19)")
    layerskip_loss_scale: str = _f(
        "linear_l", f"per-layer loss scale before normalising over the layers on: linear_l = l+1 (the reference's "
        f"LayerSkip setting, {YAML}:19; {EEL}:27-32); sum_l = running sum of l+1 over the layers on (the yaml's own "
        f"default, :130; {EEL}:35-40); paper = the paper's e(l) = sum_(i<=l) i (arXiv 2404.16710 Sec. 4.1; "
        "never trains the first exit)", choices=LOSS_SCALES)
    layerskip_curriculum: str = _f(
        "gradual", f"early-exit curriculum over the layers with a loss: gradual = switched on from the last layer "
        f"toward the first over the first half of training (the reference's LayerSkip setting, {YAML}:19; "
        f"{EEL}:267-286); rotational = that set shifted by one layer each step ({EEL}:211-217, the yaml's own "
        "default at :129); none = all of them every step. The last layer's loss is always on", choices=CURRICULA)
    layerskip_loss_every: int = _f(
        4, f"R: early-exit losses on layers 0, R, 2R, ... (0-based) and the last, as the reference's "
        f"early_exit_loss.layers \"0::4\" ({YAML}:128); 1 = every layer")
    layerskip_dropout_max: float = _f(0.2, f"p_max: layer dropout rate of the last layer, 0 = none (the "
                                           f"reference's layer_dropout.prob, {YAML}:135, :19)")
    layerskip_dropout_layer_scale: str = _f(
        "exp", f"D(l): how the dropout rate rises with depth, from 0 (first layer) to p_max (last): exp = "
               f"2^(l/(L-1)) - 1 (the reference's, {YAML}:137, and the paper's), linear = l/(L-1)",
        choices=LAYER_SCALES)
    layerskip_dropout_time_scale: str = _f(
        "constant", "S(t): constant = 1 (the reference's: torchtune has no dropout schedule over time; the paper's "
                    "choice for continual pretraining / fine-tuning), exp = 2^(t/(T-1)) - 1 (the paper's "
                    "pretraining-from-scratch curriculum)", choices=TIME_SCALES)


# -- the paper's schedules (pure functions: unit-tested) ----------------------------------------------------
def _scale(kind: str, val: float, period: float) -> float:
    """0 at val=0, 1 at val=period."""
    if period <= 0:
        return 1.0
    if kind == "exp":
        return math.exp(val * math.log(2) / period) - 1
    if kind == "linear":
        return val / period
    raise ValueError(f"unknown scale {kind!r}")


def dropout_probs(num_layers: int, p_max: float, step: int = 0, steps: int = 1, layer_scale: str = "exp",
                  time_scale: str = "constant") -> list[float]:
    """p_{l,t} = S(t) D(l) p_max for l = 0..L-1 (LayerSkip's layer dropout rates)."""
    s = 1.0 if time_scale == "constant" else _scale("exp", step, steps - 1)
    return [min(1.0, max(0.0, s * _scale(layer_scale, l, num_layers - 1) * p_max)) for l in range(num_layers)]


def sample_skips(probs: list[float], batch: int, generator: torch.Generator) -> torch.Tensor:
    """(L, batch) bool: True where layer l is skipped for sequence b (independent Bernoulli(p_l))."""
    p = torch.tensor(probs, dtype=torch.float64)
    return torch.rand((len(probs), batch), generator=generator, dtype=torch.float64) < p[:, None]


def exits_on(num_layers: int, step: int, steps: int, curriculum: str = "gradual", every: int = 4) -> list[bool]:
    """C(t,l) for l = 0..L-1: which layers' losses count at `step` (torchtune's curricula over the layers
    0::every); the last layer's is always on."""
    L, r = num_layers, max(1, every)
    base = [l % r == 0 for l in range(L)]  # torchtune's early_exit_loss.layers "0::R"
    if curriculum == "none":
        on = base
    elif curriculum == "rotational":  # np.roll(mask, 1) once per step: layer l shows layer (l - t) mod L's entry
        on = [base[(l - step) % L] for l in range(L)]
    elif curriculum == "gradual":  # the mask of step t is computed at the end of step t-1, from (t-1)/T
        frac = (step - 1) / max(steps, 1)
        on = [base[l] and frac >= 0.5 * (L - l) / L for l in range(L)]
    else:
        raise ValueError(f"unknown curriculum {curriculum!r}")
    on[-1] = True
    return on


def loss_scales(on: list[bool], e_scale: float, kind: str = "linear_l") -> list[float]:
    """e~(t,l): the per-layer loss scale of `kind`, over the layers that are `on`, normalised to sum 1.

    linear_l / sum_l: torchtune's linear_l_loss_scale / sum_l_loss_scale (l + 1, or its running sum over the
    layers on, times e_scale for all but the last layer); paper: LayerSkip's e(l) = e_scale * sum_{i<=l} i,
    e(L-1) = L-1 + e_scale * sum_{i<=L-2} i.
    """
    L = len(on)
    if kind == "paper":
        e = [e_scale * l * (l + 1) / 2 for l in range(L - 1)] + [(L - 1) + e_scale * (L - 2) * (L - 1) / 2]
        w = [ei if c else 0.0 for ei, c in zip(e, on)]
    elif kind in ("linear_l", "sum_l"):
        w, run = [], 0.0
        for l, c in enumerate(on):
            run += (l + 1) if c else 0
            v = (run if kind == "sum_l" else l + 1) if c else 0.0
            w.append(v * (e_scale if l < L - 1 else 1.0))
    else:
        raise ValueError(f"unknown loss scale {kind!r}")
    total = sum(w)
    return [x / total for x in w] if total > 0 else w


def speculative_speedup(agree: float, exit_layer: int, num_layers: int, k: int) -> float:
    """Estimated self-speculative speedup: accepted tokens per step over the step's cost in full-model passes."""
    a = min(max(agree, 0.0), 1.0)
    tokens = k + 1.0 if a >= 1.0 else (1 - a ** (k + 1)) / (1 - a)
    cost = ((k + 1) * exit_layer + (num_layers - exit_layer)) / num_layers
    return tokens / cost


# -- the training forward -----------------------------------------------------------------------------
def run_trunk(net, ids: torch.Tensor, skip: Optional[torch.Tensor] = None) -> list[torch.Tensor]:
    """Raw hidden state after each layer 1..L (no final norm); `skip[l, b]` skips layer l for sequence b."""
    inner = net.model
    h = inner.embed_tokens(ids)
    position_ids = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
    pe = inner.rotary_emb(h, position_ids)
    kw = {"attention_mask": None, "position_ids": position_ids, "position_embeddings": pe, "use_cache": False}
    out = []
    for i, layer in enumerate(inner.layers):
        if skip is None or not bool(skip[i].any()):
            h = layer(h, **kw)
        elif not bool(skip[i].all()):  # run the layer on the sequences that keep it, pass the others through
            keep = (~skip[i]).nonzero().squeeze(1).to(h.device)
            h = h.index_copy(0, keep, layer(h.index_select(0, keep), **kw).to(h.dtype))
        out.append(h)
    return out


def exit_logits(net, h: torch.Tensor) -> torch.Tensor:
    """The shared exit: final norm + lm_head."""
    return net.lm_head(net.model.norm(h))


def exit_ce(net, h: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of the exit on hidden states h (B, T, d) for token ids (B, T)."""
    logits = exit_logits(net, h[:, :-1])
    return F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())


@torch.no_grad()
def measure(net, rows: torch.Tensor, layers: list[int], e_scale: float,
            reference: Optional[torch.Tensor] = None, batch: int = 4,
            scale: str = "linear_l") -> tuple[dict, torch.Tensor]:
    """Held-out metrics of `net` (no layer dropout) and its last layer's argmax (on the CPU).

    final_layer_agreement_with_original: top-1 agreement of the last layer with `reference` (the original model's
    argmax; the net's own when None, i.e. 1.0); agreement@d: exit d vs the net's last layer; ce@d: exit d's
    next-token cross-entropy; exit_loss: the early-exit objective (e~ of kind `scale` with every evaluated exit on,
    no curriculum) over the exits of `layers` and the last layer.
    """
    L = len(net.model.layers)
    dev = net.lm_head.weight.device
    depths = sorted(set(layers) | {L})
    w = loss_scales([l + 1 in depths for l in range(L)], e_scale, scale)
    hits = {d: 0 for d in layers}
    ce = {d: 0.0 for d in depths}
    final_hits = total = 0
    tops = []
    for i in range(0, len(rows), batch):
        ids = rows[i:i + batch].to(dev)
        with autocast(dev):
            hs = run_trunk(net, ids)
            top = exit_logits(net, hs[-1]).argmax(-1)
            for d in layers:
                hits[d] += int((exit_logits(net, hs[d - 1]).argmax(-1) == top).sum())
            for d in depths:
                ce[d] += float(exit_ce(net, hs[d - 1], ids)) * len(ids)
        top = top.cpu()
        tops.append(top)
        ref = reference[i:i + batch] if reference is not None else top
        final_hits += int((top == ref).sum())
        total += top.numel()
    n = len(rows)
    res = {"final_layer_agreement_with_original": final_hits / total}
    res.update({f"agreement@{d}": hits[d] / total for d in layers})
    res.update({f"ce@{d}": ce[d] / n for d in depths})
    res["exit_loss"] = sum(w[d - 1] * ce[d] / n for d in depths)
    return res, torch.cat(tops)


class _Trainable(nn.Module):
    """The trained copy, checkpointed by its trainable parameters only (LoRA: a few MB, not the whole model)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def state_dict(self, *args, **kwargs):  # what Loop's checkpoint holds
        return {n: p.detach() for n, p in self.net.named_parameters() if p.requires_grad}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):  # Loop's resume
        params = {n: p for n, p in self.net.named_parameters() if p.requires_grad}
        if set(state_dict) != set(params) or any(v.shape != params[n].shape for n, v in state_dict.items()):
            raise UsageError("the checkpoint in --work_dir was made with other layerskip options (LoRA rank / full "
                             "fine-tuning); use another --work_dir")
        with torch.no_grad():
            for n, v in state_dict.items():
                params[n].copy_(v)


def _linear_names(net: nn.Module) -> list[str]:
    """Full module names of every nn.Linear inside the decoder layers."""
    layers = net.model.layers
    prefix = next(n for n, m in net.named_modules() if m is layers)
    return [n for n, m in net.named_modules() if isinstance(m, nn.Linear) and n.startswith(prefix + ".")]


def weights_digest(net: nn.Module, samples: int = 4096) -> str:
    """sha256 over ~`samples` evenly spaced values of every tensor (any trained weight changes it; cheap for 8B)."""
    h = hashlib.sha256()
    for name, t in sorted(net.state_dict().items()):
        flat = t.detach().reshape(-1)
        picked = flat[::max(1, flat.numel() // samples)].to("cpu", torch.float32).contiguous()
        h.update(name.encode())
        h.update(picked.numpy().tobytes())
    return h.hexdigest()[:16]


def _save_model(net, tokenizer, target: Path) -> None:
    """save_pretrained + tokenizer into `target`, replacing a previous one only once complete."""
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    net.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


@recipe("layerskip", LayerSkipOptions, gpu="training the trunk usefully needs a GPU: hours on a CPU")
def train_layerskip(cfg: TrainConfig, opts: LayerSkipOptions, model) -> ExitArtifact:
    """LayerSkip: train the trunk (LoRA or full) with layer dropout + early-exit loss; writes a new model."""
    from ..generators.self_speculative import DEFAULT_SPECULATIONS
    from ..model import checkpoint_fingerprint

    t0 = time.perf_counter()
    L = model.num_layers
    layers = cfg.layers(L)
    if cfg.exits and cfg.exits != "none":
        raise UsageError("layerskip changes the trunk, so exits trained for the old model do not carry over: use "
                         "--exits none, then train exits for the new model with --model <work_dir>/model")
    if getattr(model, "device_map", None):
        raise UsageError("layerskip trains a copy of the whole model on one device; a device map is not supported")
    if model.window is not None and cfg.seq_len > model.window:
        raise UsageError(f"--seq_len {cfg.seq_len} exceeds this model's sliding window ({model.window})")
    if opts.layerskip_lora_rank < 0 or opts.layerskip_loss_every < 1:
        raise UsageError("--layerskip_lora_rank must be >= 0 and --layerskip_loss_every >= 1")
    for name, value, allowed in (("curriculum", opts.layerskip_curriculum, CURRICULA),
                                 ("loss_scale", opts.layerskip_loss_scale, LOSS_SCALES),
                                 ("dropout_layer_scale", opts.layerskip_dropout_layer_scale, LAYER_SCALES),
                                 ("dropout_time_scale", opts.layerskip_dropout_time_scale, TIME_SCALES)):
        if value not in allowed:
            raise UsageError(f"--layerskip_{name} must be one of {', '.join(allowed)}, got {value!r}")
    if not 0.0 <= opts.layerskip_dropout_max <= 1.0:
        raise UsageError(f"--layerskip_dropout_max {opts.layerskip_dropout_max}: must be in [0, 1]")
    if opts.layerskip_early_exit_scale < 0:
        raise UsageError("--layerskip_early_exit_scale must be >= 0")
    work, out_path = cfg.paths()
    model_dir = work / "model"
    dev = model.device
    train_rows, eval_rows = train_eval_split(cfg, model.tokenizer)

    # The original model's last-layer argmax on the held-out rows, once, before anything is trained (and the
    # original's own exits, for comparison).
    scale = opts.layerskip_loss_scale
    before, original = measure(model.hf, eval_rows, layers, opts.layerskip_early_exit_scale, scale=scale)

    # A deep copy is trained; the caller's model is never touched.
    net = copy.deepcopy(model.hf)
    rank = opts.layerskip_lora_rank
    peft_model = None
    if rank > 0:
        from peft import LoraConfig, get_peft_model

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            peft_model = get_peft_model(net, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, bias="none",
                                                        target_modules=_linear_names(net)))
        # peft injects the adapters into `net` itself: net's layers now compute W x + B A x
    else:
        net.requires_grad_(True)
    trainable = _Trainable(net)
    n_trainable = sum(p.numel() for p in trainable.parameters() if p.requires_grad)
    default_lr = next(f.default for f in dataclasses.fields(TrainConfig) if f.name == "lr")
    lr = cfg.lr if cfg.lr != default_lr else (LORA_LR if rank > 0 else FULL_LR)

    def loss_fn(batch: torch.Tensor, step: int):
        ids = batch.to(dev)
        skip = None
        if trainable.training and opts.layerskip_dropout_max > 0:
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)  # reproducible, resume-safe
            skip = sample_skips(dropout_probs(L, opts.layerskip_dropout_max, step, cfg.steps,
                                              opts.layerskip_dropout_layer_scale, opts.layerskip_dropout_time_scale),
                                len(ids), gen)
        w = loss_scales(exits_on(L, step, cfg.steps, opts.layerskip_curriculum, opts.layerskip_loss_every),
                        opts.layerskip_early_exit_scale, scale)
        with autocast(dev):
            hs = run_trunk(net, ids, skip)
            last = exit_ce(net, hs[-1], ids)  # the last layer's loss is always on (w[-1] > 0)
            loss = w[-1] * last
            for l, wl in enumerate(w[:-1]):
                if wl > 0:
                    loss = loss + wl * exit_ce(net, hs[l], ids)
        metrics = {"exits_on": sum(x > 0 for x in w), "last_layer_ce": float(last.detach()),
                   "skipped_fraction": float(skip.double().mean()) if skip is not None else 0.0}
        return loss, metrics

    def evaluate() -> dict:
        return measure(net, eval_rows, layers, opts.layerskip_early_exit_scale, original, scale=scale)[0]

    loop = Loop(cfg, {"trunk": trainable}, loss_fn, evaluate, lr=lr)
    after = loop.run(train_rows)

    speedups = {str(d): speculative_speedup(after[f"agreement@{d}"], d, L, DEFAULT_SPECULATIONS) for d in layers}
    best = max(layers, key=lambda d: speedups[str(d)])

    # Merge LoRA and save the new model; identity = the saved directory's fingerprint, as load_model computes it.
    final = peft_model.merge_and_unload() if peft_model is not None else net
    final.requires_grad_(False).eval()
    # The config records where the model came from and a digest of its weights (provenance); the fingerprint that
    # identifies it is the content of the saved tensors (harness.identity).
    final.config.layerskip = {"base_model": model.checkpoint, "weights_digest": weights_digest(final),
                              "steps": cfg.steps, "seed": cfg.seed}
    _save_model(final, model.tokenizer, model_dir)
    identity = {"fingerprint": checkpoint_fingerprint(str(model_dir), True), "name": str(model_dir),
                "num_layers": L, "hidden_size": model.hidden_size, "vocab_size": model.vocab_size}
    art = ExitArtifact(model=identity)
    art.recommended["self_speculative"] = {"exit_layer": best}
    metrics = {**after, "best_exit_layer": best, "estimated_speedup": speedups}
    art.provenance["layerskip"] = provenance(
        cfg, time.perf_counter() - t0, metrics, options=asdict(opts), lr=lr, metrics_before=before,
        base_model=ExitArtifact.identity(model), model_dir=str(model_dir),
        trainable_parameters=n_trainable)
    art.save(out_path)
    note = "" if speedups[str(best)] >= 1 else " (estimated speedup below 1: train longer before self-speculating)"
    print(f"layerskip: final-layer agreement with the original {after['final_layer_agreement_with_original']:.3f}, "
          f"recommended self_speculative exit_layer {best}, estimated speedup {speedups[str(best)]:.2f}{note}\n"
          f"layerskip: trained model -> {model_dir} (use --model {model_dir})\n"
          f"layerskip: exit artifact -> {out_path} (use it with that model: --exits {out_path})")
    return art
