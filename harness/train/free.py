"""Recipe `free`: FREE's shallow-deep training for a frozen trunk (Bae et al., EMNLP 2023, arXiv 2310.05424).

FREE's shallow-deep module is the first S layers (shallow) and all L layers (deep). Its training loss
(raymin0223/fast_robust_early_exit util/losses.py, `--intermediate_loss_fn shallowdeep_kd_dyna`, the setting of
its scripts, e.g. scripts/run_sum_cnndm.sh with `--distill_layer_alpha 0.5`) is

    L = (S * CE(shallow, y) + L * CE(deep, y)) / (S + L) + alpha * KD(deep -> shallow)

i.e. the two cross-entropies to the labels weighted by depth (static weights S/(S+L) and L/(S+L)), plus a
distillation term with a fixed coefficient alpha. The "dynamic" (`_dyna`) part of FREE's loss is the *layer
mapping* of its hidden-state distillation: each of a fixed list of deep layers is matched to the shallow layer
whose hidden state is closest by MSE, and the MSEs of the matched pairs are averaged; the loss weights themselves
do not depend on the losses.

This recipe trains an exit adapter (harness/trained_exits.py) at the shallow exit S (--free_shallow_exit_layer,
default the first of --exit_layers) before the shared final norm + head; the trunk is frozen on purpose (the
trunk-training recipe is `layerskip`), its hidden states computed once per batch under no_grad. Deviations, all
forced by the frozen trunk:
- CE(deep, y) is a constant (no adapter at the last layer, nothing trainable on the deep path). It is kept in
  the loss so the logged value is FREE's objective, but it contributes no gradient;
- FREE's layer-wise hidden-state KD with dynamic mapping has one trainable student state, the adapted state at S
  (the shallow layers below S are the frozen trunk's, and FREE's deep-layer lists exist only for 12- and 24-layer
  T5s), so the mapping has nothing to choose. --free_kd hidden (default) keeps FREE's kind of KD on that one pair,
  as FREE's `shallowdeep_kd_last` does: MSE between the shallow exit's state and the deep model's last state, both
  after the shared final norm (the states the head reads; raw residual streams differ in scale by depth, which
  the norm removes anyway). --free_kd logits distils the output distribution instead: T^2 * KL(p_deep^T ||
  p_shallow^T) (Hinton et al.), T = --free_kd_temperature;
- alpha = --free_kd_alpha, 0.5 as FREE's scripts.
The artifact gets the adapter at S (one width per artifact: `--free_adapter_width` must match the starting
artifact's) and `recommended["free"] = {"shallow_exit_layer": S}`, which `--generation_strategy free` takes when
--shallow_exit_layer is left at its default.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import UsageError, _f
from ..generators.exit_probe import CLASSIFIER_PREFIX
from . import recipe
from .calm import (
    GPU_WHY,
    attached_agreement,
    check_width,
    exit_adapters,
    exit_agreement,
    frozen_trunk,
    heldout,
    next_token_ce,
    teacher,
)
from .common import Loop, TrainConfig, autocast, provenance, start_artifact, train_eval_split

KD_KINDS = ("hidden", "logits")


@dataclass
class FreeOptions:
    """Flags of --recipe free."""

    free_shallow_exit_layer: Optional[int] = _f(
        None, "the shallow module's depth S, 1..L-1, where the exit adapter is trained (default: the first of "
              "--exit_layers)")
    free_adapter_width: int = _f(1152, "hidden width of the exit adapter's MLP (must equal the starting artifact's "
                                       "adapter width, if it has adapters)")
    free_kd: str = _f("hidden", "distillation from deep to shallow: hidden = MSE of the final-normed shallow and deep "
                                "states (FREE's hidden-state KD on the one trainable pair), logits = T^2 KL(deep || "
                                "shallow) at temperature --free_kd_temperature", choices=KD_KINDS)
    free_kd_alpha: float = _f(0.5, "weight of the KD term (FREE's --distill_layer_alpha 0.5)")
    free_kd_temperature: float = _f(1.0, "temperature of --free_kd logits")


def shallow_layer(cfg: TrainConfig, opts: FreeOptions, num_layers: int) -> int:
    S = opts.free_shallow_exit_layer
    if S is None:
        return cfg.layers(num_layers)[0]
    if not 1 <= S < num_layers:
        raise UsageError(f"--free_shallow_exit_layer {S} is outside 1..{num_layers - 1} for this model")
    return S


def free_loss(model, adapter: nn.Module, S: int, ids: torch.Tensor, opts: FreeOptions,
              hs: Optional[list[torch.Tensor]] = None) -> tuple[torch.Tensor, dict]:
    """FREE's objective on rows `ids`: (S*CE_shallow + L*CE_deep)/(S+L) + alpha*KD(deep -> shallow)."""
    L = model.num_layers
    hs = teacher(model, ids) if hs is None else hs
    with autocast(model.device):
        with torch.no_grad():
            deep_logits = model.lm_head(hs[-1])
            ce_deep = next_token_ce(deep_logits, ids)  # frozen trunk: a constant, no gradient
        state = model.norm(adapter(hs[S]))
        shallow_logits = model.lm_head(state)
        ce_shallow = next_token_ce(shallow_logits, ids)
        if opts.free_kd == "hidden":
            kd = F.mse_loss(state.float(), hs[-1].float())
        else:
            T = opts.free_kd_temperature
            kd = F.kl_div(F.log_softmax(shallow_logits.float() / T, -1).flatten(0, 1),
                          F.log_softmax(deep_logits.float() / T, -1).flatten(0, 1),
                          log_target=True, reduction="batchmean") * T * T
    loss = (S * ce_shallow + L * ce_deep) / (S + L) + opts.free_kd_alpha * kd
    return loss, {"ce_shallow": float(ce_shallow.detach()), "ce_deep": float(ce_deep), "kd": float(kd.detach())}


@recipe("free", FreeOptions, gpu=GPU_WHY)
def train_free(cfg: TrainConfig, opts: FreeOptions, model):
    """FREE: shallow-exit adapter by shallow-deep CE + deep-to-shallow distillation (frozen trunk)."""
    t0 = time.perf_counter()
    S = shallow_layer(cfg, opts, model.num_layers)
    if opts.free_kd not in KD_KINDS:
        raise UsageError(f"--free_kd {opts.free_kd!r}: choose one of {', '.join(KD_KINDS)}")
    if opts.free_kd_temperature <= 0:
        raise UsageError(f"--free_kd_temperature must be > 0, got {opts.free_kd_temperature}")
    art = start_artifact(cfg, model)
    check_width(art, opts.free_adapter_width, "free_adapter_width")
    rows, eval_rows = train_eval_split(cfg, model.tokenizer)
    adapters = exit_adapters(model, art, [S], opts.free_adapter_width)
    adapter = adapters[str(S)]
    with frozen_trunk(model):
        def loss(batch, step):
            return free_loss(model, adapter, S, batch, opts)

        def metrics_on(ids, hs):
            value, m = free_loss(model, adapter, S, ids, opts, hs)
            return {"eval_loss": value, "eval_ce_shallow": m["ce_shallow"], "eval_kd": m["kd"],
                    f"agreement@{S}": exit_agreement(model, adapters, hs)[S]}

        def evaluate():
            return heldout(model, eval_rows, metrics_on)

        metrics = {"training": Loop(cfg, {"adapters": adapters}, loss, evaluate).run(rows)}
    art.adapters[S] = {k: v.detach().cpu().clone() for k, v in adapter.state_dict().items()}
    art.adapter_width = opts.free_adapter_width
    art.recommended.setdefault("free", {})["shallow_exit_layer"] = S
    for name in ("weight", "bias"):  # a CALM classifier at S was fit to the old adapter's agreement: drop it
        art.tensors.pop(f"{CLASSIFIER_PREFIX}{S}.{name}", None)
    metrics["agreement"] = attached_agreement(model, art, eval_rows, [S])
    art.provenance["free"] = provenance(
        cfg, time.perf_counter() - t0, metrics, options=asdict(opts), shallow_exit_layer=S,
        loss=f"(S*CE(shallow) + L*CE(deep))/(S+L) + {opts.free_kd_alpha}*KD_{opts.free_kd}; CE(deep) constant "
             "(frozen trunk)")
    art.save(cfg.paths()[1])
    return art
