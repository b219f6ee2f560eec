"""Seeds → intervals: loss ± a confidence interval over replicates, and the knee of loss vs rank.

* Interval: mean ± t_{(1+level)/2, S−1}·s/√S over the S replicates (Student t; s the sample
  standard deviation). One replicate has no interval (NaN half-width).
* Knee: with the mean losses L_1 … L_R at ranks r_1 < … < r_R, the improvement per doubling
  between neighbours is Δ_i = (L_i − L_{i+1}) / log2(r_{i+1}/r_i); the knee is the smallest r_i
  with Δ_j < threshold for every j ≥ i (the rank beyond which doubling buys less than the
  threshold). If even the last pair improves by more, there is no knee within the ranks (None).
  Its interval: the 2.5 % and 97.5 % quantiles of the knee over bootstrap resamples of the
  replicates (the mean curve of S replicates drawn with replacement).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
from scipy import stats


def mean_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """(mean, half-width of the Student-t interval) of the replicates' values."""
    v = np.asarray(values, dtype=np.float64)
    if v.size < 2:
        return float(v.mean()) if v.size else math.nan, math.nan
    half = stats.t.ppf(0.5 + level / 2, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size)
    return float(v.mean()), float(half)


def knee_index(ranks: Sequence[int], losses: Sequence[float], threshold: float) -> Optional[int]:
    """Index of the knee of one loss curve (see the module docstring), or None."""
    r = np.asarray(ranks, dtype=np.float64)
    loss = np.asarray(losses, dtype=np.float64)
    if r.size < 2:
        return None
    gain = (loss[:-1] - loss[1:]) / np.log2(r[1:] / r[:-1])
    small = gain < threshold
    if not small[-1]:
        return None
    i = len(small)
    while i > 0 and small[i - 1]:
        i -= 1
    return i


def knee(ranks: Sequence[int], losses: np.ndarray, threshold: float, *, boots: int = 1000,
         seed: int = 0) -> dict:
    """Knee of the mean curve of ``losses`` (S replicates × R ranks) with its bootstrap interval.

    Returns {"rank": r or None, "low": r, "high": r (None when S < 2 or no resample has a knee),
    "threshold": nats per doubling, "no_knee_share": share of resamples without a knee}.
    """
    losses = np.atleast_2d(np.asarray(losses, dtype=np.float64))
    ranks = list(ranks)
    i = knee_index(ranks, losses.mean(0), threshold)
    out = {"rank": None if i is None else ranks[i], "low": None, "high": None, "threshold": float(threshold),
           "no_knee_share": None}
    s = losses.shape[0]
    if s < 2:
        return out
    rng = np.random.default_rng(seed)
    idx = [knee_index(ranks, losses[rng.integers(0, s, s)].mean(0), threshold) for _ in range(boots)]
    found = np.array([j for j in idx if j is not None])
    out["no_knee_share"] = 1.0 - found.size / boots
    if found.size:
        lo, hi = np.quantile(found, [0.025, 0.975], method="nearest")
        out["low"], out["high"] = ranks[int(lo)], ranks[int(hi)]
    return out
