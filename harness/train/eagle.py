"""Recipe `eagle`: an EAGLE-style draft head for a frozen model (Li et al. 2024, arXiv 2401.15077).

One decoder layer (harness/generators/eagle.py's EagleHead) reads fc([embedding of token t+1; feature at t]) and is
trained to predict the model's final-normed feature at t+1, with EAGLE-1's loss (SafeAILab/EAGLE branch v1 at
4a9cf3a, eagle/train/main.py): v_w x SmoothL1(predicted, true feature) + p_w x soft cross-entropy of the shared
head's distribution on the predicted feature against the one on the true feature (:357-367; v_w 1.0, p_w 0.1,
:24-25), with EAGLE's uniform noise on the input features, (U - 0.5) x std x 512 / seq_len, std 0.2 (:30-33,
:124-131). Here the cross-entropy runs over the draft head's rows (--drafter_vocab: the exit artifact's candidate
vocabulary), the rows the generator drafts on.

Deviations, on purpose (CPU budget): the layer starts from the model's last layer (EAGLE's starts untrained) and the
fc from [0, I] (the feature passes through); a few hundred AdamW steps at --lr over tens of thousands of tokens
(EAGLE: 20 epochs over ShareGPT at lr 3e-5); training sequences are text of the train/validation pools plus the
model's own greedy continuations of training-pool prompts (EAGLE regenerates ShareGPT answers with the target model).
Then the fit (harness/train/drafters.py) recommends the draft length and confidence threshold for `eagle` (keep the
unsure draft, Kangaroo's rule) and for `hybrid_speculative:drafter=eagle` / `self_speculative:drafter=eagle` (the
LayerSkip loop's drop rule).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..generators.eagle import PREFIX, EagleHead
from ..config import _f
from . import recipe
from .common import Loop, TrainConfig
from .drafters import DrafterOptions, candidate_rows, drafter_data, finish, head_rows_weight, held_agreement, soft_ce


@dataclass
class EagleOptions(DrafterOptions):
    """Flags of --recipe eagle."""

    eagle_noise: float = _f(0.2, "EAGLE's uniform noise on input features: (U - 0.5) x this x 512 / --seq_len "
                                 "(eagle/train/main.py:30-33, :124-131); 0 = none")
    eagle_ce_weight: float = _f(0.1, "weight of the soft cross-entropy term (EAGLE's p_w)")
    eagle_regression_weight: float = _f(1.0, "weight of the SmoothL1 feature regression (EAGLE's v_w)")


@recipe("eagle", EagleOptions)
def run(cfg: TrainConfig, opts: EagleOptions, model):
    """An EAGLE-style head: one decoder layer predicting the next final-layer feature, read out by the shared head."""
    t_start = time.perf_counter()
    rows = candidate_rows(model, model.exits, opts.drafter_vocab)
    data = drafter_data(cfg, opts, model, None)
    Wv = head_rows_weight(model, rows)
    head = EagleHead.like(model)
    T = data["ids"].shape[1]
    probe = torch.zeros(1, T - 1, model.hidden_size)
    cos, sin = model.rotary(probe, 0)  # head position j-1 holds token j (EAGLE drops the first token)
    noise = opts.eagle_noise * 512 / T

    def forward(idx: torch.Tensor, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        ids, feat = data["ids"][idx], data["final"][idx]
        with torch.no_grad():
            emb = model.embed(ids[:, 1:]).float()
        inp = feat[:, :-1]
        if train and noise:
            inp = inp + (torch.rand_like(inp) - 0.5) * noise
        return head(emb, inp, cos, sin), feat[:, 1:]

    def loss(idx: torch.Tensor, step: int):
        pred, target = forward(idx, True)
        m = data["loss_mask"][idx][:, 1:] & data["mask"][idx][:, :-1]
        v = F.smooth_l1_loss(pred[m], target[m])
        p = soft_ce(pred[m] @ Wv.T, target[m] @ Wv.T)
        return opts.eagle_regression_weight * v + opts.eagle_ce_weight * p, {"vloss": float(v), "ploss": float(p)}

    def evaluate() -> dict:
        with torch.no_grad():
            logits = lambda idx: forward(idx, False)[0] @ Wv.T
            return {"agree_heldout": held_agreement(model, logits, data, rows, 1),
                    "agree_heldout_generated": held_agreement(model, logits, data, rows, 1, "generated")}

    untrained = evaluate()
    metrics = Loop(cfg, {"eagle": head}, loss, evaluate).run(data["train"])
    return finish("eagle", cfg, opts, model, head, PREFIX, data, rows, metrics, untrained, t_start)
