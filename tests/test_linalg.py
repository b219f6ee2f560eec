"""rankest.linalg: randomized SVD (single pass Nyström, subspace, block Krylov) against the exact
fp64 SVD on matrices of known spectrum, in fp64 and fp32.

Targets: passes = 1 (l = 2k): the W-error curve within 3e-2 of the truth up to
d = k/2 and never below it (up to round-off); passes ≥ 3: σ_1…σ_{k/2} within 1e-3 (relative)
on the i^-1 and exponential spectra. Streaming equals in-memory to fp64 round-off, whatever
the chunking. Round-off tolerances follow from the precision of the products: working on TᵀT,
an energy is exact to ~u·‖T‖₂² (u = 2^-53 for fp64, 2^-24 for fp32) times a small growth factor.
"""

from __future__ import annotations

import functools
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rankest.errors import UserError
from rankest.linalg import (CONTRACTION_MAX, InputError, UNIT_ROUNDOFF, default_oversample, nystrom_eigh,
                            probe_inflation, randomized_svd, streaming_nystrom, gaussian_test_matrix)

N, V, K = 1500, 400, 40


def known_spectrum(name: str, v: int = V) -> np.ndarray:
    """Spectra used in the randomized-SVD literature (Halko et al. 2011 §7; Tropp et al. 2017 §6)."""
    i = np.arange(1, v + 1, dtype=np.float64)
    return {
        "lowrank_noise": np.where(i <= 10, 1.0, 0.0) + 1e-2,  # rank 10 + flat noise
        "poly1": 1.0 / i,
        "poly2": 1.0 / i ** 2,
        "exp": np.exp(-i / 10.0),
    }[name]


@functools.lru_cache(maxsize=None)
def make_matrix(name: str, *, n: int = N, v: int = V, seed: int = 0, dtype=torch.float64):
    """T = U·diag(σ)·Wᵀ with Haar-random orthonormal U (n×v), W (v×v); exact σ known (cached:
    callers must not modify it)."""
    g = torch.Generator().manual_seed(seed)
    sigma = torch.as_tensor(known_spectrum(name, v))
    u = torch.linalg.qr(torch.randn(n, v, generator=g, dtype=torch.float64)).Q
    w = torch.linalg.qr(torch.randn(v, v, generator=g, dtype=torch.float64)).Q
    return ((u * sigma) @ w.T).to(dtype)


@functools.lru_cache(maxsize=None)
def truth(a: torch.Tensor):
    """Exact fp64 singular values, energy and W-error curve (d = 1 … V) of the matrix as stored."""
    s = torch.linalg.svdvals(a.to(torch.float64)).numpy()
    e = float(np.sum(s[::-1] ** 2))
    tail = np.cumsum((s ** 2)[::-1])[::-1]  # tail[d] = Σ_{i>d} σ_i², suffix sums (small first)
    w = np.sqrt(np.concatenate([tail[1:], [0.0]]) / e)
    return s, e, w


def w_curve(s_hat: np.ndarray, e: float) -> np.ndarray:
    return np.sqrt(np.maximum(e - np.cumsum(s_hat ** 2), 0.0) / e)


def energy_tol(precision: str, s1: float, growth: float = 64.0) -> float:
    """Round-off of a captured energy from products in ``precision`` (relative to σ_1²)."""
    return growth * UNIT_ROUNDOFF[precision] * s1 ** 2


# --------------------------------------------------------------------------------------------
# test matrices
# --------------------------------------------------------------------------------------------
def test_test_matrix_is_counter_based():
    a = gaussian_test_matrix(3000, 8, seed=5)
    assert torch.equal(a, gaussian_test_matrix(3000, 8, seed=5))
    # rows of any range are regenerated exactly, and V' columns are a prefix of more columns
    assert torch.equal(a[1000:2500], gaussian_test_matrix(3000, 8, seed=5, start=1000, stop=2500))
    assert torch.equal(a[:1500], gaussian_test_matrix(1500, 8, seed=5))
    assert not torch.equal(a, gaussian_test_matrix(3000, 8, seed=6))
    assert not torch.equal(a, gaussian_test_matrix(3000, 8, seed=5, stream=1))
    # fp32 draws: exact in fp64, and N(0, 1)
    assert torch.equal(a, a.float().double())
    assert abs(float(a.std()) - 1.0) < 0.05


def test_probe_inflation():
    # (x e^{1-x})^{s/2} = 1 − confidence at x = 1/α
    for s in (4, 16, 64):
        alpha = probe_inflation(s, 0.99)
        x = 1 / alpha
        assert math.isclose((x * math.exp(1 - x)) ** (s / 2), 0.01, rel_tol=1e-6)
    assert probe_inflation(64) < probe_inflation(16) < probe_inflation(4)


# --------------------------------------------------------------------------------------------
# accuracy against the exact SVD
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["lowrank_noise", "poly1", "poly2", "exp"])
@pytest.mark.parametrize("precision", ["fp64", "fp32"])
def test_single_pass_w_error(name, precision):
    """passes = 1, l = 2k: W-error within 3e-2 up to k/2, never below the truth (one-sided)."""
    dtype = torch.float64 if precision == "fp64" else torch.float32
    a = make_matrix(name, dtype=dtype)
    s, e, w = truth(a)
    res = randomized_svd(a, K, passes=1, seed=1)
    s_hat = res.S.numpy()
    tol_e = energy_tol(precision, s[0])
    # one-sided values: σ̂_i ≤ σ_i (Â ≼ A), up to round-off
    assert np.all(s_hat ** 2 <= s[:K] ** 2 + tol_e)
    w_hat = w_curve(s_hat, e)
    d = K // 2
    assert np.max(np.abs(w_hat[:d] - w[:d])) < 3e-2
    # the curve is an upper bound (tail_est ≥ tail_true) up to round-off, everywhere it is reported
    assert np.all(w_hat ** 2 * e >= w[:K] ** 2 * e - tol_e)
    # the reported energy is the streamed one (fp32 rows: per-row fp32 norms, summed in fp64)
    rel = 1e-12 if precision == "fp64" else 1e-8
    assert res.info["energy"] == pytest.approx(float((a.double() ** 2).sum()), rel=rel)


@pytest.mark.parametrize("name", ["poly1", "exp"])
@pytest.mark.parametrize("precision", ["fp64", "fp32"])
@pytest.mark.parametrize("method", ["subspace", "krylov", "krylov-rr"])
def test_three_passes_sigma(name, precision, method):
    """passes = 3, l = 2k: σ_1…σ_{k/2} within 1e-3 (relative) on the i^-1 and exponential spectra."""
    dtype = torch.float64 if precision == "fp64" else torch.float32
    a = make_matrix(name, dtype=dtype)
    s, _, _ = truth(a)
    res = randomized_svd(a, K, passes=3, method=method, seed=2)
    rel = np.abs(res.S.numpy()[: K // 2] - s[: K // 2]) / s[: K // 2]
    assert rel.max() < 1e-3


def test_more_passes_converge():
    a = make_matrix("poly1")
    s, _, _ = truth(a)
    errs = [np.max(np.abs(randomized_svd(a, K, passes=p, return_vectors=False).S.numpy() - s[:K]) / s[:K])
            for p in (1, 2, 4)]
    assert errs[0] > errs[1] > errs[2]
    kry = randomized_svd(a, K, passes=4, method="krylov", return_vectors=False).S.numpy()
    assert np.max(np.abs(kry - s[:K]) / s[:K]) <= errs[2]


@pytest.mark.parametrize("name", ["lowrank_noise", "poly1", "exp"])
@pytest.mark.parametrize("passes,method", [(1, "subspace"), (3, "subspace"), (3, "krylov-rr")])
def test_error_estimates_bound_the_truth(name, passes, method):
    """The a-posteriori estimates: σ_upper ≥ σ, W-error lower curve ≤ truth, and the curve is
    within 1e-2 of the truth up to trusted_d (and the certified trusted_d is no larger). For
    krylov-rr Â = PAP is a Rayleigh–Ritz approximation (A − Â indefinite): the bounds rest on
    Cauchy interlacing and Lidskii's inequality instead of A − Â ≽ 0."""
    a = make_matrix(name)
    s, e, w = truth(a)
    res = randomized_svd(a, K, passes=passes, method=method, seed=3)
    info = res.info
    tol_e = energy_tol("fp64", s[0])
    # U = E − Σ over all l Nyström values: at most the energy beyond the k reported ones
    assert -tol_e <= info["unexplained_energy"] <= e - float(np.sum(res.S.numpy() ** 2)) + tol_e
    assert np.all(info["sigma_upper"] ** 2 >= s[:K] ** 2 - tol_e)
    assert np.all(info["w_error_lower"] ** 2 * e <= w[:K] ** 2 * e + tol_e)
    td = info["trusted_d"]
    assert 0 <= info["trusted_d_certified"] <= td <= K
    w_hat = w_curve(res.S.numpy(), e)
    assert np.all(np.abs(w_hat[:td] - w[:td]) <= 1e-2)
    if passes == 3:
        assert td == K  # converged: every reported d is trusted


def test_fast_precision_measured_effect():
    """``fast`` (bf16 inputs, fp32 accumulation and output): the W-error moves by the bf16
    rounding of T only — within 5e-3 on the i^-1 spectrum after 3 passes, 3e-2 in one pass."""
    a = make_matrix("poly1", dtype=torch.float32)
    s, e, w = truth(a)
    three = randomized_svd(a, K, passes=3, precision="fast", return_vectors=False)
    assert np.max(np.abs(w_curve(three.S.numpy(), e)[:K] - w[:K])) < 5e-3
    one = randomized_svd(a, K, passes=1, precision="fast", return_vectors=False)
    assert np.max(np.abs(w_curve(one.S.numpy(), e)[: K // 2] - w[: K // 2])) < 3e-2
    assert three.info["precision"] == "fast"


# --------------------------------------------------------------------------------------------
# vectors and signs
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("passes,method", [(1, "subspace"), (3, "subspace"), (3, "krylov"), (3, "krylov-rr")])
def test_vectors(passes, method):
    a = make_matrix("exp")
    u, s, vt, _ = randomized_svd(a, K, passes=passes, method=method)
    assert u.shape == (N, K) and s.shape == (K,) and vt.shape == (K, V)
    eye = torch.eye(K, dtype=torch.float64)
    assert torch.allclose(vt @ vt.T, eye, atol=1e-8)
    # the top vectors are accurate (one pass: to a few times the sketch's leakage σ_l/σ_10 ≈ 1e-3;
    # 1.0–1.5× was seen over six seeds): U ≈ T·V/σ, and U·S·Vt reconstructs T's leading part
    uu, ss, vvt = torch.linalg.svd(a, full_matrices=False)
    top = 10
    tol = 3 * float(ss[2 * K - 1] / ss[top]) if passes == 1 else 1e-6
    assert torch.allclose(u[:, :top], (a @ vt[:top].T) / s[:top], atol=tol)
    approx = (u[:, :top] * s[:top]) @ vt[:top]
    exact = (uu[:, :top] * ss[:top]) @ vvt[:top]
    assert float(torch.linalg.matrix_norm(approx - exact)) < tol * float(ss[0])
    # deterministic signs: the largest-|.| entry of each right vector is positive (svd_flip, V-based)
    idx = vt.abs().argmax(dim=1)
    assert bool((vt.gather(1, idx[:, None]) > 0).all())


def test_numpy_in_numpy_out_and_seeded():
    a = make_matrix("poly1")
    r1 = randomized_svd(a.numpy(), K, passes=2, seed=7)
    r2 = randomized_svd(a, K, passes=2, seed=7)
    assert isinstance(r1.S, np.ndarray) and isinstance(r1.U, np.ndarray) and isinstance(r1.Vt, np.ndarray)
    np.testing.assert_array_equal(r1.S, r2.S.numpy())
    np.testing.assert_array_equal(r1.S, randomized_svd(a.numpy(), K, passes=2, seed=7).S)
    assert not np.array_equal(r1.S, randomized_svd(a.numpy(), K, passes=2, seed=8).S)
    no_vec = randomized_svd(a, K, passes=2, seed=7, return_vectors=False)
    assert no_vec.U is None and no_vec.Vt is None
    np.testing.assert_allclose(no_vec.S.numpy(), r1.S, rtol=1e-12)


# --------------------------------------------------------------------------------------------
# streams
# --------------------------------------------------------------------------------------------
def _stream(a: torch.Tensor, cuts: list[int], as_numpy: bool = False):
    bounds = [0] + sorted(set(c for c in cuts if 0 < c < a.shape[0])) + [a.shape[0]]

    def chunks():
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            yield a[lo:hi].numpy() if as_numpy else a[lo:hi]
    return chunks


_MAT = make_matrix("poly1", n=600, v=200, seed=4)
_REF = {(p, m): randomized_svd(_MAT, 20, passes=p, method=m, seed=1, chunk_rows=10_000, precision="fp64")
        for p, m in [(1, "subspace"), (3, "subspace"), (4, "krylov"), (4, "krylov-rr")]}


@settings(max_examples=12, deadline=None)
@given(cuts=st.lists(st.integers(min_value=1, max_value=599), max_size=8),
       pm=st.sampled_from([(1, "subspace"), (3, "subspace"), (4, "krylov"), (4, "krylov-rr")]),
       as_numpy=st.booleans())
def test_stream_equals_in_memory(cuts, pm, as_numpy):
    """Whatever the chunking, a stream gives the in-memory result to fp64 round-off (not bitwise)."""
    passes, method = pm
    ref = _REF[(passes, method)]
    res = randomized_svd(_stream(_MAT, cuts, as_numpy), 20, passes=passes, method=method, seed=1, precision="fp64")
    s_ref = ref.S.numpy()
    np.testing.assert_allclose(res.S.numpy(), s_ref, rtol=1e-10, atol=1e-12 * s_ref[0])
    assert res.U is None  # a stream's left vectors would need N×k storage
    top = 5
    np.testing.assert_allclose(res.Vt[:top].numpy(), ref.Vt[:top].numpy(), atol=1e-8)
    assert res.info["n_rows"] == 600 and res.info["energy"] == pytest.approx(ref.info["energy"], rel=1e-13)


def test_one_shot_iterable_single_pass():
    a = make_matrix("exp", n=500, v=150)
    ref = streaming_nystrom(a, 15, seed=2)
    res = streaming_nystrom(iter([a[:200], a[200:]]), 15, seed=2, precision="fp64")
    np.testing.assert_allclose(res.S.numpy(), ref.S.numpy(), rtol=1e-10)
    with pytest.raises(InputError, match="one-shot"):
        randomized_svd(iter([a]), 15, passes=2)


def test_matches_sklearn_at_equal_settings():
    """Same k, l = 2k, same test-matrix distribution and the same number of products: `passes`
    passes are 2·passes GEMMs with T, sklearn's n_iter = passes − 1 is 2·n_iter + 2. Subspace
    iteration is then as accurate as sklearn's QR-normalised power iteration, and block Krylov
    more accurate (mean over seeds of the worst relative σ error, i ≤ k). The passes are chosen
    so that the approximation error, not round-off, dominates (exp converges in 2)."""
    from sklearn.utils.extmath import randomized_svd as sk_rsvd

    for name, passes in (("poly1", 3), ("exp", 2)):
        a = make_matrix(name, n=1200, v=300)
        s, _, _ = truth(a)
        k = 30
        ours, krylov, theirs = [], [], []
        for seed in range(3):
            rel = lambda x: float(np.max(np.abs(np.asarray(x)[:k] - s[:k]) / s[:k]))  # noqa: E731
            ours.append(rel(randomized_svd(a, k, passes=passes, oversample=k, seed=seed, return_vectors=False).S))
            krylov.append(rel(randomized_svd(a, k, passes=3, oversample=k, method="krylov", seed=seed,
                                             return_vectors=False).S))
            _, s_sk, _ = sk_rsvd(a.numpy(), k, n_oversamples=k, n_iter=passes - 1, power_iteration_normalizer="QR",
                                 random_state=seed)
            theirs.append(rel(s_sk))
        assert np.mean(ours) <= 1.5 * np.mean(theirs)
        if passes == 3:
            assert np.mean(krylov) <= 0.1 * np.mean(theirs)


def test_fp32_power_iteration_keeps_the_tail():
    """QR every pass: many passes in fp32 keep σ_k (unnormalised power iteration would lose it)."""
    a = make_matrix("poly1", dtype=torch.float32)
    s, _, _ = truth(a)
    res = randomized_svd(a, K, passes=8, precision="fp32", return_vectors=False)
    assert abs(float(res.S[K - 1]) - s[K - 1]) / s[K - 1] < 1e-3


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [0, -3, 2.5, True, "10"])
def test_bad_k(k):
    with pytest.raises(InputError, match="k"):
        randomized_svd(torch.ones(10, 5), k)
    # a UserError (CLI exit 2) and a ValueError for library callers
    assert issubclass(InputError, UserError) and issubclass(InputError, ValueError)


@pytest.mark.parametrize("kwargs,match", [
    ({"passes": 0}, "passes"), ({"method": "lanczos"}, "method"), ({"precision": "fp16"}, "precision"),
    ({"oversample": -1}, "oversample"), ({"n_probes": -1}, "n_probes"),
    ({"method": "krylov-rr", "precision": "fast"}, "krylov-rr.*bf16"),
])
def test_bad_options(kwargs, match):
    with pytest.raises(InputError, match=match):
        randomized_svd(torch.randn(20, 10), 3, **kwargs)


def test_bad_matrices():
    with pytest.raises(InputError, match="2-D"):
        randomized_svd(torch.randn(3, 4, 5), 2)
    with pytest.raises(InputError, match="floating"):
        randomized_svd(torch.ones(10, 5, dtype=torch.int64), 2)
    with pytest.raises(InputError, match="callable"):
        randomized_svd(42, 2)


def test_k_at_least_v_falls_back_to_exact():
    a = make_matrix("poly1", n=80, v=30)
    s = torch.linalg.svdvals(a)
    with pytest.warns(UserWarning, match="exact"):
        res = randomized_svd(a, 30)
    assert res.info["exact"] and torch.allclose(res.S, s, rtol=1e-12)
    with pytest.warns(UserWarning, match="exact"):
        res = randomized_svd(_stream(a, [20, 50]), 40, passes=2)
    assert res.info["exact"] and res.S.shape == (30,)
    torch.testing.assert_close(res.S, s, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_rows_name_the_chunk(bad):
    a = torch.randn(100, 20, dtype=torch.float64)
    a[57, 3] = bad
    with pytest.raises(InputError, match=r"chunk 2 \(rows 50-74\).*row 57"):
        randomized_svd(_stream(a, [25, 50, 75]), 5, passes=1)
    with pytest.raises(InputError, match="row 57"):
        randomized_svd(a, 5, chunk_rows=25)


def test_stream_must_repeat_its_rows():
    a = torch.randn(100, 20, dtype=torch.float64)
    calls = {"n": 0}

    def shrinking():
        calls["n"] += 1
        yield a[: 100 - calls["n"]]
    with pytest.raises(InputError, match="same rows"):
        randomized_svd(shrinking, 5, passes=2)
    with pytest.raises(InputError, match="columns"):
        randomized_svd(lambda: iter([a, a[:, :10]]), 5, passes=1)
    with pytest.raises(InputError, match="no rows"):
        randomized_svd(lambda: iter([]), 5, passes=1)


def test_nystrom_core_rank_deficient():
    """A rank-deficient A makes QᵀAQ singular: the shift keeps the Cholesky alive."""
    g = torch.Generator().manual_seed(0)
    t = torch.randn(50, 5, generator=g, dtype=torch.float64) @ torch.randn(5, 60, generator=g, dtype=torch.float64)
    q = torch.linalg.qr(torch.randn(60, 12, generator=g, dtype=torch.float64)).Q
    lam, vecs, core = nystrom_eigh(q, t.T @ (t @ q), n_vectors=5)
    exact = torch.linalg.svdvals(t)[:5] ** 2
    torch.testing.assert_close(lam[:5], exact, rtol=1e-8, atol=1e-10)
    assert float(lam[5:].abs().max()) < 1e-8 * float(exact[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        randomized_svd(t, 8, passes=3)  # no warning, no failure


def test_krylov_rr_saves_the_last_product(monkeypatch):
    """krylov-rr's last pass multiplies by T only (T·Q and its l×l Gram): q − 1 passes of
    Tᵀ(T·X) and one of T·X — 2q − 1 products with T instead of 2q — and its Ritz values sit
    between subspace iteration's and the Nyström-finished Krylov's on the i^-1 spectrum (all three
    with the same l = 2k: the default block of the Krylov methods is narrower)."""
    from rankest import linalg
    from rankest.testing import count_calls

    calls = count_calls(monkeypatch, linalg, ("gram_apply", "gram_of_image"))
    a = make_matrix("poly1")
    s, _, _ = truth(a)
    rel = lambda r: float(np.max(np.abs(r.S.numpy() - s[:K]) / s[:K]))  # noqa: E731
    rr = randomized_svd(a, K, passes=3, method="krylov-rr", oversample=K, chunk_rows=N // 4, seed=5)
    assert calls == {"gram_apply": 2 * 4, "gram_of_image": 4}  # 4 chunks per pass
    sub = randomized_svd(a, K, passes=3, method="subspace", seed=5, return_vectors=False)
    kry = randomized_svd(a, K, passes=3, method="krylov", oversample=K, seed=5, return_vectors=False)
    assert rel(kry) < rel(rr) < rel(sub)
    assert np.all(rr.S.numpy() <= s[:K] * (1 + 1e-12))  # Ritz values: below the truth (interlacing)


def test_krylov_blocks_stay_orthogonal_on_a_low_rank_matrix():
    """Rank 12 < l: the later Krylov blocks are round-off inside the earlier ones; _orth's repair
    keeps the whole basis orthonormal, and every method returns the 12 values, the rest ~0."""
    from rankest.linalg import _orth

    g = torch.Generator().manual_seed(3)
    basis = torch.linalg.qr(torch.randn(300, 40, generator=g, dtype=torch.float64)).Q
    inside = basis @ torch.randn(40, 20, generator=g, dtype=torch.float64) + 1e-13 * torch.randn(
        300, 20, generator=g, dtype=torch.float64)
    q = _orth(inside, basis)
    full = torch.cat([basis, q], dim=1)
    assert float((full.T @ full - torch.eye(60, dtype=torch.float64)).abs().max()) < 1e-12
    t = torch.randn(500, 12, generator=g, dtype=torch.float64) @ torch.randn(12, 300, generator=g, dtype=torch.float64)
    s = torch.linalg.svdvals(t)
    for method in ("krylov", "krylov-rr"):
        res = randomized_svd(t, 20, passes=4, method=method, seed=1)
        np.testing.assert_allclose(res.S[:12].numpy(), s[:12].numpy(), rtol=1e-10)
        assert float(res.S[12:].max()) < 1e-6 * float(s[0])


# --------------------------------------------------------------------------------------------
# passes="auto": accuracy-driven
# --------------------------------------------------------------------------------------------
def _fresh(kind: str, seed: int, dtype=torch.float64) -> torch.Tensor:
    """A fresh random matrix: scikit-learn's slowly decaying make_low_rank_matrix (tail 0.8), the
    power law σ_i = i^-0.5 of extended logit matrices, or a fast (exponential) decay."""
    if kind == "sklearn tail 0.8":
        from sklearn.datasets import make_low_rank_matrix
        return torch.from_numpy(make_low_rank_matrix(1200, 500, effective_rank=50, tail_strength=0.8,
                                                     random_state=seed)).to(dtype)
    rng = np.random.default_rng(seed)
    n, v = 1200, 400
    i = np.arange(1, v + 1, dtype=np.float64)
    sigma = i ** -0.5 if kind == "i^-0.5" else np.exp(-i / 8.0)
    u = np.linalg.qr(rng.standard_normal((n, v)))[0]
    w = np.linalg.qr(rng.standard_normal((v, v)))[0]
    return torch.from_numpy((u * sigma) @ w.T).to(dtype)


@pytest.mark.parametrize("kind", ["sklearn tail 0.8", "i^-0.5", "exp"])
def test_auto_is_within_its_tolerance_on_fresh_matrices(kind):
    """Defaults (passes="auto", tol = 1e-3): every σ̂_1…σ̂_k within tol of the fp64 SVD, the
    reported estimate meets tol and is above the true error, and the passes are reported."""
    seed = int(np.random.SeedSequence().entropy % (1 << 31))
    a = _fresh(kind, seed)
    k = 30
    s = np.linalg.svd(a.numpy(), compute_uv=False)[:k]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no max-passes warning
        res = randomized_svd(a, k, seed=seed)
    rel = np.abs(res.S.numpy() - s) / s
    info = res.info
    assert info["passes_auto"] and info["method"] == "krylov" and 2 <= info["passes"] <= 12, (seed, info["passes"])
    assert info["tol"] == 1e-3 and info["sigma_rel_error"] <= 1e-3, (seed, info["sigma_rel_error"])
    assert rel.max() <= 1e-3, (seed, rel.max())
    assert np.all(info["sigma_rel_error_each"] >= rel - 1e-12), seed  # the estimate is above the truth
    assert info["below_roundoff"] == 0  # fp64 products resolve every value here


def _power_law(exponent: float, seed: int, n: int = 1000, v: int = 300) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    sigma = np.arange(1, v + 1, dtype=np.float64) ** -exponent
    u = np.linalg.qr(rng.standard_normal((n, v)))[0]
    w = np.linalg.qr(rng.standard_normal((v, v)))[0]
    return torch.from_numpy((u * sigma) @ w.T)


@pytest.mark.parametrize("kind", ["sklearn tail 0.8", "i^-0.5", "i^-0.3", "i^-1", "exp"])
def test_contracted_estimate_is_conservative(kind):
    """The estimate passes="auto" stops on (the first-order one times its per-pass contraction,
    contracted_error) is above the true worst relative error of σ̂_1…σ̂_k (fp64 SVD), and the
    truth is within tol, at three tolerances (so the stop falls on different passes), on fresh
    slowly and fast decaying matrices."""
    seed = int(np.random.SeedSequence().entropy % (1 << 31))
    a = {"i^-0.3": lambda: _power_law(0.3, seed), "i^-1": lambda: _power_law(1.0, seed)}.get(
        kind, lambda: _fresh(kind, seed))()
    k = 25
    s = np.linalg.svd(a.numpy(), compute_uv=False)[:k]
    for tol in (1e-2, 1e-3, 1e-5):
        res = randomized_svd(a, k, seed=seed, tol=tol, return_vectors=False)
        rel = float((np.abs(res.S.numpy() - s) / s).max())
        info = res.info
        assert info["sigma_rel_error"] <= tol and rel <= tol, (seed, tol, rel, info["sigma_rel_error"])
        # conservative wherever the estimate is above the products' noise (the floor of contracted_error)
        assert info["sigma_rel_error"] >= rel or rel <= 1e-12, (seed, tol, rel, info["sigma_rel_error"])
        if ("contraction" in info and info["contraction"] <= CONTRACTION_MAX
                and info["sigma_rel_error_first_order"] <= 1e-2):
            assert info["sigma_rel_error"] <= info["sigma_rel_error_first_order"]


def test_auto_in_fp32_and_on_a_stream_counts_its_passes():
    """fp32 input (fp32 products) on the slow decay: still within tol; a stream is read once per
    pass reported, and gives the in-memory passes and values at the same block."""
    a = _fresh("i^-0.5", 11)
    s = np.linalg.svd(a.numpy(), compute_uv=False)[:30]
    res32 = randomized_svd(a.float(), 30, seed=2)
    assert np.max(np.abs(res32.S.numpy() - s) / s) <= 1e-3 and res32.info["precision"] == "fp32"
    reads = []

    def chunks():
        reads.append(1)
        return (a[i:i + 250] for i in range(0, a.shape[0], 250))

    streamed = randomized_svd(chunks, 30, seed=2, precision="fp64")
    mem = randomized_svd(a, 30, seed=2, oversample=30)  # a stream's default block, l = 2k
    assert len(reads) == streamed.info["passes"] == mem.info["passes"] >= 2
    np.testing.assert_allclose(streamed.S.numpy(), mem.S.numpy(), rtol=1e-10)
    # without probes there is no estimate to drive: the passes run to max_passes, and a stream
    # still returns its right vectors
    with pytest.warns(UserWarning, match="max_passes"):
        bare = randomized_svd(chunks, 30, seed=2, n_probes=0, max_passes=3)
    assert bare.Vt is not None and bare.Vt.shape == (30, a.shape[1]) and bare.info["passes"] == 3


@pytest.mark.parametrize("method", ["krylov", "subspace", "krylov-rr"])
def test_auto_warns_with_the_estimate_when_max_passes_is_reached(method):
    a = _fresh("sklearn tail 0.8", 5)
    with pytest.warns(UserWarning, match=r"reached \d\.\d\de[-+]\d\d after 2 passes, above tol = 0.001 "
                                         r"\(max_passes was reached\)"):
        res = randomized_svd(a, 30, max_passes=2, method=method, return_vectors=False)
    assert res.info["passes"] == 2 and res.info["sigma_rel_error"] > 1e-3
    # a looser tolerance is met with the same two passes, without a warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loose = randomized_svd(a, 30, max_passes=2, method=method, tol=res.info["sigma_rel_error"] * 1.01,
                               return_vectors=False)
    assert loose.info["passes"] == 2


def test_auto_krylov_stops_at_max_memory():
    """A Krylov basis may not outgrow max_memory: 3 blocks of l = 60 columns of V' = 500 fit in
    16·500·60·3 bytes, so the run stops after 4 passes and says why."""
    a = _fresh("sklearn tail 0.8", 6)
    with pytest.warns(UserWarning, match="max_memory"):
        res = randomized_svd(a, 30, oversample=30, max_memory=16 * 500 * 60 * 3, return_vectors=False)
    assert res.info["passes"] == 4


def test_default_block_is_narrow_for_krylov_only():
    """l = 2k where the width sets the accuracy (one pass, also of a one-shot stream, and subspace
    iteration) and on a stream (every pass a read of every row); l = k + max(20, k/5) for block
    Krylov in memory, fixed or "auto"."""
    a = make_matrix("poly1")
    assert randomized_svd(a, 10, passes=1, return_vectors=False).info["l"] == 20
    assert randomized_svd(iter([a[:700], a[700:]]), 10, return_vectors=False).info["l"] == 20
    assert randomized_svd(a, 10, passes=3, method="subspace", return_vectors=False).info["l"] == 20
    for kw in ({"passes": 3}, {"passes": 3, "method": "krylov-rr"}, {}):
        assert randomized_svd(a, 10, return_vectors=False, **kw).info["l"] == 30, kw
    assert randomized_svd(lambda: iter([a]), 10, return_vectors=False).info["l"] == 20
    assert randomized_svd(a, 10, oversample=5, return_vectors=False).info["l"] == 15  # as given
    assert [default_oversample(k, "auto", "krylov") for k in (1, 100, 150, 1024)] == [20, 20, 30, 204]
    assert default_oversample(300, 4, "subspace") == 300 and default_oversample(300, 1, "krylov") == 300
    assert default_oversample(300, "auto", "krylov", streamed=True) == 300


def test_fixed_passes_are_reported_and_tol_is_checked():
    a = make_matrix("poly1")
    res = randomized_svd(a, K, passes=3, return_vectors=False)
    assert res.info["passes"] == 3 and not res.info["passes_auto"] and res.info["sigma_rel_error"] > 0
    one = randomized_svd(a, K, passes=1, return_vectors=False)
    assert one.info["passes"] == 1 and one.info["method"] == "nystrom" and "sigma_rel_error" in one.info
    for bad in (0, -1e-3, "1e-3", True):
        with pytest.raises(InputError, match="tol"):
            randomized_svd(a, K, tol=bad)
    with pytest.raises(InputError, match="max_passes"):
        randomized_svd(a, K, max_passes=1)


def test_auto_vectors_are_orthonormal_and_match():
    """U rebuilt block by block from the Krylov passes' T·Q: orthonormal, and each uᵢ, vᵢ within
    1e-4 (1 − |cos|) of the fp64 SVD's on the slow decay: a Ritz value's relative error is about
    sin²θ times the relative gap, 1 − |cos θ| ≈ sin²θ/2, so tol = 1e-3 on σ gives vectors to about
    tol/10 here (1.6e-5 measured; the passes are chosen for σ, not for the vectors)."""
    a = _fresh("i^-0.5", 3)
    res = randomized_svd(a, 20, seed=4)
    u, vt = res.U, res.Vt
    u0, _, vt0 = np.linalg.svd(a.numpy(), full_matrices=False)
    eye = torch.eye(20, dtype=torch.float64)
    assert float((u.T @ u - eye).abs().max()) < 1e-8 and float((vt @ vt.T - eye).abs().max()) < 1e-8
    assert np.max(1 - np.abs(np.sum(u.numpy() * u0[:, :20], axis=0))) < 1e-4
    assert np.max(1 - np.abs(np.sum(vt.numpy() * vt0[:20], axis=1))) < 1e-4
