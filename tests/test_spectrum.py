"""Spectrum metrics against brute force on explicitly built matrices."""

import math

import numpy as np
import pytest

from rankest.spectrum import Spectrum


def _spec(sigma, n_rows=1000, n_cols=500, **kw):
    return Spectrum(sigma=np.asarray(sigma, float), energy=float(np.sum(np.square(sigma))), n_rows=n_rows,
                    n_cols=n_cols, space="clr", route="gram", **kw)


def test_w_error_matches_truncated_svd_brute_force():
    rng = np.random.default_rng(1234)
    a = rng.standard_normal((60, 20)) @ np.diag(np.logspace(0, -3, 20)) @ rng.standard_normal((20, 40))
    u, s, vt = np.linalg.svd(a, full_matrices=False)
    spec = _spec(s, 60, 40)
    for d in (0, 1, 3, 10, 19, 20, 40):
        a_d = (u[:, :d] * s[:d]) @ vt[:d]
        brute = np.linalg.norm(a - a_d) / np.linalg.norm(a)
        assert spec.w_error(d) == pytest.approx(brute, rel=1e-9, abs=1e-12)
    curve = spec.w_error()
    assert curve.shape == (40,) and np.all(np.diff(curve) <= 1e-15)


def test_w_error_tail_accurate_below_total_roundoff():
    # Suffix sums: a tail of 1e-20 of the energy is still resolved (a 1 − prefix/total would give 0).
    s = np.array([1.0, 1e-10, 1e-12])
    spec = _spec(s)
    assert spec.w_error(1) == pytest.approx(math.sqrt(1e-20 + 1e-24) / math.sqrt(1 + 1e-20 + 1e-24), rel=1e-12)


def test_rank_at_is_least_d():
    s = np.sqrt(np.array([50.0, 30.0, 10.0, 5.0, 4.0, 1.0]))  # energies sum to 100
    spec = _spec(s)
    # tails: d=1: 50 → 0.707; d=2: 20 → 0.447; d=3: 10 → 0.316; d=4: 5 → 0.22; d=5: 1 → 0.1
    assert spec.rank_at(0.5) == 2
    assert spec.rank_at(0.1) == 5
    assert spec.rank_at(0.01) == 6
    assert spec.rank_at(1.0) == 0


def test_numerical_rank_finds_cliff_and_exact_zero():
    s = np.concatenate([np.linspace(10, 1, 32), 1e-9 * np.ones(8)])
    assert _spec(s).numerical_rank == 32
    s0 = np.concatenate([np.linspace(10, 5, 7), np.zeros(5)])
    assert _spec(s0).numerical_rank == 7
    # a full-rank exact spectrum: the last value is followed by exact zeros
    assert _spec([3.0, 2.9, 2.8]).numerical_rank == 3
    # below 1e-6·σ_1 no cliff counts
    s2 = np.array([1.0, 0.5, 1e-7, 1e-15])
    assert _spec(s2).numerical_rank == 2


def test_effective_and_stable_rank():
    s = np.ones(10)
    spec = _spec(s)
    assert spec.effective_rank == pytest.approx(10.0)
    assert spec.stable_rank == pytest.approx(10.0)
    assert _spec([2.0]).effective_rank == pytest.approx(1.0)


def test_sketch_tail_uses_streamed_energy():
    spec = Spectrum(sigma=np.array([3.0, 2.0]), energy=20.0, n_rows=10, n_cols=10, space="prob", route="sketch",
                    exact=False)
    assert spec.w_error(2) == pytest.approx(math.sqrt(7 / 20))
    assert spec.off_model_energy == pytest.approx(7 / 20)
    assert spec.rank_at(0.01) is None


def test_threshold_rank_follows_precision():
    s = np.array([1.0, 1e-3, 1e-9, 1e-14])
    assert _spec(s, 100, 100, precision="fp64").threshold_rank == 3
    assert _spec(s, 100, 100, precision="fp32").threshold_rank == 2


def test_save_load_roundtrip(tmp_path):
    rng = np.random.default_rng(7)
    s = np.sort(rng.random(30))[::-1]
    spec = _spec(s, meta={"teacher": "x", "nll": 2.5}, convergence={10: {"numerical_rank": 3}})
    spec.save(tmp_path / "r.h5")
    back = Spectrum.load(tmp_path / "r.h5")
    np.testing.assert_array_equal(back.sigma, spec.sigma)
    assert back.meta["teacher"] == "x" and back.convergence[10]["numerical_rank"] == 3
    assert back.summary() == spec.summary()


def test_bad_sigma_refused():
    with pytest.raises(ValueError):
        _spec([1.0, -1.0])
    with pytest.raises(ValueError):
        _spec([1.0, float("nan")])
