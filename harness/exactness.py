"""What "lossless" means per dtype: a greedy lossless method's tokens against greedy autoregressive decoding's.

fp32: identical, token for token (the tests hold every lossless method to it).
bf16 / fp16: a verifier scores several positions in one pass, plain decoding one; the kernels' arithmetic differs
with the number of positions, so where plain decoding's top two logits are nearly tied the two can pick different
tokens. A mismatch is therefore classified by plain decoding's top-1 minus top-2 logit (its record's `top2_gaps`)
at the first position where the outputs differ (the contexts are identical up to there):
  near-tie  the margin is below TOLERANCE[dtype]: the dtype's own arithmetic cannot tell the two tokens apart;
  real      the margin is at or above it: the method changed the output, a bug in a lossless method.
TOLERANCE is set above the largest margin drift `bench/ties.py` measured between one-position decoding and
8-position re-scoring of the same tokens on real text (XSum validation, SmolLM2-135M-Instruct, this CPU):
  float32   max drift 0.0001 over 320 positions, no argmax flip            -> 0.001
  bfloat16  max drift 0.375 over 640 positions (p99 0.25), 10 argmax flips -> 0.5 (every flip had margin <= 0.125)
  float16   not measured here; set like bfloat16 scaled by its 3 more mantissa bits -> 0.0625
After the first difference the two continuations have different contexts and are not compared further.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

TOLERANCE = {"float32": 1e-3, "bfloat16": 0.5, "float16": 0.0625}


def tolerance(dtype: str) -> float:
    """The near-tie margin for a dtype name as run.json records it ("float32", "bfloat16", ...)."""
    return TOLERANCE.get(str(dtype).removeprefix("torch."), TOLERANCE["float32"])


@dataclass
class Match:
    """One example's output against plain greedy decoding's."""

    kind: str  # "identical" | "near-tie" | "real" | "unknown" (no reference margin recorded at the difference)
    first_difference: Optional[int]  # index of the first differing token (None when identical)
    margin: Optional[float]  # plain decoding's top-1 minus top-2 logit at that index


def compare(tokens: Sequence[int], reference: Sequence[int], reference_gaps: Optional[Sequence[float]],
            dtype: str) -> Match:
    """Classify `tokens` against the reference output (compared over their common length: a stop may cut one)."""
    n = min(len(tokens), len(reference))
    i = next((j for j in range(n) if tokens[j] != reference[j]), None)
    if i is None:
        return Match("identical", None, None)
    if not reference_gaps or i >= len(reference_gaps):
        return Match("unknown", i, None)
    margin = float(reference_gaps[i])
    return Match("near-tie" if margin < tolerance(dtype) else "real", i, margin)


def summarize(matches: Sequence[Match]) -> dict:
    """Counts per kind, and the largest margin among mismatches (what a reader checks against the tolerance)."""
    out = {k: sum(m.kind == k for m in matches) for k in ("identical", "near-tie", "real", "unknown")}
    out["n"] = len(matches)
    margins = [m.margin for m in matches if m.margin is not None]
    out["max_mismatch_margin"] = max(margins) if margins else None
    return out
