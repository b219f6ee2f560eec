"""Accumulators against an exact fp64 SVD of the explicitly built matrix."""

import numpy as np
import pytest
import torch

from rankest.accumulate.base import Chunk
from rankest.accumulate.factor import centred_head_gram as head_gram
from rankest.accumulate.factor import Factor
from rankest.accumulate.gram import Gram
from rankest.accumulate.rowstats import RowStats
from rankest.linalg import psd_sqrt
from rankest.ops import reference


def _chunks(n, sizes):
    start = 0
    for s in sizes:
        yield start, min(n, start + s)
        start += s


def _stats(rows):
    sq = (rows.double() ** 2).sum(1)
    z = torch.zeros_like(sq)
    return torch.stack([z, z, z, sq], 1)


@pytest.mark.parametrize("precision", ["fp64", "fast"])
def test_gram_equals_exact_svd(precision):
    g = torch.Generator().manual_seed(11)
    n, v = 300, 64
    t = (torch.randn(n, 12, generator=g, dtype=torch.float64) @ torch.randn(12, v, generator=g, dtype=torch.float64)
         + 1e-2 * torch.randn(n, v, generator=g, dtype=torch.float64))
    rows = t if precision == "fp64" else t.float()
    acc = Gram(v, space="prob", precision=precision)
    for a, b in _chunks(n, [1, 50, 0, 97, 152]):
        acc.update(Chunk(stats=_stats(rows[a:b]), rows=rows[a:b]))
    spec = acc.finalize(energy=float((t ** 2).sum()))
    exact = np.linalg.svd(rows.double().numpy(), compute_uv=False)
    keep = exact >= 1e-6 * exact[0]
    # fp64 Gram: σ_i error ≈ eps·σ_1²/σ_i; fp32 products: ≈ 2^-24·sqrt(n)·σ_1²/σ_i (Gram squares the condition)
    eps = 2.0 ** -52 if precision == "fp64" else 2.0 ** -24 * np.sqrt(n)
    tol = 1e-6 * exact[keep] + 10 * eps * exact[0] ** 2 / exact[keep]
    assert np.all(np.abs(spec.sigma[: keep.sum()] - exact[keep]) <= tol)
    assert spec.n_rows == n and spec.exact


def test_gram_merge_and_state_roundtrip():
    g = torch.Generator().manual_seed(3)
    t = torch.randn(80, 16, generator=g, dtype=torch.float64)
    a, b, whole = (Gram(16, space="prob") for _ in range(3))
    a.update(Chunk(_stats(t[:30]), rows=t[:30]))
    b.update(Chunk(_stats(t[30:]), rows=t[30:]))
    whole.update(Chunk(_stats(t), rows=t))
    a.merge(b)
    c = Gram(16, space="prob")
    c.load_state(a.state())
    np.testing.assert_allclose(np.tril(c.gram.numpy()), np.tril(whole.gram.numpy()), rtol=1e-13, atol=1e-13)
    assert c.n_rows == 80


def _explicit_clr(h, w, b, n_cols):
    logits = h @ w.T + (0 if b is None else b)
    rows, _ = reference.transform_rows(logits, torch.full((h.shape[0],), -1), n_cols, "clr", True, torch.float64)
    return rows


@pytest.mark.parametrize("with_bias", [False, True])
def test_factor_equals_exact_svd_of_explicit_clr(with_bias):
    g = torch.Generator().manual_seed(5 + with_bias)
    n, d, v, n_cols = 400, 24, 150, 131  # padded head columns beyond n_cols are ignored
    h = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, d, dtype=torch.float64)
    w = torch.randn(v, d, generator=g, dtype=torch.float64)
    b = torch.randn(v, generator=g, dtype=torch.float64) if with_bias else None
    acc = Factor(w, b, n_cols)
    for lo, hi in _chunks(n, [7, 100, 293]):
        acc.update(Chunk(stats=torch.zeros(hi - lo, 4, dtype=torch.float64), features=h[lo:hi]))
    spec = acc.finalize()
    t = _explicit_clr(h, w, b, n_cols)
    exact = np.linalg.svd(t.numpy(), compute_uv=False)
    r = d + with_bias
    np.testing.assert_allclose(spec.sigma[:r], exact[:r], rtol=1e-6)
    assert spec.sigma.size == r
    np.testing.assert_allclose(spec.w_error()[: r - 1], _w_error(exact)[: r - 1], atol=1e-6)
    assert acc.model_energy() == pytest.approx(float((t ** 2).sum()), rel=1e-10)
    assert spec.numerical_rank == r


def _w_error(s):
    tail = np.cumsum((s ** 2)[::-1])[::-1]
    return np.sqrt(np.concatenate([tail[1:], [0.0]]) / tail[0])


def test_factor_equals_gram_on_clr():
    g = torch.Generator().manual_seed(8)
    n, d, v = 200, 10, 40
    h = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(v, d, generator=g, dtype=torch.float64)
    b = torch.randn(v, generator=g, dtype=torch.float64)
    f = Factor(w, b, v)
    f.update(Chunk(torch.zeros(n, 4, dtype=torch.float64), features=h))
    gram = Gram(v, space="clr")
    t = _explicit_clr(h, w, b, v)
    gram.update(Chunk(_stats(t), rows=t))
    sf, sg = f.finalize().sigma, gram.finalize().sigma
    np.testing.assert_allclose(sf, sg[: sf.size], rtol=1e-8)
    assert np.all(sg[sf.size:] <= 1e-6 * sg[0])


def test_factor_rank_deficient_features_layernorm_hyperplane():
    # Rows of H on an affine hyperplane (LayerNorm with bias): [H 1] is rank d, H is rank d.
    # Cholesky of G_H would fail; the eigh square root must not.
    g = torch.Generator().manual_seed(9)
    n, d, v = 300, 16, 50
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    x = x - x.mean(1, keepdim=True)  # Σ_j x_j = 0: a fresh LayerNorm output (β = 0) has rank d − 1
    w = torch.randn(v, d, generator=g, dtype=torch.float64)
    f = Factor(w, None, v)
    f.update(Chunk(torch.zeros(n, 4, dtype=torch.float64), features=x))
    spec = f.finalize()
    assert spec.numerical_rank == d - 1


def test_psd_sqrt_is_a_square_root():
    g = torch.Generator().manual_seed(4)
    a = torch.randn(30, 12, generator=g, dtype=torch.float64)
    gm = a.T @ a
    r = psd_sqrt(gm)
    torch.testing.assert_close(r.T @ r, gm, rtol=1e-10, atol=1e-10)


def test_head_gram_blocked_equals_direct():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(1000, 8, generator=g)
    b = torch.randn(1000, generator=g)
    direct_w = w[:900].double() - w[:900].double().mean(0)
    bc = b[:900].double() - b[:900].double().mean()
    wt = torch.cat([direct_w, bc[:, None]], 1)
    torch.testing.assert_close(head_gram(w, b, 900, block=128), wt.T @ wt, rtol=1e-12, atol=1e-10)
    assert head_gram(w, torch.full((1000,), 3.0), 900).shape == (8, 8)  # constant bias centres away


def test_row_stats_sums():
    st = torch.tensor([[0.0, 1.0, 2.0, 4.0], [0.0, 3.0, float("nan"), 5.0]])
    acc = RowStats()
    acc.update(Chunk(st))
    s = acc.summary()
    assert s["energy"] == 9.0 and s["nll"] == 2.0 and s["entropy"] == 2.0 and s["n_rows"] == 2
