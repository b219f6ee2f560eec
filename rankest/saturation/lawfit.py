"""The scaling law L(N) = E + A·N^(−α): weighted least squares and bootstrap intervals.

For a fixed exponent α the law is linear in (E, A), so the weighted least-squares problem

    min_{E, A, α} Σ_i w_i (y_i − E − A·N_i^(−α))²,   w_i = 1/s_i² (s_i the metric's standard
                                                      error; w_i = 1 when none is given)

is solved by variable projection: the 2×2 normal equations give (E, A) and the residual sum of
squares RSS(α) in closed form, α is located on a grid over ``alpha_range`` (global: no starting
point, no local minimum) and refined by golden-section search between the grid neighbours of
the best point. N is scaled by its geometric mean N_0 inside the fit (so N^(−α) is O(1)); A is
reported in the units of N (A = A_0·N_0^α) beside A_0.

**Intervals** are percentile bootstrap intervals at ``confidence`` (default 0.9) over
``n_boot`` refits of resampled data: *parametric* when standard errors are given (y* = ŷ +
s·z, z ~ N(0, 1): the errors the file states), *residual* otherwise (y* = ŷ + r*, r* drawn with
replacement from the residuals inflated by √(n/(n − 3))). Every refit runs on the same grid and
refinement, vectorised over the resamples. The bootstrap also gives intervals of the law's
prediction at any N (the models' own distances from it). With n = 3 models the fit is exact and
only the stated errors spread it; fewer than 3 models are refused.

References: Golub & Pereyra (1973), variable projection; Efron & Tibshirani (1993), ch. 6 and
13 (parametric / residual bootstrap, percentile intervals); Kaplan et al. (2020) and Hoffmann
et al. (2022) for the form E + A·N^(−α).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from rankest.errors import UserError

__all__ = ["PowerLawFit", "fit_power_law", "law"]

_GRID = 400
_GOLDEN_STEPS = 48


def law(n, e: float, a: float, alpha: float) -> np.ndarray:
    """E + A·N^(−α), elementwise over ``n``."""
    return e + a * np.asarray(n, dtype=np.float64) ** (-alpha)


def _solve(f: np.ndarray, y: np.ndarray, w: np.ndarray):
    """Closed-form WLS of y ≈ E + A·f along the last axis: (E, A, RSS), broadcast over the rest."""
    s0, s1, s2 = w.sum(-1), (w * f).sum(-1), (w * f * f).sum(-1)
    t0, t1 = (w * y).sum(-1), (w * f * y).sum(-1)
    det = s0 * s2 - s1 * s1
    det = np.where(np.abs(det) > 1e-300, det, np.nan)
    e = (s2 * t0 - s1 * t1) / det
    a = (s0 * t1 - s1 * t0) / det
    r = y - e[..., None] - a[..., None] * f
    return e, a, np.where(np.isfinite(det), (w * r * r).sum(-1), np.inf)


def _fit_batch(x: np.ndarray, ys: np.ndarray, w: np.ndarray, lo: float, hi: float):
    """(E_0, A_0, α) for each row of ``ys`` (B, n) at scaled sizes ``x`` (n,): grid, then golden."""
    grid = np.linspace(lo, hi, _GRID)
    f = x[None, None, :] ** (-grid[:, None, None])  # (G, 1, n)
    _, _, rss = _solve(f, ys[None, :, :], w)  # (G, B)
    best = np.argmin(rss, axis=0)
    a_lo, a_hi = grid[np.maximum(best - 1, 0)], grid[np.minimum(best + 1, _GRID - 1)]
    ratio = (np.sqrt(5.0) - 1) / 2

    def rss_at(alpha):
        return _solve(x[None, :] ** (-alpha[:, None]), ys, w)[2]

    c, d = a_hi - ratio * (a_hi - a_lo), a_lo + ratio * (a_hi - a_lo)
    fc, fd = rss_at(c), rss_at(d)
    for _ in range(_GOLDEN_STEPS):
        left = fc < fd  # the minimum lies in [a_lo, d]
        a_hi = np.where(left, d, a_hi)
        a_lo = np.where(left, a_lo, c)
        c_new, d_new = a_hi - ratio * (a_hi - a_lo), a_lo + ratio * (a_hi - a_lo)
        c, d = np.where(left, c_new, d), np.where(left, c, d_new)
        fc_new = rss_at(c)
        fd_new = rss_at(d)
        fc, fd = fc_new, fd_new
    alpha = (a_lo + a_hi) / 2
    e, a, rss = _solve(x[None, :] ** (-alpha[:, None]), ys, w)
    return e, a, alpha, rss


@dataclass
class PowerLawFit:
    """A fitted law and its bootstrap: point estimates, intervals, resampled parameters."""

    e: float
    a: float  # in the units of N
    alpha: float
    a0: float  # A at the reference size: L = E + A_0·(N/N_0)^(−α)
    n_ref: float  # N_0, the geometric mean of the fitted sizes
    rss: float
    n_points: int
    weighted: bool
    bootstrap: str  # "parametric" | "residual"
    confidence: float
    intervals: dict[str, tuple[float, float]]
    alpha_at_bound: bool
    samples: np.ndarray = field(repr=False)  # (B, 3): E, A_0, α of each resample
    alpha_range: tuple[float, float] = (0.0, 0.0)

    def predict(self, n) -> np.ndarray:
        """The law at sizes ``n``."""
        return law(np.asarray(n, dtype=np.float64) / self.n_ref, self.e, self.a0, self.alpha)

    def predict_interval(self, n) -> tuple[np.ndarray, np.ndarray]:
        """Percentile bootstrap interval (lower, upper) of the law's prediction at ``n``."""
        x = np.atleast_1d(np.asarray(n, dtype=np.float64)) / self.n_ref
        s = self.samples
        pred = s[:, :1] + s[:, 1:2] * x[None, :] ** (-s[:, 2:3])
        q = (1 - self.confidence) / 2
        return np.nanquantile(pred, q, axis=0), np.nanquantile(pred, 1 - q, axis=0)

    @classmethod
    def from_summary(cls, summary: dict, samples: np.ndarray) -> "PowerLawFit":
        """The fit again from its :meth:`summary` and its bootstrap ``samples`` (B, 3)."""
        return cls(e=summary["E"], a=summary["A"], alpha=summary["alpha"], a0=summary["A_ref"],
                   n_ref=summary["n_ref"], rss=summary["rss"], n_points=summary["n_points"],
                   weighted=summary["weighted"], bootstrap=summary["bootstrap"], confidence=summary["confidence"],
                   intervals={k: tuple(v) for k, v in summary["intervals"].items()},
                   alpha_at_bound=summary["alpha_at_bound"], samples=np.asarray(samples, dtype=np.float64),
                   alpha_range=tuple(summary["alpha_range"]))

    def summary(self) -> dict:
        """The JSON record of the fit (``fit`` in saturation.json)."""
        return {"E": self.e, "A": self.a, "alpha": self.alpha, "A_ref": self.a0, "n_ref": self.n_ref,
                "intervals": {k: list(v) for k, v in self.intervals.items()}, "confidence": self.confidence,
                "bootstrap": self.bootstrap, "n_boot": int(self.samples.shape[0]), "weighted": self.weighted,
                "n_points": self.n_points, "rss": self.rss, "alpha_at_bound": self.alpha_at_bound,
                "alpha_range": list(self.alpha_range)}


def fit_power_law(n: Sequence[float], y: Sequence[float], se: Optional[Sequence[float]] = None, *,
                  n_boot: int = 1000, confidence: float = 0.9, seed: int = 0,
                  alpha_range: tuple[float, float] = (0.005, 2.0)) -> PowerLawFit:
    """Fit L(N) = E + A·N^(−α) by weighted least squares, with bootstrap intervals.

    Parameters
    ----------
    n : (m,) sizes (parameter counts), m ≥ 3, all positive and not all equal
    y : (m,) metric values
    se : (m,) standard errors of ``y``, optional: weights 1/se² and a parametric bootstrap
    n_boot : resamples (≥ 50)
    confidence : level of the percentile intervals, in (0, 1)
    seed : seed of the resampling
    alpha_range : (low, high) searched for α

    Returns
    -------
    PowerLawFit
    """
    n = np.asarray(n, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if n.ndim != 1 or n.shape != y.shape:
        raise ValueError("n and y must be 1-D arrays of the same length")
    if n.size < 3:
        raise UserError(f"the scaling law has 3 parameters but only {n.size} model(s) to fit it on; fit it on at "
                        "least 3 models (--fit-on)")
    if np.any(n <= 0) or not np.all(np.isfinite(n)) or not np.all(np.isfinite(y)):
        raise UserError("the law's sizes must be positive and its values finite; check the parameter counts and "
                        "the metric")
    if np.unique(n).size < 3:
        raise UserError("the law needs models of at least 3 different sizes; add models to --fit-on")
    if not 0 < confidence < 1 or n_boot < 50:
        raise UserError("--confidence must lie in (0, 1) and --bootstrap be at least 50")
    weighted = se is not None
    s = np.asarray(se, dtype=np.float64) if weighted else np.ones_like(y)
    if weighted and (np.any(~np.isfinite(s)) or np.any(s <= 0)):
        raise UserError("standard errors must be positive and finite to weight the fit; drop them (unweighted "
                        "fit) or fix the evaluation files")
    w = 1.0 / s ** 2
    n_ref = float(np.exp(np.mean(np.log(n))))
    x = n / n_ref
    lo, hi = float(alpha_range[0]), float(alpha_range[1])
    e, a0, alpha, rss = (v[0] for v in _fit_batch(x, y[None, :], w, lo, hi))
    fitted = law(x, e, a0, alpha)
    rng = np.random.default_rng(seed)
    if weighted:
        ys = fitted[None, :] + s[None, :] * rng.standard_normal((n_boot, n.size))
        kind = "parametric"
    else:
        r = (y - fitted) * np.sqrt(n.size / max(n.size - 3, 1))
        ys = fitted[None, :] + r[rng.integers(0, n.size, (n_boot, n.size))]
        kind = "residual"
    be, ba0, balpha, _ = _fit_batch(x, ys, w, lo, hi)
    ba = ba0 * n_ref ** balpha
    q = (1 - confidence) / 2
    intervals = {k: (float(np.nanquantile(v, q)), float(np.nanquantile(v, 1 - q)))
                 for k, v in (("E", be), ("A", ba), ("alpha", balpha))}
    step = (hi - lo) / (_GRID - 1)
    return PowerLawFit(e=float(e), a=float(a0 * n_ref ** alpha), alpha=float(alpha), a0=float(a0), n_ref=n_ref,
                       rss=float(rss), n_points=int(n.size), weighted=weighted, bootstrap=kind, confidence=confidence,
                       intervals=intervals, alpha_at_bound=bool(alpha <= lo + step or alpha >= hi - step),
                       samples=np.stack([be, ba0, balpha], axis=1), alpha_range=(lo, hi))
