"""Metrics of truncated spectra and the threshold rank, against fp64 explicit SVD oracles.

A truncated spectrum (the top k of min(N, V') values, with the streamed energy E) must report
every metric its unseen tail decides as a bound that holds, or as absent with a reason; the
threshold rank of the exact routes must equal numpy's matrix_rank of the explicit matrix in the
precision its rows had.
"""

import math

import numpy as np
import pytest
import torch

from rankest.accumulate.base import Chunk
from rankest.accumulate.factor import Factor
from rankest.accumulate.gram import Gram
from rankest.accumulate.sketch import Sketch
from rankest.ops import reference
from rankest.report.text import fmt_metric
from rankest.spectrum import CERTIFIED_GAP, Bound, Spectrum, effective_rank_bounds, metric_bound


def _matrix(rng, n, v, sigma):
    """An explicit n×v fp64 matrix with singular values ``sigma`` (zeros beyond)."""
    r = len(sigma)
    u, _ = np.linalg.qr(rng.standard_normal((n, r)))
    w, _ = np.linalg.qr(rng.standard_normal((v, r)))
    return (u * sigma) @ w.T


def _truncated(s, k, n, v, **kw):
    """The top k of an exact spectrum s of an n×v matrix, as a sketch-route Spectrum (E exact)."""
    return Spectrum(sigma=s[:k], energy=float(np.sum(s[::-1] ** 2)), n_rows=n, n_cols=v, space="prob",
                    route="sketch", exact=False, **kw)


def _erank(s):
    s = s[s > 0]
    p = s / s.sum()
    return math.exp(-np.sum(p * np.log(p)))


def _w_rank_at(s, eps):
    tail = np.concatenate([np.cumsum((s ** 2)[::-1])[::-1], [0.0]])
    return int(np.nonzero(np.sqrt(tail / tail[0]) <= eps)[0][0])


def _inside(bound_or_value, truth, rel=1e-9):
    b = metric_bound(bound_or_value)
    if b is None:
        return bound_or_value == pytest.approx(truth, rel=rel)
    lo = -np.inf if b.lower is None else b.lower * (1 - rel)
    hi = np.inf if b.upper is None else b.upper * (1 + rel)
    return lo <= truth <= hi


SPECTRA = {
    # rank below k, with a cliff: every metric is determined
    "below": lambda rng: np.concatenate([np.linspace(10, 1, 30)]),
    # rank exactly k: the cliff sits at the last kept value, seen against the unseen energy
    "at": lambda rng: np.linspace(10, 1, 64),
    # rank above k, slowly decaying (a prob matrix): the tail decides
    "above": lambda rng: np.arange(1, 201) ** -0.5,
    # rank above k with a cliff beyond k
    "cliff_beyond": lambda rng: np.concatenate([np.linspace(10, 5, 100), 1e-4 * np.ones(20)]),
}


@pytest.mark.parametrize("case", sorted(SPECTRA))
@pytest.mark.parametrize("seed", [0, 1])
def test_truncated_metrics_against_explicit_svd(case, seed):
    rng = np.random.default_rng(seed)
    n, v, k = 300, 240, 64
    a = _matrix(rng, n, v, SPECTRA[case](rng))
    s = np.linalg.svd(a, compute_uv=False)  # the oracle: fp64 explicit SVD
    spec = _truncated(s, k, n, v)
    assert spec.truncated
    m = spec.metrics()
    true_rank = int(np.linalg.matrix_rank(a))
    for eps in (0.5, 0.1, 0.01):
        got, want = m["rank_at"][str(eps)], _w_rank_at(s, eps)
        if want <= k:
            assert got == want
        else:
            assert isinstance(got, dict) and got["lower"] == k + 1 and _inside(got, want)
            assert fmt_metric(got).startswith(f"> {k}")
    # threshold rank: a number when determined, else bounds that hold
    assert _inside(m["threshold_rank"], true_rank)
    # effective rank: the bounds the unseen energy allows hold
    assert _inside(m["effective_rank"], _erank(s), rel=1e-7)
    nr = m["numerical_rank"]
    if case == "below":
        assert nr == 30 and m["threshold_rank"] == 30
    elif case == "at":
        assert nr == k and m["threshold_rank"] == k
    else:  # no cliff among the kept values: never a number
        assert isinstance(nr, dict) and "lower" not in nr and "no gap" in nr["reason"]
        assert isinstance(m["threshold_rank"], dict) and m["threshold_rank"]["lower"] == k
        assert isinstance(m["effective_rank"], dict)
        assert spec.numerical_rank is None and spec.effective_rank is None
    for value in (m["numerical_rank"], m["threshold_rank"], m["effective_rank"], *m["rank_at"].values()):
        assert "None" not in fmt_metric(value, why=True)


def test_exact_spectrum_metrics_are_numbers():
    rng = np.random.default_rng(3)
    a = _matrix(rng, 80, 50, np.linspace(5, 1, 12))
    s = np.linalg.svd(a, compute_uv=False)
    spec = Spectrum(sigma=s, energy=float(np.sum(s ** 2)), n_rows=80, n_cols=50, space="clr", route="gram")
    m = spec.metrics()
    assert not spec.truncated
    assert m["numerical_rank"] == 12 == m["threshold_rank"] == np.linalg.matrix_rank(a)
    assert m["effective_rank"] == pytest.approx(_erank(s[:12]), rel=1e-6)


def test_effective_rank_bounds_hold_for_every_admissible_tail():
    # Brute force: random heads and random tails (each value ≤ σ_k) with the same count and energy.
    rng = np.random.default_rng(11)
    for trial in range(200):
        k, m = int(rng.integers(1, 40)), int(rng.integers(1, 400))
        head = np.sort(rng.random(k) * 10 ** rng.uniform(-2, 1))[::-1] + 1e-3
        kind = trial % 4
        if kind == 0:    # spread: m equal values
            tail = np.full(m, head[-1] * rng.random())
        elif kind == 1:  # concentrated: a few values at σ_k
            tail = np.zeros(m)
            tail[: int(rng.integers(1, m + 1))] = head[-1]
        elif kind == 2:  # random
            tail = rng.random(m) * head[-1]
        else:            # one value
            tail = np.zeros(m)
            tail[0] = head[-1] * rng.random()
        lo, hi = effective_rank_bounds(head, float(np.sum(tail ** 2)), m)
        truth = _erank(np.concatenate([head, tail]))
        assert lo * (1 - 1e-9) <= truth <= hi * (1 + 1e-9), (trial, lo, truth, hi)
    # Tight: both bounds are attained, by m equal unseen values and by one value holding R.
    head, m, r = np.array([1.0]), 1000, 0.1
    lo, hi = effective_rank_bounds(head, r, m)
    assert hi == pytest.approx(_erank(np.concatenate([head, np.full(m, math.sqrt(r / m))])), rel=1e-9)
    assert lo == pytest.approx(_erank(np.array([1.0, math.sqrt(r)])), rel=1e-9)


def test_sketch_of_a_full_rank_prob_like_matrix_reports_bounds():
    rng = np.random.default_rng(5)
    n, v, k = 400, 300, 32
    a = _matrix(rng, n, v, np.arange(1, 301) ** -0.5)
    sk = Sketch(v, k, space="prob", seed=1)
    sk.update(Chunk(torch.zeros(n, 4, dtype=torch.float64), rows=torch.tensor(a)))
    spec = sk.finalize(energy=float(np.sum(a * a)))
    s = np.linalg.svd(a, compute_uv=False)
    m = spec.metrics()
    assert isinstance(m["numerical_rank"], dict) and isinstance(m["effective_rank"], dict)
    assert isinstance(m["rank_at"]["0.01"], dict) and _inside(m["rank_at"]["0.01"], _w_rank_at(s, 0.01))
    assert _inside(m["threshold_rank"], np.linalg.matrix_rank(a))
    assert metric_bound(m["rank_at"]["0.01"]).lower <= _w_rank_at(s, 0.01)


def test_sketch_of_a_low_rank_matrix_certifies_its_cliff():
    rng = np.random.default_rng(6)
    n, v, k, r = 300, 200, 40, 12
    a = _matrix(rng, n, v, np.linspace(4, 1, r))
    sk = Sketch(v, k, space="clr", seed=2)
    sk.update(Chunk(torch.zeros(n, 4, dtype=torch.float64), rows=torch.tensor(a)))
    spec = sk.finalize(energy=float(np.sum(a * a)))
    assert spec.truncated and spec.numerical_rank == r
    assert spec.threshold_rank == r == np.linalg.matrix_rank(a)


def test_a_weak_gap_is_not_certified():
    s = np.concatenate([np.ones(10), 0.5 * np.ones(10)])  # a 2× gap at 10, far below CERTIFIED_GAP
    spec = _truncated(np.concatenate([s, 0.4 * np.ones(30)]), 20, 100, 100)
    assert spec.numerical_rank is None and CERTIFIED_GAP > 2
    assert isinstance(spec.metric("numerical_rank"), Bound)
    # A prob-like σ_1/σ_2 of 1000 followed by a long tail of energy is not a cliff either.
    s = np.concatenate([[1000.0], np.ones(5000)])
    spec = _truncated(s, 20, 6000, 6000)
    assert spec.numerical_rank is None


def test_threshold_rank_never_exceeds_the_matrix():
    rng = np.random.default_rng(12)
    for _ in range(300):
        n, v = int(rng.integers(1, 300)), int(rng.integers(2, 300))
        size = int(rng.integers(1, v + 1))
        s = np.sort(rng.random(size) ** rng.uniform(1, 30))[::-1]
        exact = bool(rng.integers(2))
        spec = Spectrum(sigma=s, energy=float(np.sum(s ** 2)) * (1 if exact else rng.uniform(1, 3)), n_rows=n,
                        n_cols=v, space="clr", route="gram" if exact else "sketch", exact=exact,
                        precision=str(rng.choice(["fp64", "fp32"])), row_precision=str(rng.choice(["fp64", "fp32"])))
        t = spec.metric("threshold_rank")
        top = t.upper if isinstance(t, Bound) else t
        assert top <= min(n, v, size if exact else v)
        assert isinstance(t, Bound) or t <= min(n, v, size)


# ---- threshold rank of the exact routes -------------------------------------------------------------------------
def _planted(rng, n, cols, r, dtype):
    """An n×cols matrix of rank r in fp64 (products of Gaussian factors), cast to ``dtype``."""
    x = rng.standard_normal((n, r)) @ rng.standard_normal((r, cols))
    return torch.tensor(x).to(dtype)


def _oracle_rank(x: torch.Tensor) -> int:
    """numpy's matrix_rank of the explicit matrix in the precision its rows had."""
    return int(np.linalg.matrix_rank(x.numpy()))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n", [40, 300])  # N below and above the Gram's width
@pytest.mark.parametrize("precision", ["fp64", "fast"])
def test_gram_threshold_rank_equals_matrix_rank(dtype, n, precision):
    rng = np.random.default_rng(n + (dtype == torch.float32))
    v, r = 120, 17
    rows = _planted(rng, n, v, r, dtype)
    g = Gram(v, space="clr", precision=precision)
    for lo in range(0, n, 64):
        part = rows[lo:lo + 64]
        g.update(Chunk(torch.zeros(part.shape[0], 4), rows=part))
    spec = g.finalize()
    assert spec.threshold_rank == _oracle_rank(rows) == r
    assert spec.threshold_rank <= min(n, v, spec.sigma.size)
    assert spec.row_precision == ("fp64" if dtype == torch.float64 else "fp32")


def _clr(h: torch.Tensor, w: torch.Tensor, n_cols: int) -> torch.Tensor:
    logits = h.to(torch.float64) @ w.T.to(torch.float64)
    rows, _ = reference.transform_rows(logits, torch.full((h.shape[0],), -1), n_cols, "clr", True, torch.float64)
    return rows


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n,r", [(30, 12), (30, 30), (200, 20), (200, 64)])  # N below and above d = 64
def test_factor_threshold_rank_equals_matrix_rank(dtype, n, r):
    rng = np.random.default_rng(7 * n + r)
    d, v = 64, 500
    h = _planted(rng, n, d, min(r, d), dtype)
    w = torch.tensor(rng.standard_normal((v, d)))
    f = Factor(w, None, v)
    f.update(Chunk(torch.zeros(n, 4), features=h))
    spec = f.finalize()
    t = _clr(h, w, v).to(dtype)  # the clr rows, in the precision the features had
    assert spec.threshold_rank == _oracle_rank(t) == min(r, n)
    assert spec.threshold_rank <= min(n, v, spec.sigma.size)


def test_factor_rows_below_hidden_size_no_spurious_values():
    # N = 256 < d = 576: the square root of the rank-256 feature Gram leaves ≈ 1e-8·σ_1 values
    # in the other 320 directions; the threshold rank must not count them.
    rng = np.random.default_rng(0)
    w = torch.tensor(rng.standard_normal((4000, 576)))
    h = torch.tensor(rng.standard_normal((256, 576)))
    f = Factor(w, None, 4000)
    f.update(Chunk(torch.zeros(256, 4, dtype=torch.float64), features=h))
    spec = f.finalize()
    wc = w - w.mean(0)
    assert spec.threshold_rank == np.linalg.matrix_rank((h @ wc.T).numpy()) == 256
    assert spec.numerical_rank == 256


def test_bf16_rows_threshold_absent_with_reason():
    s = np.array([3.0, 2.0, 1.0])
    spec = Spectrum(sigma=s, energy=14.0, n_rows=1000, n_cols=500, space="clr", route="gram", row_precision="bf16")
    assert spec.threshold_rank is None and "bf16" in spec.metrics()["threshold_rank"]["reason"]
