"""`Spectrum`: a target matrix's singular values and every metric derived from them.

One reference implementation of each metric (docs/design.md, "Metrics") lives here; every route
(`factor`, `gram`, `sketch`) produces a `Spectrum` and every report reads one.

Notation: T is the N×V' target matrix (rows = contexts, columns = real vocabulary),
σ_1 ≥ σ_2 ≥ … its singular values, E = ‖T‖_F² streamed from the actual rows.

References
----------
Eckart & Young (1936): the best rank-d approximation error is sqrt(Σ_{i>d} σ_i²).
Godey, de la Clergerie & Sagot (2024), arXiv 2404.07647, §5: W-error(d).
Carlini et al. (2024), "Stealing part of a production language model", §4.2: numerical rank
as the largest gap σ_i/σ_{i+1}.
Roy & Vetterli (2007), "The effective rank": exp of the entropy of σ/Σσ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from rankest.io.files import jsonable
from rankest.io.spectrum_file import read_spectrum_h5, write_spectrum_h5

#: The errors at which ``rank_at`` is always reported.
REPORTED_EPS = (0.5, 0.1, 0.01)

#: Singular values below this fraction of σ_1 are never taken as a rank cliff (Carlini et al.).
CLIFF_FLOOR = 1e-6

#: Unit round-off of the arithmetic the rows were accumulated in (LAPACK-style threshold rank).
EPS_BY_PRECISION = {"fp64": float(np.finfo(np.float64).eps), "fp32": float(np.finfo(np.float32).eps),
                    "bf16": 2.0 ** -8, "fp16": 2.0 ** -11}


@dataclass
class Spectrum:
    """Singular spectrum of a target matrix, with provenance.

    Parameters
    ----------
    sigma : (k,) float64
        Singular values, descending, non-negative. k = min(N, V') for exact routes, fewer for
        a sketch.
    energy : float
        ‖T‖_F² accumulated in fp64 from the actual rows (NaN when unknown).
    n_rows, n_cols : int
        N contexts and V' vocabulary columns of T.
    space : str
        ``clr``, ``prob`` or ``logprob``.
    route : str
        ``factor``, ``gram`` or ``sketch``.
    exact : bool
        True when ``sigma`` is the full spectrum of the accumulated matrix (the tails of the
        W-error are suffix sums of σ²). False for a sketch: tails are E − Σ_{i≤d} σ_i²,
        an upper bound on the true tail.
    precision : str
        Arithmetic of the accumulation (``fp64`` or ``fp32``); sets the threshold rank's eps.
    meta : dict
        Teacher, corpus, route reason, statistics (``nll``, ``perplexity``) and provenance.
    convergence : dict
        ``{n_rows: {metric: value}}`` for growing prefixes of the rows.
    """

    sigma: np.ndarray
    energy: float
    n_rows: int
    n_cols: int
    space: str
    route: str
    exact: bool = True
    precision: str = "fp64"
    meta: dict = field(default_factory=dict)
    convergence: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        s = np.asarray(self.sigma, dtype=np.float64).ravel()
        if s.size and (not np.all(np.isfinite(s)) or s.min() < 0):
            raise ValueError("singular values must be finite and non-negative")
        # Descending order is part of the contract; sort defensively (eigensolvers return ascending).
        self.sigma = np.sort(s)[::-1].copy()
        self.energy = float(self.energy)

    # ---- energies -------------------------------------------------------------------------
    @property
    def captured_energy(self) -> float:
        """Σσ², summed from the smallest value up (fp64) so small terms are not absorbed."""
        return float(np.sum(self.sigma[::-1] ** 2))

    @property
    def total_energy(self) -> float:
        """The W-error's denominator: Σσ² for exact routes, the streamed E for a sketch."""
        return self.captured_energy if self.exact else self.energy

    @property
    def off_model_energy(self) -> float:
        """1 − Σσ²/E: the share of the rows' energy the spectrum does not explain.

        ≈ 0 for exact routes up to round-off (a `factor` route's model of the rows misses the
        bf16 noise of the real logits); for a sketch, the energy beyond its k values.
        """
        if not self.energy > 0:
            return float("nan")
        return 1.0 - self.captured_energy / self.energy

    def tail_energy(self) -> np.ndarray:
        """tail[d] = energy beyond the first d singular values, for d = 0 … k (fp64).

        Exact routes: suffix sums of σ² (accumulated from the smallest up, so every tail is
        correct to relative round-off, not to round-off of the total). Sketch: E − prefix sums,
        clipped at 0 — an upper bound on the true tail.
        """
        s2 = self.sigma ** 2
        if self.exact:
            suffix = np.cumsum(s2[::-1])[::-1]
            return np.concatenate([suffix, [0.0]])
        prefix = np.concatenate([[0.0], np.cumsum(s2)])
        return np.maximum(self.energy - prefix, 0.0)

    # ---- metrics ---------------------------------------------------------------------------
    def w_error(self, d: Optional[int] = None):
        """W-error(d) = sqrt(Σ_{i>d} σ_i² / Σ_i σ_i²) (Godey et al. 2024, §5).

        Returns the array for d = 1 … k when ``d`` is None, else the value at ``d``
        (d = 0 gives 1; d ≥ k gives 0 for exact routes).
        """
        tail = self.tail_energy()
        total = self.total_energy
        curve = np.sqrt(tail / total) if total > 0 else np.zeros_like(tail)
        if d is None:
            return curve[1:]
        if d < 0:
            raise ValueError(f"d must be >= 0, got {d}")
        return float(curve[min(d, len(curve) - 1)])

    def rank_at(self, eps: float) -> Optional[int]:
        """Least d with W-error(d) ≤ eps; None when even d = k does not reach it (sketch)."""
        if not 0 <= eps <= 1:
            raise ValueError(f"eps must be in [0, 1], got {eps}")
        curve = np.concatenate([[1.0], self.w_error()])
        hits = np.nonzero(curve <= eps)[0]
        return int(hits[0]) if hits.size else None

    @property
    def numerical_rank(self) -> int:
        """The i maximising σ_i/σ_{i+1} over σ_i ≥ 1e-6·σ_1 (Carlini et al. 2024).

        An exact zero σ_{i+1} counts as infinitely far below (ratio inf). For an exact route
        every singular value not stored is exactly 0, so the last stored value is followed by
        0; a sketch's last value has an unknown successor and is not a candidate.
        """
        s = self.sigma
        if s.size == 0 or s[0] == 0:
            return 0
        nxt = np.concatenate([s[1:], [0.0] if self.exact else [np.nan]])
        cand = np.nonzero(s >= CLIFF_FLOOR * s[0])[0]
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(nxt[cand] == 0, np.inf, s[cand] / nxt[cand])
        ratio = np.where(np.isnan(ratio), -np.inf, ratio)
        return int(cand[int(np.argmax(ratio))] + 1)

    @property
    def threshold_rank(self) -> int:
        """LAPACK-style rank: #{σ_i > σ_1 · max(N, V') · eps(precision)} (numpy.linalg.matrix_rank)."""
        s = self.sigma
        if s.size == 0:
            return 0
        tol = s[0] * max(self.n_rows, self.n_cols) * EPS_BY_PRECISION.get(self.precision, EPS_BY_PRECISION["fp64"])
        return int(np.sum(s > tol))

    @property
    def effective_rank(self) -> float:
        """exp(−Σ p_i log p_i) with p = σ/Σσ (Roy & Vetterli 2007)."""
        s = self.sigma[self.sigma > 0]
        if s.size == 0:
            return 0.0
        p = s / s.sum()
        return float(math.exp(-np.sum(p * np.log(p))))

    @property
    def stable_rank(self) -> float:
        """‖T‖_F² / σ_1² (uses Σσ² for exact routes, the streamed E for a sketch)."""
        if self.sigma.size == 0 or self.sigma[0] == 0:
            return 0.0
        return self.total_energy / float(self.sigma[0] ** 2)

    def metrics(self) -> dict[str, Any]:
        """The scalar metrics, under their result names (docs/design.md, "Result names") (convergence curves use these)."""
        return {
            "rank_at": {str(e): self.rank_at(e) for e in REPORTED_EPS},
            "numerical_rank": self.numerical_rank,
            "threshold_rank": self.threshold_rank,
            "effective_rank": self.effective_rank,
            "stable_rank": self.stable_rank,
            "off_model_energy": self.off_model_energy,
            "sigma_1": float(self.sigma[0]) if self.sigma.size else 0.0,
        }

    def summary(self) -> dict[str, Any]:
        """Everything a script reads (results.json): metrics, sizes, meta, convergence."""
        out = {
            "space": self.space, "route": self.route, "exact": self.exact, "precision": self.precision,
            "n_rows": self.n_rows, "n_cols": self.n_cols, "energy": self.energy,
            **self.metrics(),
            "convergence": {str(k): v for k, v in sorted(self.convergence.items())},
        }
        out.update(self.meta)
        return jsonable(out)

    # ---- persistence ------------------------------------------------------------------------
    def save(self, path, *, group: str = "/", config: dict | None = None, prov: dict | None = None) -> None:
        """Write to an HDF5 file (datasets ``sigma``, ``w_error``; everything else as JSON attrs;
        ``config`` and ``prov`` of the run beside them)."""
        write_spectrum_h5(self, path, group=group, config=config, prov=prov)

    @classmethod
    def load(cls, path, *, group: str = "/") -> "Spectrum":
        """Read a spectrum written by :meth:`save` (or a run folder's ``results.h5``)."""
        return read_spectrum_h5(path, build=cls, group=group)




