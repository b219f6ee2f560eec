"""Best checkpoint, saturation onset and the noise they are judged against.

For one model's curve y(t) over its checkpoints t_1 < … < t_m, written so that *lower is
better* (a higher-is-better metric is negated first):

* **best** = min_t y(t), at ``best_step`` (the earliest step on a tie);
* **noise** of a comparison with the best: k·√(s_best² + s_t²), with s the stated standard
  errors, or, when the files state none, s = σ̂ for every point, σ̂ = 1.4826·MAD(Δ)/√2 over the
  differences Δ of consecutive checkpoints of the last half of training (the MAD about the
  median difference ignores a steady trend; /√2 because a difference carries two errors);
  k = ``--onset-sigma`` (default 2);
* **onset** = the first checkpoint t after the best such that every checkpoint from t to the
  last is worse than the best by more than the noise, with at least ``--onset-points``
  (default 2) such checkpoints; None when there is none;
* **saturated** = an onset exists.

So a curve still improving at the end, or one that wobbles back within the noise of its best,
is not saturated; one whose last points all stay above the best by more than the noise is, and
its onset is where that last stretch began.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

__all__ = ["Onset", "detect_onset", "curve_noise"]


@dataclass
class Onset:
    """What :func:`detect_onset` finds on one curve (values in the metric's own sign)."""

    best: float
    best_step: int
    final: float
    final_step: int
    onset_step: Optional[int]
    saturated: bool
    noise: float  # the s of the comparison at the last checkpoint (already × k)
    noise_source: str  # "stderr" | "curve"


def curve_noise(values: np.ndarray) -> float:
    """σ̂ of single points from the curve's own last half (module docstring); 0 when too short."""
    tail = values[len(values) // 2:]
    if tail.size < 3:
        return 0.0
    d = np.diff(tail)
    return float(1.4826 * np.median(np.abs(d - np.median(d))) / np.sqrt(2))


def detect_onset(steps: Sequence[int], values: Sequence[float], stderr: Optional[Sequence[float]] = None, *,
                 lower_is_better: bool = True, sigma: float = 2.0, min_points: int = 2) -> Onset:
    """Best value, its step, the saturation onset and the flag of one curve (module docstring).

    Parameters
    ----------
    steps : (m,) training steps (any order; sorted here)
    values : (m,) metric values
    stderr : (m,) standard errors, optional (None entries allowed: then the curve's own σ̂)
    lower_is_better : direction of the metric
    sigma : k, the multiple of the noise a point must exceed
    min_points : checkpoints the worse stretch must hold at least
    """
    t = np.asarray(steps, dtype=np.int64)
    order = np.argsort(t, kind="stable")
    t = t[order]
    v = np.asarray(values, dtype=np.float64)[order]
    y = v if lower_is_better else -v
    have_se = stderr is not None and all(s is not None and np.isfinite(s) for s in stderr)
    if have_se:
        s = np.asarray(stderr, dtype=np.float64)[order]
        source = "stderr"
    else:
        s = np.full(y.shape, curve_noise(y))
        source = "curve"
    b = int(np.argmin(y))
    noise = sigma * np.sqrt(s[b] ** 2 + s ** 2)
    worse = y - y[b] > noise
    onset = None
    # Walk back from the end while the points stay worse: the last stretch of worse points.
    i = len(y)
    while i - 1 > b and worse[i - 1]:
        i -= 1
    if len(y) - i >= max(int(min_points), 1):
        onset = int(t[i])
    return Onset(best=float(v[b]), best_step=int(t[b]), final=float(v[-1]), final_step=int(t[-1]),
                 onset_step=onset, saturated=onset is not None, noise=float(noise[-1]), noise_source=source)
