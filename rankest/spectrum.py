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

#: A truncated spectrum's numerical rank is a number only for a cliff at least this steep against
#: all the energy beyond it: σ_r ≥ CERTIFIED_GAP·sqrt(Σ_{i>r} σ_i²) (two orders of magnitude).
CERTIFIED_GAP = 100.0

#: The reason of a rank_at the kept values do not reach (reports print its bound as "> L − 1").
NOT_REACHED = "not reached by the"

#: Convergence verdict: converged when rank_at(0.1) moved by less than this fraction between the
#: last two snapshots (N/2 → N, the last doubling of N).
CONVERGED_CHANGE = 0.01

#: Unit round-off of the arithmetic the rows were accumulated in (LAPACK-style threshold rank).
EPS_BY_PRECISION = {"fp64": float(np.finfo(np.float64).eps), "fp32": float(np.finfo(np.float32).eps),
                    "bf16": 2.0 ** -8, "fp16": 2.0 ** -11}


@dataclass(frozen=True)
class Bound:
    """What a spectrum says about a metric it does not determine: bounds, or nothing and why.

    ``lower`` ≤ value ≤ ``upper`` (inclusive; either may be None), ``reason`` a short phrase.
    Its JSON form (results.json, convergence entries) is ``{"lower": a, "upper": b, "reason":
    "…"}`` with the unknown sides left out; an exact metric is a plain number instead.
    """

    lower: Optional[float] = None
    upper: Optional[float] = None
    reason: str = ""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.lower is not None:
            out["lower"] = self.lower
        if self.upper is not None:
            out["upper"] = self.upper
        out["reason"] = self.reason
        return out


def metric_value(x) -> Optional[float]:
    """A metric's value when it is exact (a number), None for a bound or a missing value."""
    if isinstance(x, bool) or x is None or isinstance(x, (dict, Bound)):
        return None
    return x


def metric_bound(x) -> Optional[Bound]:
    """A metric's :class:`Bound` (from its JSON form too), None for an exact or missing value."""
    if isinstance(x, Bound):
        return x
    if isinstance(x, dict):
        return Bound(x.get("lower"), x.get("upper"), str(x.get("reason", "")))
    return None


@dataclass
class Spectrum:
    """Singular spectrum of a target matrix, with provenance.

    Parameters
    ----------
    sigma : (k,) float64
        Singular values, descending, non-negative. k = min(N, V') for exact routes (the values
        not stored are exactly 0), fewer for a sketch.
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
        Arithmetic of the products (``fp64``, ``fp32`` or ``bf16``).
    row_precision : str or None
        Precision the rows (a linear head's features for the factor route) had when they reached
        the route; None: as ``precision``. The threshold rank's eps is the coarser of the two.
    noise_floor : float
        σ at or below which the route's own arithmetic cannot tell a value from round-off (a
        Gram's ≈ sqrt(n·u·λ_max), :func:`rankest.accumulate.base.gram_noise_floor`); 0: none.
    meta : dict
        Teacher, corpus, route reason, statistics (``nll``, ``perplexity``) and provenance.
    convergence : dict
        ``{n_rows: {metric: value}}`` for growing prefixes of the rows.

    Metrics that depend on values a truncated spectrum (:attr:`truncated`) did not keep come as
    a :class:`Bound` from :meth:`metric`. The accessors ``rank_at(eps)``, ``numerical_rank``,
    ``threshold_rank`` and ``effective_rank`` follow one convention: the value when the
    spectrum determines it, None when it only bounds it.
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
    row_precision: Optional[str] = None
    noise_floor: float = 0.0

    def __post_init__(self) -> None:
        s = np.asarray(self.sigma, dtype=np.float64).ravel()
        if s.size and (not np.all(np.isfinite(s)) or s.min() < 0):
            raise ValueError("singular values must be finite and non-negative")
        # Descending order is part of the contract; sort defensively (eigensolvers return ascending).
        self.sigma = np.sort(s)[::-1].copy()
        self.energy = float(self.energy)
        self.noise_floor = float(self.noise_floor or 0.0)

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

    # ---- truncation --------------------------------------------------------------------------
    @property
    def truncated(self) -> bool:
        """True when values of T were not kept: a sketch of k < min(N, V') values.

        Metrics that depend on the unseen tail are then bounds (:meth:`metric`); the kept values
        are taken as they are (a sketch's own error estimates are in ``meta["sketch_error"]``).
        """
        return not self.exact and self.sigma.size < min(self.n_rows, self.n_cols)

    @property
    def n_unseen(self) -> int:
        """m = min(N, V') − k: how many values a truncated spectrum did not keep."""
        return max(min(self.n_rows, self.n_cols) - self.sigma.size, 0) if not self.exact else 0

    @property
    def unseen_energy(self) -> float:
        """R = E − Σσ², the energy of the values not kept (0 for an exact route)."""
        return float(self.tail_energy()[-1]) if not self.exact else 0.0

    def unseen_roundoff(self) -> float:
        """Round-off of R: (k + 1)·eps·E from the fp64 subtraction, plus the energy a sketch's
        products may have moved (``sketch_error.roundoff_energy``)."""
        moved = float(self.meta.get("sketch_error", {}).get("roundoff_energy") or 0.0)
        return (self.sigma.size + 1) * EPS_BY_PRECISION["fp64"] * max(self.energy, 0.0) + moved

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

    def metric(self, name: str, eps: Optional[float] = None):
        """A tail-dependent metric: its value, or a :class:`Bound` when the kept values only bound it.

        ``name``: ``rank_at`` (with ``eps``), ``numerical_rank``, ``threshold_rank`` or
        ``effective_rank`` (docs/design.md, "Metrics").
        """
        if name == "rank_at":
            return self._rank_at(eps)
        return {"numerical_rank": self._numerical_rank, "threshold_rank": self._threshold_rank,
                "effective_rank": self._effective_rank}[name]()

    def rank_at(self, eps: float) -> Optional[int]:
        """Least d with W-error(d) ≤ eps; None when the kept values do not reach it (then
        ``metric("rank_at", eps)`` gives its bounds)."""
        return metric_value(self._rank_at(eps))

    @property
    def numerical_rank(self) -> Optional[int]:
        """The i maximising σ_i/σ_{i+1} over σ_i ≥ 1e-6·σ_1 (Carlini et al. 2024); None when a
        truncated spectrum shows no certified cliff (``metric("numerical_rank")`` says why)."""
        return metric_value(self._numerical_rank())

    @property
    def threshold_rank(self) -> Optional[int]:
        """#{σ_i > τ} (numpy.linalg.matrix_rank's rule, :meth:`threshold`); None when only bounded."""
        return metric_value(self._threshold_rank())

    @property
    def effective_rank(self) -> Optional[float]:
        """exp(−Σ p_i log p_i) with p = σ/Σσ (Roy & Vetterli 2007); None for a truncated spectrum
        (``metric("effective_rank")`` gives the bounds the unseen energy allows)."""
        return metric_value(self._effective_rank())

    def _rank_at(self, eps: float):
        if eps is None or not 0 <= eps <= 1:
            raise ValueError(f"eps must be in [0, 1], got {eps}")
        curve = np.concatenate([[1.0], self.w_error()])
        hits = np.nonzero(curve <= eps)[0]
        if hits.size:
            return int(hits[0])
        if self.exact:  # unreachable: W-error(k) = 0 for an exact route
            return int(self.sigma.size)
        # Not reached by the k kept values. Lower: the sketch's lower W-error curve where known
        # (else k + 1). Upper: the best n of the m unseen values hold at least n/m of their energy
        # R, so W-error(k + n)² ≤ R·(1 − n/m)/E ≤ eps² once n ≥ m·(1 − eps²·E/R).
        k, m, r, e = self.sigma.size, self.n_unseen, self.unseen_energy, self.total_energy
        w_low = np.asarray(self.meta.get("sketch_error", {}).get("w_error_lower") or [], dtype=float)
        low_hits = np.nonzero(w_low[:k] <= eps)[0]
        lower = int(low_hits[0]) + 1 if low_hits.size else k + 1
        cap = min(self.n_rows, self.n_cols)
        upper = cap if not (r > 0 and e > 0) else min(cap, k + int(math.ceil(m * max(1.0 - eps * eps * e / r, 0.0))))
        upper = max(upper, min(lower, cap))
        return Bound(min(lower, upper), upper, f"{NOT_REACHED} {k:,} kept values")

    def _numerical_rank(self):
        s = self.sigma
        if s.size == 0 or s[0] == 0:
            return 0
        if self.truncated:
            return self._certified_cliff()
        nxt = np.concatenate([s[1:], [0.0] if self.exact else [np.nan]])
        cand = np.nonzero(s >= CLIFF_FLOOR * s[0])[0]
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(nxt[cand] == 0, np.inf, s[cand] / nxt[cand])
        ratio = np.where(np.isnan(ratio), -np.inf, ratio)
        return int(cand[int(np.argmax(ratio))] + 1)

    def _certified_cliff(self):
        """Numerical rank of a truncated spectrum: r, the largest ratio among the kept values (the
        last one against the unseen energy: σ_(k+1) ≤ sqrt(R)), only when the cliff is certified —
        σ_r ≥ CERTIFIED_GAP·sqrt(energy beyond r), so that nothing beyond r, kept or not, can
        undo it (a `prob` matrix's σ_1/σ_2 is followed by a long tail and is not a cliff)."""
        s, k = self.sigma, self.sigma.size
        tail = self.tail_energy()  # tail[i] ≥ Σ_{j>i} σ_j² (a sketch's tails are upper bounds)
        nxt = np.concatenate([s[1:], [math.sqrt(tail[k])]])
        cand = np.nonzero(s >= CLIFF_FLOOR * s[0])[0]
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(nxt[cand] == 0, np.inf, s[cand] / nxt[cand])
        best = int(np.argmax(ratio))
        i = int(cand[best]) + 1
        if s[i - 1] >= CERTIFIED_GAP * math.sqrt(tail[i]):
            return i
        return Bound(reason=f"no gap of {CERTIFIED_GAP:g}× among the top {k:,} values")

    def threshold(self) -> float:
        """τ of the threshold rank: max(σ_1·max(N, V')·u, noise floor), u the coarser unit round-off
        of the rows and of the products (the LAPACK / numpy.linalg.matrix_rank rule, with the eps
        of the precision the rows actually had)."""
        if self.sigma.size == 0:
            return 0.0
        return max(float(self.sigma[0]) * max(self.n_rows, self.n_cols) * self._unit_roundoff(), self.noise_floor)

    def _unit_roundoff(self) -> float:
        fp64 = EPS_BY_PRECISION["fp64"]
        return max(EPS_BY_PRECISION.get(self.precision, fp64),
                   EPS_BY_PRECISION.get(self.row_precision or self.precision, fp64))

    def _threshold_rank(self):
        s = self.sigma
        if s.size == 0 or s[0] == 0:
            return 0
        big = max(self.n_rows, self.n_cols) * self._unit_roundoff()
        if big >= 1:
            return Bound(reason=f"{self.row_precision or self.precision} rows: max(N, V')·eps = {big:.3g} ≥ 1 "
                                "resolves no value")
        tau = self.threshold()
        # Never more than the rank T can have: min(N, V') and what the route holds (d + 1 for factor).
        cap = min(self.n_rows, self.n_cols, s.size)
        count = int(np.sum(s[:cap] > tau))
        if not self.truncated or count < s.size:
            return count  # the unseen values are ≤ σ_k ≤ τ
        # All k kept values are above τ: the unseen energy R holds at most R/τ² more (R less its own
        # round-off: E − Σσ² in fp64, and the products' round-off a sketch records).
        resolved = max(self.unseen_energy - self.unseen_roundoff(), 0.0)
        extra = self.n_unseen if tau == 0 else min(self.n_unseen, int(resolved / (tau * tau)))
        upper = min(self.n_rows, self.n_cols, count + extra)
        return count if upper == count else Bound(count, upper, f"all {s.size:,} kept values are above the threshold")

    def _effective_rank(self):
        s = self.sigma[self.sigma > 0]
        if s.size == 0:
            return 0.0
        if not self.truncated or self.unseen_energy <= 0:
            p = s / s.sum()
            return float(math.exp(-np.sum(p * np.log(p))))
        lo, hi = effective_rank_bounds(self.sigma, self.unseen_energy, self.n_unseen)
        return Bound(lo, hi, f"{self.n_unseen:,} values not kept")

    @property
    def stable_rank(self) -> float:
        """‖T‖_F² / σ_1² (uses Σσ² for exact routes, the streamed E for a sketch)."""
        if self.sigma.size == 0 or self.sigma[0] == 0:
            return 0.0
        return self.total_energy / float(self.sigma[0] ** 2)

    def metrics(self) -> dict[str, Any]:
        """The scalar metrics, under their result names (docs/design.md, "Result names"); a
        bounded metric in its JSON form ``{"lower", "upper", "reason"}`` (convergence uses these)."""
        js = lambda x: x.to_json() if isinstance(x, Bound) else x  # noqa: E731
        return {
            "rank_at": {str(e): js(self._rank_at(e)) for e in REPORTED_EPS},
            "numerical_rank": js(self._numerical_rank()),
            "threshold_rank": js(self._threshold_rank()),
            "effective_rank": js(self._effective_rank()),
            "stable_rank": self.stable_rank,
            "off_model_energy": self.off_model_energy,
            "sigma_1": float(self.sigma[0]) if self.sigma.size else 0.0,
        }

    def summary(self) -> dict[str, Any]:
        """Everything a script reads (results.json): metrics, sizes, meta, convergence."""
        out = {
            "space": self.space, "route": self.route, "exact": self.exact, "precision": self.precision,
            "row_precision": self.row_precision or self.precision, "truncated": self.truncated,
            "n_rows": self.n_rows, "n_cols": self.n_cols, "energy": self.energy,
            **self.metrics(), "threshold": self.threshold(), "noise_floor": self.noise_floor,
            "convergence": {str(k): v for k, v in sorted(self.convergence.items())},
            "convergence_verdict": convergence_verdict(self.convergence),
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


def effective_rank_bounds(head: np.ndarray, unseen_energy: float, n_unseen: int) -> tuple[float, float]:
    """Bounds on exp(H(σ/Σσ)) when only the top k values ``head`` and the energy R and count m
    of the others are known (each unseen value at most σ_k).

    With S_h = Σ_head σ, A = Σ_head σ log σ and T = Σ_unseen t (the unseen values' sum, in
    [max(√R, R/σ_k), √(m·R)] by Cauchy–Schwarz and t ≤ σ_k), H = log S − (A + Σ t log t)/S with
    S = S_h + T. Jensen gives T·log(T/m) ≤ Σ t log t ≤ T·log(R/T), hence

        φ(T) = log S − (A + T·log(R/T))/S  ≤  H  ≤  ψ(T) = log S − (A + T·log(T/m))/S.

    dφ/dT has the sign of S_h·(2 + log(T/R)) + 2T + A (increasing: φ has one minimum) and dψ/dT
    that of A − S_h·log(T/m) (decreasing: ψ has one maximum, at T = m·e^{A/S_h}); both extremes
    are taken over the interval of T.
    """
    s = np.asarray(head, dtype=np.float64)
    s = s[s > 0]
    scale = float(s[0])
    s = s / scale
    r = float(unseen_energy) / scale ** 2
    m = int(n_unseen)
    s_h, a = float(s.sum()), float(np.sum(s * np.log(s)))

    def phi(t):
        return math.log(s_h + t) - (a + t * math.log(r / t)) / (s_h + t)

    def psi(t):
        return math.log(s_h + t) - (a + t * math.log(t / m)) / (s_h + t)

    t_hi = math.sqrt(m * r)
    t_lo = min(max(math.sqrt(r), r / float(s[-1])), t_hi)
    # φ's minimum: the root of its increasing derivative, by bisection in log T.
    lo, hi = math.log(t_lo), math.log(t_hi)
    grow = lambda lt: s_h * (2 + lt - math.log(r)) + 2 * math.exp(lt) + a  # noqa: E731
    if grow(lo) >= 0:
        t_min = t_lo
    elif grow(hi) <= 0:
        t_min = t_hi
    else:
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if grow(mid) < 0 else (lo, mid)
        t_min = math.exp(0.5 * (lo + hi))
    t_max = min(max(m * math.exp(a / s_h), t_lo), t_hi)
    lower = min(phi(t_min), phi(t_lo), phi(t_hi))
    return float(math.exp(lower)), float(math.exp(max(psi(t_max), psi(t_lo), psi(t_hi))))


def convergence_verdict(convergence: dict) -> dict[str, Any]:
    """Whether the rank had stopped moving with N: rank_at(0.1) at the last two snapshots (N/2 and
    N, the last doubling) within :data:`CONVERGED_CHANGE` of each other.

    Returns ``{"converged": True | False | None, "metric": "rank_at(0.1)", "change": float or None,
    "text": a sentence}``; None when it cannot be judged (fewer than two snapshots, or a value
    that is only a bound).
    """
    out: dict[str, Any] = {"converged": None, "metric": "rank_at(0.1)", "change": None}
    ns = sorted(int(n) for n in convergence)
    if len(ns) < 2:
        out["text"] = "not assessed: fewer than two convergence snapshots"
        return out
    prev, last = ns[-2], ns[-1]
    a = metric_value(convergence[prev].get("rank_at", {}).get("0.1"))
    b = metric_value(convergence[last].get("rank_at", {}).get("0.1"))
    if a is None or b is None:
        out["text"] = (f"not assessed: rank_at(0.1) is beyond the kept values at N = "
                       f"{prev if a is None else last:,}")
        return out
    change = abs(b - a) / max(abs(b), 1)
    out.update(converged=bool(change < CONVERGED_CHANGE), change=float(change))
    moved = f"rank_at(0.1) moved {change:.1%} from N = {prev:,} to N = {last:,} ({a} → {b})"
    out["text"] = (f"converged: {moved}, less than {CONVERGED_CHANGE:.0%}" if out["converged"]
                   else f"not converged: {moved}; sample more rows")
    return out

