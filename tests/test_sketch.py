"""rankest.accumulate.sketch.Sketch: the single-pass streaming Nyström accumulator (the `sketch` route).

One-sided results (σ̂ ≤ σ, tail ≥ true tail) against the exact SVD; the same values as
rankest.linalg.streaming_nystrom; merge = one sketch; state round trips (through HDF5) and is
refused with another seed or shape; bad rows name their chunk.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rankest.accumulate.base import Chunk
from rankest.errors import UserError
from rankest.linalg import UNIT_ROUNDOFF, InputError, streaming_nystrom
from rankest.accumulate.sketch import Sketch

from test_linalg import energy_tol, make_matrix, truth, w_curve

N, V, K = 1500, 400, 40


def chunks_of(a: torch.Tensor, size: int):
    for lo in range(0, a.shape[0], size):
        rows = a[lo:lo + size]
        stats = torch.zeros(rows.shape[0], 4, dtype=torch.float64)
        stats[:, 3] = (rows.to(torch.float64) ** 2).sum(dim=1)
        yield Chunk(stats=stats, rows=rows)


def sketch_of(a: torch.Tensor, k: int = K, *, size: int = 256, **kw) -> Sketch:
    sk = Sketch(a.shape[1], k, space="prob", **kw)
    for c in chunks_of(a, size):
        sk.update(c)
    return sk


def energy(a: torch.Tensor) -> float:
    return float((a.to(torch.float64) ** 2).sum())


def test_equals_streaming_nystrom():
    a = make_matrix("poly1")
    sp = sketch_of(a, seed=3).finalize(energy(a))
    ref = streaming_nystrom(a, K, seed=3, precision="fp64")
    np.testing.assert_allclose(sp.sigma, ref.S.numpy(), rtol=1e-10, atol=1e-13)
    assert sp.meta["trusted_d"] == ref.info["trusted_d"]
    assert sp.meta["sketch_error"]["unexplained_energy"] == pytest.approx(ref.info["unexplained_energy"], rel=1e-8)


@pytest.mark.parametrize("name", ["lowrank_noise", "poly1", "poly2", "exp"])
@pytest.mark.parametrize("precision", ["fp64", "fp32"])
def test_one_sided(name, precision):
    """σ̂_i ≤ σ_i and tail_est(d) ≥ tail_true(d) (up to the products' round-off); the W-error
    curve within 3e-2 of the truth up to d = k/2; the estimated lower curve below the truth."""
    dtype = torch.float64 if precision == "fp64" else torch.float32
    a = make_matrix(name, dtype=dtype)
    s, e, w = truth(a)
    sp = sketch_of(a, precision=precision).finalize(energy(a))
    tol_e = energy_tol(precision, s[0])
    assert sp.sigma.shape == (K,)
    assert np.all(sp.sigma ** 2 <= s[:K] ** 2 + tol_e)
    tails = sp.tail_energy()[1:]
    true_tails = w[:K] ** 2 * e
    assert np.all(tails >= true_tails - tol_e)
    assert np.max(np.abs(sp.w_error()[: K // 2] - w[: K // 2])) < 3e-2
    np.testing.assert_allclose(sp.w_error(), w_curve(sp.sigma, e), rtol=1e-9, atol=1e-10)
    low = np.asarray(sp.meta["sketch_error"]["w_error_lower"])
    assert np.all(low ** 2 * e <= true_tails + tol_e)
    td = sp.meta["trusted_d"]
    assert np.all(np.abs(sp.w_error()[:td] - w[:td]) <= 1e-2)


def test_spectrum_and_meta():
    a = make_matrix("exp")
    sp = sketch_of(a, seed=5).finalize(energy(a))
    assert sp.route == "sketch" and not sp.exact and sp.space == "prob" and sp.precision == "fp64"
    assert sp.n_rows == N and sp.n_cols == V
    m = sp.meta
    assert m["passes"] == 1 and m["l"] == 2 * K and m["oversample"] == K and m["seed"] == 5
    assert m["sketch_precision"] == "fp64" and 0 <= m["trusted_d"] <= K
    err = m["sketch_error"]
    for key in ("unexplained_energy", "unexplained_fraction", "residual_fro", "sigma_k_rel_error", "w_error_lower",
                "sigma_upper", "trusted_d_certified", "energy_source"):
        assert key in err
    assert err["energy_source"] == "streamed"
    # the off-model energy of a sketch is the energy beyond its k values
    assert sp.off_model_energy == pytest.approx(1 - np.sum(sp.sigma ** 2) / energy(a), rel=1e-12)
    sp.summary()  # JSON-safe


def test_energy_fallback_to_rows():
    a = make_matrix("poly1")
    sk = sketch_of(a)
    sp = sk.finalize()
    assert sp.energy == pytest.approx(energy(a), rel=1e-12)
    assert sp.meta["sketch_error"]["energy_source"] == "sketch_rows"


def test_merge_equals_one_sketch():
    a = make_matrix("poly1")
    whole = sketch_of(a, seed=2)
    left, right = sketch_of(a[:700], seed=2), sketch_of(a[700:], seed=2, size=100)
    left.merge(right)
    assert left.n_rows == N
    np.testing.assert_allclose(left.state()["y"], whole.state()["y"], rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(left.finalize(energy(a)).sigma, whole.finalize(energy(a)).sigma, rtol=1e-10)
    with pytest.raises(UserError, match="seed"):
        left.merge(sketch_of(a[:10], seed=9))
    with pytest.raises(TypeError):
        left.merge(object())


@pytest.mark.parametrize("size", [1, 37, 1500])
def test_chunking_does_not_matter(size):
    a = make_matrix("exp", n=300, v=120)
    ref = sketch_of(a, 12, size=300).finalize(energy(a)).sigma
    np.testing.assert_allclose(sketch_of(a, 12, size=size).finalize(energy(a)).sigma, ref, rtol=1e-10)


def test_state_round_trip_through_hdf5(tmp_path):
    h5py = pytest.importorskip("h5py")
    a = make_matrix("poly1")
    sk = sketch_of(a[:800], seed=4)
    with h5py.File(tmp_path / "ckpt.h5", "w") as f:
        for key, val in sk.state().items():
            f[key] = val
    resumed = Sketch(V, K, space="prob", seed=4)
    with h5py.File(tmp_path / "ckpt.h5", "r") as f:
        resumed.load_state({key: f[key][()] for key in f})
    for c in chunks_of(a[800:], 256):
        resumed.update(c)
    whole = sketch_of(a, seed=4)
    assert resumed.n_rows == N
    np.testing.assert_allclose(resumed.finalize(energy(a)).sigma, whole.finalize(energy(a)).sigma, rtol=1e-10)


@pytest.mark.parametrize("other,match", [
    (dict(seed=1), "seed"), (dict(k=30), "l="), (dict(n_probes=4), "n_probes"), (dict(precision="fp32"), "precision"),
])
def test_resume_with_another_seed_or_shape_is_refused(other, match):
    a = make_matrix("poly1")
    state = sketch_of(a[:300]).state()
    kw = dict(k=K, seed=0)
    kw.update(other)
    k = kw.pop("k")
    fresh = Sketch(V, k, space="prob", **kw)
    with pytest.raises(UserError, match=match):
        fresh.load_state(state)
    with pytest.raises(UserError, match="afresh"):
        Sketch(V + 1, K, space="prob").load_state(state)
    with pytest.raises(UserError, match="not a sketch"):
        Sketch(V, K, space="prob").load_state({"gram": np.zeros((2, 2))})


def test_finalize_leaves_state_unchanged():
    a = make_matrix("exp")
    sk = sketch_of(a[:500])
    before = {key: np.copy(v) for key, v in sk.state().items()}
    sk.finalize(energy(a[:500]))
    after = sk.state()
    for key in before:
        np.testing.assert_array_equal(before[key], after[key])
    sk.update(next(chunks_of(a[500:], 1000)))  # and it goes on
    assert sk.n_rows == 1500


def test_precisions_and_uncached_test_matrix():
    a = make_matrix("poly1", dtype=torch.float32)
    s, e, w = truth(a)
    ref = sketch_of(a, precision="fp32").finalize(e)
    regen = sketch_of(a, precision="fp32", cache_test_matrix=False).finalize(e)
    np.testing.assert_array_equal(ref.sigma, regen.sigma)
    assert ref.precision == "fp32"
    fast = sketch_of(a, precision="fast").finalize(e)
    assert fast.precision == "bf16" and fast.meta["sketch_precision"] == "fast"
    # bf16 inputs move the one-pass W-error curve by ~1e-3 at most here (measured: README of the report)
    assert np.max(np.abs(fast.w_error()[: K // 2] - ref.w_error()[: K // 2])) < 5e-3
    assert UNIT_ROUNDOFF["fast"] > UNIT_ROUNDOFF["fp32"]


def test_bad_input():
    with pytest.raises(InputError, match="k"):
        Sketch(V, 0, space="clr")
    with pytest.raises(InputError, match="gram"):
        Sketch(50, 50, space="clr")
    with pytest.raises(InputError, match="l = 90"):
        Sketch(60, 10, space="clr", l=90)
    with pytest.raises(InputError, match="precision"):
        Sketch(V, 5, space="clr", precision="bf16")
    sk = Sketch(20, 4, space="clr")
    with pytest.raises(ValueError, match="rows"):
        sk.update(Chunk(stats=torch.zeros(3, 4)))
    with pytest.raises(ValueError, match="shape"):
        sk.update(Chunk(stats=torch.zeros(3, 4), rows=torch.zeros(3, 21)))
    with pytest.raises(ValueError, match="no rows"):
        sk.finalize(1.0)
    rows = torch.randn(10, 20)
    sk.update(Chunk(stats=torch.zeros(10, 4), rows=rows))
    rows = rows.clone()
    rows[6, 2] = float("nan")
    with pytest.raises(InputError, match=r"chunk 1 \(rows 10-19\).*row 16"):
        sk.update(Chunk(stats=torch.zeros(10, 4), rows=rows))
    assert sk.n_rows == 10  # the bad chunk was not added


def test_state_version_1_refused():
    sk = Sketch(V, K, space="prob", seed=3)
    st = sk.state()
    st["version"] = np.asarray(1)
    with pytest.raises(UserError, match="state version 1"):
        Sketch(V, K, space="prob", seed=3).load_state(st)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@needs_cuda
def test_cuda_test_matrix_equals_cpu():
    """The counter hash gives the same Ω on the GPU as on the CPU (fp32 entries; the fp64
    log/cos of the two libraries may differ in a last ulp, which fp32 rounding hides)."""
    from rankest.linalg import gaussian_test_matrix

    a = gaussian_test_matrix(3000, 257, seed=11, dtype=torch.float32)
    b = gaussian_test_matrix(3000, 257, seed=11, dtype=torch.float32, device="cuda").cpu()
    assert (a != b).float().mean() <= 1e-6 and float((a - b).abs().max()) <= 1e-6


@needs_cuda
def test_cuda_fast_products_bf16_tensor_cores():
    """gram_apply(fast) on CUDA (bf16 GEMMs, fp32 output, Z split hi + lo) against fp64
    products of the same (bf16-exact) inputs: only fp32 accumulation and Z_lo's rounding remain."""
    from rankest.linalg import gaussian_test_matrix, gram_apply, round_test

    g = torch.Generator().manual_seed(5)
    rows = torch.rand(700, 1000, generator=g).to(torch.bfloat16)
    x = round_test(gaussian_test_matrix(1000, 48, seed=2, dtype=torch.float32), "fast")
    y = torch.zeros(1000, 48, dtype=torch.float64, device="cuda")
    z = gram_apply(rows.cuda(), x.cuda(), precision="fast", out=y)
    r64, x64 = rows.double(), x.double()
    exact = r64.T @ (r64 @ x64)
    assert float((y.cpu() - exact).abs().max() / exact.abs().max()) <= 1e-5
    assert float(((z.cpu().double() - r64 @ x64).abs().max()) / (r64 @ x64).abs().max()) <= 1e-5
