"""Predicting self-speculative speed from measured costs and teacher-forced exit agreement.

Used by the `exit_adapters` recipe to recommend an exit layer / draft length / draft threshold, and by the
diagnostics to put a predicted speedup beside a measured one. The cost figures are measured on the machine at
hand (`measure_costs`); the acceptance pattern comes from teacher-forced agreement of the draft exit with the
last layer on held-out text (drafts conditioned on accepted drafts see exactly the full model's context, so
teacher forcing is the right stand-in for greedy decoding).
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

    def step(self) -> float:
        """One autoregressive decode step: every layer + the full head."""
        return self.layer * self.layer_count + self.head[1]

    layer_count: int = 0


def _median_time(fn, sync, reps: int = 7) -> float:
    fn()
    ts = []
    for _ in range(reps):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


@torch.inference_mode()
def measure_costs(model, rows: Optional[torch.Tensor] = None, context: int = 512, max_q: int = 8) -> Costs:
    """Time a layer, the full head and the reduced head on this model and device at `context` positions."""
    m = model
    ids = torch.randint(0, m.vocab_size, (1, context), generator=torch.Generator().manual_seed(0)).to(m.device)
    cache = m.new_cache()
    m.run_layers(m.embed(ids), 0, 1, cache, 0)
    layer_chunk, head = {}, {}
    for q in range(1, max_q + 1):
        h = torch.randn(1, q, m.hidden_size, device=m.device, dtype=m.dtype)
        rope = m.rope(h, context)

        def one_layer():
            m.run_layers(h, 0, 1, cache, context, rope=rope)
            m.crop(cache, context, [0])

        layer_chunk[q] = _median_time(one_layer, m.synchronize)
        head[q] = _median_time(lambda: m.exit_logits(h), m.synchronize)
    h1 = torch.randn(1, 1, m.hidden_size, device=m.device, dtype=m.dtype)
    head_rows = _median_time(lambda: m.exit_logits(h1, rows), m.synchronize) if rows is not None else head[1]
    adapter = 0.0
    if m.adapters:
        a = next(iter(m.adapters.values()))
        adapter = _median_time(lambda: a(h1), m.synchronize)
    m.reset_counters()
    return Costs(layer=layer_chunk[1], layer_chunk=layer_chunk, head=head, head_rows=head_rows, adapter=adapter,
                 context=context, layer_count=m.num_layers)


def simulate(agree: Sequence[bool], conf: Sequence[float], E: int, k: int, threshold: float, costs: Costs) -> dict:
    """Greedy self-speculation along a teacher-forced sequence: predicted tokens per step, acceptance, speedup.

    agree[t]: the draft exit's top-1 at position t equals the last layer's; conf[t]: its draft confidence (top-1
    probability on the draft head). Drafting stops at k drafts or at the first draft whose confidence is below
    `threshold` (that draft is dropped, Kangaroo's early stop; its input's layer-E state is kept for the scorer).
    Verification runs layers E..L-1 over the kept drafts + 1 positions plus the full head on them.
    """
    L = costs.layer_count
    q_max = max(costs.layer_chunk)
    t, n = 0, len(agree)
    time_total = tokens = drafted = accepted = 0.0
    draft_step = E * costs.layer + costs.adapter + costs.head_rows
    while t < n:
        kept = 0
        steps = 0
        while kept < k and t + kept < n:
            steps += 1
            if conf[t + kept] < threshold:
                break
            kept += 1
        a = 0
        while a < kept and agree[t + a]:
            a += 1
        q = min(kept + 1, q_max)
        # the last position's layers 0..E: already run by a draft attempt that stopped on the threshold (the
        # generator keeps that state), else run by the scorer
        last = 0.0 if steps > kept else E * costs.layer
        verify = last + (L - E) * costs.layer_chunk[q] + costs.head[q]
        time_total += steps * draft_step + verify
        tokens += a + 1
        drafted += kept
        accepted += a
        t += a + 1
    ar = costs.step() * tokens
    return {"exit_layer": E, "num_speculations": k, "draft_threshold": threshold,
            "tokens_per_step": tokens / max(1, (tokens - accepted)), "acceptance": accepted / drafted if drafted else 0.0,
            "predicted_speedup": ar / time_total if time_total else 0.0}


def best_setting(per_layer: dict, costs: Costs, ks: Sequence[int] = (1, 2, 3, 4, 6),
                 thresholds: Sequence[float] = (0.0, 0.3, 0.5, 0.7, 0.8, 0.9)) -> tuple[dict, list[dict]]:
    """The (E, k, threshold) with the highest predicted speedup; per_layer: E -> (agree list, conf list)."""
    table = [simulate(ag, cf, E, k, th, costs) for E, (ag, cf) in per_layer.items() for k in ks for th in thresholds]
    return max(table, key=lambda r: r["predicted_speedup"]), table
