"""The statistics every figure of the report carries: bootstrap intervals, the median of per-example speedup
ratios, and the verdicts (a finding only when the 95% interval excludes no effect)."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

BOOTSTRAP = 2000
MIN_PAIRS_FOR_CI = 10  # below this a bootstrap interval means little: min-max is shown instead
CONTROL_BAND = 0.05  # an A/A control further than this from 1.0 makes small speedups unreadable
SPEEDUP_COLS = ("decode_speedup", "decode_speedup_q25", "decode_speedup_q75", "decode_speedup_min",
                "decode_speedup_max", "decode_speedup_ci95_low", "decode_speedup_ci95_high")
NOT_DISTINGUISHABLE = "not distinguishable from the baseline"


def bootstrap_median(x: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """Bootstrap 95% interval of the median of x (the interval is the value itself below two values)."""
    if len(x) < 2:
        return (float(x[0]), float(x[0])) if len(x) else (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    meds = np.median(rng.choice(x, size=(BOOTSTRAP, len(x)), replace=True), axis=1)
    return float(np.percentile(meds, 2.5)), float(np.percentile(meds, 97.5))


def bootstrap_mean_ci(d: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """Paired bootstrap 95% interval of a mean difference (pairs resampled together), from MIN_PAIRS_FOR_CI on."""
    if len(d) < MIN_PAIRS_FOR_CI:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = np.asarray(d, dtype=float)[rng.integers(0, len(d), size=(BOOTSTRAP, len(d)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def speedup_stats(ratio: np.ndarray) -> dict:
    """Median of per-example ratios with IQR, min-max, and a bootstrap 95% CI only from MIN_PAIRS_FOR_CI pairs."""
    if not len(ratio):
        return {c: math.nan for c in SPEEDUP_COLS}
    lo, hi = bootstrap_median(ratio) if len(ratio) >= MIN_PAIRS_FOR_CI else (math.nan, math.nan)
    return dict(zip(SPEEDUP_COLS, (float(np.median(ratio)), float(np.percentile(ratio, 25)),
                                   float(np.percentile(ratio, 75)), float(ratio.min()), float(ratio.max()), lo, hi)))


def speed_verdict(r) -> str:
    """What a row's speedup says: "faster" / "slower" (95% CI excludes 1.0), NOT_DISTINGUISHABLE,
    "n too small" (no CI), or "none" (no speedup)."""
    if pd.isna(r.get("decode_speedup", math.nan)):
        return "none"
    lo, hi = r.get("decode_speedup_ci95_low", math.nan), r.get("decode_speedup_ci95_high", math.nan)
    if r.get("n_paired", 0) < MIN_PAIRS_FOR_CI or pd.isna(lo) or pd.isna(hi):
        return "n too small"
    return "faster" if lo > 1.0 else "slower" if hi < 1.0 else NOT_DISTINGUISHABLE


def quality_verdict(r, q: str) -> str:
    """What a row's delta of metric q says: "higher" / "lower" (95% CI excludes 0), NOT_DISTINGUISHABLE,
    "n too small" or "none"."""
    if pd.isna(r.get(f"delta_{q}", math.nan)):
        return "none"
    lo, hi = r.get(f"delta_{q}_ci95_low", math.nan), r.get(f"delta_{q}_ci95_high", math.nan)
    if r.get(f"delta_{q}_n", 0) < MIN_PAIRS_FOR_CI or pd.isna(lo) or pd.isna(hi):
        return "n too small"
    return "higher" if lo > 0.0 else "lower" if hi < 0.0 else NOT_DISTINGUISHABLE
