"""Recipe `kangaroo`: Kangaroo's adapter for a frozen model (Liu et al. 2024, arXiv 2404.18911).

The adapter (harness/generators/kangaroo.py: input norm, one attention layer with a residual, a final norm;
kangaroo/adapter.py:262-313, :323, :455 at 4f0949d) reads the model's raw hidden state after
--kangaroo_exit_layer layers (the reference's is 2: kangaroo_model.py:19) and is trained so that the shared head on
its output matches the full model's distribution at the same position: soft cross-entropy against
softmax(head(final-normed state)) (train.py:263-278, weight 1, no regression term). Here over the draft head's rows
(--drafter_vocab, the exit artifact's candidate vocabulary: the rows the generator drafts on).

Deviations, on purpose (CPU budget): the adapter starts from the model's layer after the exit (its attention and
input norm) and the final norm, so training begins from a module that already reads this model's states; a few hundred AdamW steps at --lr (reference: 20 epochs, lr 5e-5, start_train.py:9);
training sequences are text of the train/validation pools plus the model's own greedy continuations of
training-pool prompts (the reference regenerates ShareGPT answers with the model). Then the fit
(harness/train/drafters.py) recommends the draft length and threshold for `kangaroo` (Kangaroo's keep rule) and for
`self_speculative:drafter=kangaroo` (the LayerSkip loop's drop rule).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..config import UsageError, _f
from ..generators.kangaroo import PREFIX, KangarooAdapter
from . import recipe
from .common import Loop, TrainConfig
from .drafters import DrafterOptions, candidate_rows, drafter_data, finish, head_rows_weight, held_agreement, soft_ce


@dataclass
class KangarooOptions(DrafterOptions):
    """Flags of --recipe kangaroo."""

    kangaroo_exit_layer: int = _f(2, "layers before the adapter (Kangaroo's EARLY_STOP_LAYER; the reference's is 2 "
                                     "of Vicuna-7B's 32)")


@recipe("kangaroo", KangarooOptions)
def run(cfg: TrainConfig, opts: KangarooOptions, model):
    """Kangaroo's adapter (norm, one attention layer with its own K/V, norm) on a shallow exit before the shared head."""
    t_start = time.perf_counter()
    E = opts.kangaroo_exit_layer
    if not 1 <= E < model.num_layers:
        raise UsageError(f"--kangaroo_exit_layer must be in 1..{model.num_layers - 1}, got {E}")
    rows = candidate_rows(model, model.exits, opts.drafter_vocab)
    data = drafter_data(cfg, opts, model, E)
    Wv = head_rows_weight(model, rows)
    adapter = KangarooAdapter.like(model, E)
    T = data["ids"].shape[1]
    cos, sin = model.rotary(torch.zeros(1, T, model.hidden_size), 0)

    def forward(idx: torch.Tensor) -> torch.Tensor:
        return adapter(data["states"][idx], cos, sin)

    def loss(idx: torch.Tensor, step: int):
        m = data["loss_mask"][idx]
        ce = soft_ce(forward(idx)[m] @ Wv.T, data["final"][idx][m] @ Wv.T)
        return ce, {"ce": float(ce)}

    def evaluate() -> dict:
        with torch.no_grad():
            logits = lambda idx: forward(idx) @ Wv.T
            return {"agree_heldout": held_agreement(model, logits, data, rows, 0),
                    "agree_heldout_generated": held_agreement(model, logits, data, rows, 0, "generated")}

    untrained = evaluate()
    metrics = Loop(cfg, {"kangaroo": adapter}, loss, evaluate).run(data["train"])
    return finish("kangaroo", cfg, opts, model, adapter, PREFIX, data, rows, metrics, untrained, t_start,
                  extra={PREFIX + "exit_layer": torch.tensor(E)})
