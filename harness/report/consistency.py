"""Consistency with the full model: how close a configuration's output is to its baseline's on the same example.

Per paired example (paired by id and prompt hash, as the speedups are): the ROUGE-L F-measure of its prediction
against the baseline's prediction (rouge-score's tokenizer with Porter stemming, as harness.metrics.rouge scores
against a reference; two equal texts score 1.0, even empty ones, where rouge-score says 0), and the token
exact-match rate: the share of positions i < max(len(a), len(b)) where the two token_ids agree, a position beyond
the shorter one counting as a mismatch (two empty outputs agree: 1.0). Every row but the baseline and the A/A
control gets the means (report.csv `consistency_rougeL`, `consistency_tokens`); a greedy lossless method's is 1.0
in float32, a useful check of it.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Optional

import numpy as np

from .pairing import is_baseline

COLUMNS = ("consistency_rougeL", "consistency_tokens")


@lru_cache(maxsize=1)
def _tokenizer():
    from rouge_score.tokenizers import DefaultTokenizer

    return DefaultTokenizer(use_stemmer=True)  # what harness.metrics._rouge's RougeScorer(use_stemmer=True) uses


def lcs_length(a: list, b: list) -> int:
    """Length of the longest common subsequence of a and b. The dynamic programme of rouge-score's _lcs_table, one
    row at a time: with t[j] = max(prev[j], prev[j-1] + 1 where a_i == b_j), the row is the running maximum of t
    (the table never decreases along a row), so each row is a few array operations, not a Python loop over b."""
    if not a or not b:
        return 0
    ids: dict = {}
    bb = np.array([ids.setdefault(x, len(ids)) for x in b])
    prev = np.zeros(len(b) + 1, dtype=np.int64)
    for x in a:
        t = prev.copy()
        k = ids.get(x)
        if k is not None:
            t[1:] = np.maximum(prev[1:], np.where(bb == k, prev[:-1] + 1, 0))
        prev = np.maximum.accumulate(t)
    return int(prev[-1])


def rouge_l(prediction: Optional[str], reference: Optional[str]) -> float:
    """ROUGE-L F-measure of prediction against reference, as rouge-score computes it (its _score_lcs), 1.0 when the
    two texts are equal."""
    prediction, reference = prediction or "", reference or ""
    if prediction == reference:
        return 1.0
    p, r = _tokenizer().tokenize(prediction), _tokenizer().tokenize(reference)
    lcs = lcs_length(r, p)
    if not lcs:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def token_agreement(a: Optional[list], b: Optional[list]) -> Optional[float]:
    """Share of positions i < max(len(a), len(b)) where a[i] == b[i] (beyond the shorter: a mismatch); None when
    either is missing."""
    if a is None or b is None:
        return None
    n = max(len(a), len(b))
    return 1.0 if n == 0 else sum(x == y for x, y in zip(a, b)) / n


def per_example(run: dict, base: Optional[dict]) -> dict:
    """id -> (ROUGE-L F, token agreement or None) of a run's examples against its baseline's ({} for the baseline,
    the A/A control, or without a baseline). The first record of an id wins, as in the report's table."""
    info = run["run"]
    if base is None or base is run or info.get("control") or is_baseline(info):
        return {}
    first = lambda recs: {str(e["id"]): e for e in reversed(recs)}  # noqa: E731
    ref = first(base["examples"])
    return {i: (rouge_l(e.get("prediction"), ref[i].get("prediction")),
                token_agreement(e.get("token_ids"), ref[i].get("token_ids")))
            for i, e in first(run["examples"]).items()
            if i in ref and ref[i].get("prompt_sha256") == e.get("prompt_sha256")}


def means(values) -> dict:
    """The two report columns from per-example (ROUGE-L, tokens) pairs (NaN where there is nothing to average)."""
    values = list(values)
    mean = lambda xs: float(np.mean(xs)) if xs else math.nan  # noqa: E731
    return {"consistency_rougeL": mean([r for r, _ in values]),
            "consistency_tokens": mean([t for _, t in values if t is not None])}
