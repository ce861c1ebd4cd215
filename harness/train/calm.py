"""Recipe `calm`: CALM's training for a frozen trunk (Schuster et al., NeurIPS 2022, arXiv 2207.07061).

CALM trains its decoder so that every layer's exit predicts the next token, with the weighted average of the
per-layer cross-entropies, weights growing with depth: w_i = i / sum_j j (FREE's re-implementation of CALM,
raymin0223/fast_robust_early_exit util/losses.py `weighted_ce`, the `--intermediate_loss_fn` its CALM scripts
use). Its early-exit classifier is a linear map of the layer's hidden state d_i to a confidence
c_i = sigmoid(w . d_i + b), trained with the language model frozen, by binary cross-entropy against the
consistency label y_i = 1[argmax exit_i == argmax exit_L] of the teacher-forced model (FREE's `meta` measure,
util/losses.py `compute_cm_head_loss`, trains one 2-way head shared by all layers on those labels). At decoding
time `--confidence classifier` exits when c_i > threshold (harness/generators/calm.py).

This recipe, deliberately for a frozen trunk (the trunk-training recipe is `layerskip`):
1. trains an exit adapter (harness/trained_exits.py) at each --exit_layers layer, applied before the shared final
   norm + head, with CALM's depth-weighted CE to the real next token. The weights are i / sum_j j over the
   *trained exits* only: CALM's sum also runs over the other layers, but with a frozen trunk and no adapters
   there their terms are constants, so leaving them out only rescales the gradient. The trunk runs only up to
   the deepest exit in this phase (nothing above it is read);
2. then, with the adapters frozen, trains CALM's classifier for `--calm_classifier_steps` steps: **one linear
   classifier per exit layer** (not one shared across layers as FREE's code: each exit has its own adapter and
   hidden-state statistics, and a per-layer sigmoid needs no layer embedding), on the raw hidden state of that
   layer (before its adapter: what the decoder holds when it asks), with the BCE averaged over positions and
   exit layers. Labels compare the adapted exit's top-1 (the exit the decoder will actually take) with the last
   layer's. Plain BCE (FREE's code adds a logit adjustment for class balance; we do not: the threshold is
   calibrated anyway). Stored as tensors `calm.classifier.<layer>.weight` (1, hidden) and `.bias` (1,); a
   classifier of the starting artifact at a retrained layer is replaced, or dropped with
   --calm_classifier_steps 0 (it was fit to the old adapter).
The trunk's hidden states are computed once per batch under no_grad; only adapters (then classifiers) get
gradients. Both phases use `Loop` (log, progress, checkpoint/resume): the adapters in --work_dir, the classifier
in <work_dir>/classifier. Agreement is logged on the held-out rows with the modules being trained, and at the end
with the finished artifact attached (common.agreement; the caller's exits are restored afterwards).

`frozen_trunk`, `check_width`, `exit_adapters`, `teacher`, `exit_agreement`, `heldout` and `attached_agreement` are
shared with `free`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import UsageError, _f
from ..generators.exit_probe import CLASSIFIER_PREFIX
from ..trained_exits import ExitAdapter
from . import recipe
from .common import Loop, TrainConfig, agreement, autocast, hidden_states, provenance, start_artifact, train_eval_split

GPU_WHY = "a useful run (hundreds of steps of 4 x 256 tokens through the trunk and full-vocabulary exit heads) " \
          "takes about an hour on CPU, minutes on one GPU"


@dataclass
class CalmOptions:
    """Flags of --recipe calm."""

    calm_adapter_width: int = _f(1152, "hidden width of each exit adapter's MLP (must equal the starting "
                                       "artifact's adapter width, if it has adapters)")
    calm_classifier_steps: int = _f(100, "optimizer steps for CALM's early-exit classifier after the adapters "
                                         "(0 = train no classifier)")
    calm_classifier_lr: float = _f(1e-3, "learning rate of the classifier phase (AdamW)")


# -- shared with `free` ----------------------------------------------------------------------------------
@contextlib.contextmanager
def frozen_trunk(model):
    """The model's own parameters without gradients for the duration (restored afterwards): only our modules train."""
    flags = [(p, p.requires_grad) for p in model.hf.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def check_width(art, width: int, flag: str) -> None:
    """Every adapter of one artifact has the same width: refuse to add adapters of another."""
    if width < 1:
        raise UsageError(f"--{flag} must be >= 1, got {width}")
    if art.adapters and art.adapter_width and art.adapter_width != width:
        raise UsageError(f"--{flag} {width}: the starting artifact's adapters (layers {sorted(art.adapters)}) are "
                         f"{art.adapter_width} wide and one artifact has one width; pass --{flag} "
                         f"{art.adapter_width} or start from --exits none")


def exit_adapters(model, art, layers: list[int], width: int) -> nn.ModuleDict:
    """A trainable fp32 adapter per layer: the artifact's own where it has one (training continues), else new
    (zero down-projection: starts as the untrained exit)."""
    eps = getattr(model.config, "rms_norm_eps", 1e-5)
    mods = nn.ModuleDict()
    for d in layers:
        a = ExitAdapter(model.hidden_size, width, eps=eps)
        if d in art.adapters:
            a.load_state_dict(art.adapters[d])
        mods[str(d)] = a.to(device=model.device, dtype=torch.float32)
    return mods


def adapted_logits(model, adapter: Optional[nn.Module], h: torch.Tensor) -> torch.Tensor:
    """What the exit reads with this adapter: lm_head(final_norm(adapter(h))) (differentiable in the adapter)."""
    return model.lm_head(model.norm(adapter(h) if adapter is not None else h))


def next_token_ce(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of positions 0..T-2 against the real next tokens 1..T-1."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten().to(logits.device))


@torch.no_grad()
def teacher(model, ids: torch.Tensor, upto: Optional[int] = None) -> list[torch.Tensor]:
    """The frozen trunk's hidden states, once per batch, without a graph: depths 0..L (L final-normed, as
    common.hidden_states), or only depths 0..upto when nothing deeper is read (the layers above are not run)."""
    with autocast(model.device):
        if upto is None or upto >= model.num_layers:
            return hidden_states(model, ids)
        saved = model.reset_counters()  # training is not decoding: leave the work counters as they were
        try:
            h = model.embed(ids.to(model.device))
            rope, cache, out = model.rope(h, 0), model.new_cache(), [h]
            for i in range(upto):
                h = model.run_layers(h, i, i + 1, cache, 0, rope=rope)
                out.append(h)
            return out
        finally:
            model.counters = saved


@torch.no_grad()
def exit_agreement(model, adapters: nn.ModuleDict, hs: list[torch.Tensor]) -> dict[int, float]:
    """Teacher-forced top-1 agreement of each adapted exit with the last layer on one batch's hidden states."""
    with autocast(model.device):
        target = model.lm_head(hs[-1]).argmax(-1)
        return {int(d): float((adapted_logits(model, a, hs[int(d)]).argmax(-1) == target).float().mean())
                for d, a in adapters.items()}


@torch.no_grad()
def heldout(model, rows: torch.Tensor, fn, batch: int = 4) -> dict[str, float]:
    """Metrics fn(ids, hidden states) -> {name: value} averaged over held-out rows (one trunk pass per batch)."""
    sums: dict[str, float] = {}
    for i in range(0, len(rows), batch):
        ids = rows[i:i + batch]
        for key, v in fn(ids, teacher(model, ids)).items():
            sums[key] = sums.get(key, 0.0) + float(v) * len(ids)
    return {k: v / len(rows) for k, v in sums.items()}


def attached_agreement(model, art, rows: torch.Tensor, layers: list[int]) -> dict[int, float]:
    """common.agreement with `art` attached (the path decoding takes), the caller's exits restored afterwards."""
    prev = model.exits
    try:
        model.set_exits(art)
        return agreement(model, rows, layers)
    finally:
        model.set_exits(prev)


def sub_config(cfg: TrainConfig, phase: str, steps: int) -> TrainConfig:
    """The config of a second Loop phase: its own checkpoint and log under <work_dir>/<phase>."""
    work, _ = cfg.paths()
    return dataclasses.replace(cfg, work_dir=str(work / phase), steps=steps)


# -- CALM's objectives -------------------------------------------------------------------------------------
def depth_weights(layers: list[int]) -> dict[int, float]:
    """CALM's w_i = i / sum_j j over the trained exits."""
    total = sum(layers)
    return {d: d / total for d in layers}


def weighted_ce(model, adapters: nn.ModuleDict, ids: torch.Tensor,
                hs: Optional[list[torch.Tensor]] = None) -> tuple[torch.Tensor, dict]:
    """CALM's depth-weighted average of the exits' next-token cross-entropies on rows `ids`."""
    hs = teacher(model, ids, upto=max(int(d) for d in adapters)) if hs is None else hs
    weights = depth_weights([int(d) for d in adapters])
    loss, metrics = 0.0, {}
    with autocast(model.device):
        for d, a in adapters.items():
            ce = next_token_ce(adapted_logits(model, a, hs[int(d)]), ids)
            loss = loss + weights[int(d)] * ce
            metrics[f"ce@{d}"] = float(ce.detach())
    return loss, metrics


def classifier_heads(model, layers: list[int]) -> nn.ModuleDict:
    """One linear classifier per exit layer, zero-initialised (confidence 0.5). Always trained afresh: the labels
    depend on the adapters just trained, so a starting artifact's classifier is replaced."""
    heads = nn.ModuleDict()
    for d in layers:
        lin = nn.Linear(model.hidden_size, 1)
        nn.init.zeros_(lin.weight)
        nn.init.zeros_(lin.bias)
        heads[str(d)] = lin.to(device=model.device, dtype=torch.float32)
    return heads


def classifier_bce(model, adapters: nn.ModuleDict, heads: nn.ModuleDict, ids: torch.Tensor,
                   hs: Optional[list[torch.Tensor]] = None) -> tuple[torch.Tensor, dict]:
    """CALM's classifier loss: BCE of sigmoid(w . h_i + b) against 1[top-1 of adapted exit i == top-1 of the last
    layer], averaged over positions and exit layers. Labels come from the frozen model (no gradient)."""
    hs = teacher(model, ids) if hs is None else hs
    loss, metrics = 0.0, {}
    with torch.no_grad(), autocast(model.device):
        target = model.lm_head(hs[-1]).argmax(-1)
        labels = {d: (adapted_logits(model, adapters[d], hs[int(d)]).argmax(-1) == target).float()
                  for d in heads}
    for d, head in heads.items():
        z = head(hs[int(d)].float()).squeeze(-1)
        bce = F.binary_cross_entropy_with_logits(z, labels[d])
        loss = loss + bce / len(heads)
        metrics[f"bce@{d}"] = float(bce.detach())
        metrics[f"agree@{d}"] = float(labels[d].mean())  # positive rate of the labels
        metrics[f"clf_acc@{d}"] = float(((z > 0).float() == labels[d]).float().mean())
    return loss, metrics


# -- the recipe ----------------------------------------------------------------------------------------------
@recipe("calm", CalmOptions, gpu=GPU_WHY)
def train_calm(cfg: TrainConfig, opts: CalmOptions, model):
    """CALM: exit adapters by depth-weighted CE (frozen trunk), then CALM's early-exit classifier (BCE)."""
    t0 = time.perf_counter()
    layers = cfg.layers(model.num_layers)
    art = start_artifact(cfg, model)
    check_width(art, opts.calm_adapter_width, "calm_adapter_width")
    if opts.calm_classifier_steps < 0:
        raise UsageError(f"--calm_classifier_steps must be >= 0, got {opts.calm_classifier_steps}")
    rows, eval_rows = train_eval_split(cfg, model.tokenizer)
    adapters = exit_adapters(model, art, layers, opts.calm_adapter_width)
    metrics: dict = {}
    with frozen_trunk(model):
        def loss(batch, step):
            return weighted_ce(model, adapters, batch)

        def metrics_on(ids, hs):
            return {"eval_loss": weighted_ce(model, adapters, ids, hs)[0],
                    **{f"agreement@{d}": v for d, v in exit_agreement(model, adapters, hs).items()}}

        def evaluate():
            return heldout(model, eval_rows, metrics_on)

        metrics["adapters"] = Loop(cfg, {"adapters": adapters}, loss, evaluate).run(rows)
        adapters.requires_grad_(False).eval()
        for d, a in adapters.items():
            art.adapters[int(d)] = {k: v.detach().cpu().clone() for k, v in a.state_dict().items()}
        art.adapter_width = opts.calm_adapter_width

        if opts.calm_classifier_steps:
            heads = classifier_heads(model, layers)

            def clf_loss(batch, step):
                return classifier_bce(model, adapters, heads, batch)

            def clf_metrics_on(ids, hs):
                bce, m = classifier_bce(model, adapters, heads, ids, hs)
                return {"eval_bce": bce, **{k: v for k, v in m.items() if k.startswith(("clf_acc@", "agree@"))}}

            def clf_evaluate():
                return heldout(model, eval_rows, clf_metrics_on)

            sub = sub_config(cfg, "classifier", opts.calm_classifier_steps)
            metrics["classifier"] = Loop(sub, {"classifier": heads}, clf_loss, clf_evaluate,
                                         lr=opts.calm_classifier_lr).run(rows)
            for d, head in heads.items():
                art.tensors[f"{CLASSIFIER_PREFIX}{d}.weight"] = head.weight.detach().cpu().clone()
                art.tensors[f"{CLASSIFIER_PREFIX}{d}.bias"] = head.bias.detach().cpu().clone()
        else:  # a starting artifact's classifier at a retrained layer was fit to the old adapter: drop it
            for d in layers:
                art.tensors.pop(f"{CLASSIFIER_PREFIX}{d}.weight", None)
                art.tensors.pop(f"{CLASSIFIER_PREFIX}{d}.bias", None)
    metrics["agreement"] = attached_agreement(model, art, eval_rows, layers)
    art.provenance["calm"] = provenance(
        cfg, time.perf_counter() - t0, metrics, options=asdict(opts), exit_layers=layers,
        loss="sum_i (i / sum_j j) CE(exit_i, next token) over the trained exits; classifier: mean over exits of "
             "BCE(sigmoid(w_i . h_i + b_i), 1[top-1 exit_i == top-1 last layer])",
        classifier="per exit layer" if opts.calm_classifier_steps else None)
    art.save(cfg.paths()[1])
    return art
