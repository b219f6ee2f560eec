from typing import Optional, Sequence

import numpy as np
import torch


# ---- truncations of the teacher's head -------------------------------------------------------
def feature_sqrt(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """L (d×d) with L·Lᵀ = G (floored) and its inverse L⁻¹, from eigh in fp64.

    Eigenvalues below τ = d·eps·λ_max are raised to τ. Directions the metric rows do not span
    (fewer rows than d, or a LayerNorm with β = 0 leaving H of rank d − 1: the features of a LayerNorm lie on an affine hyperplane) then
    weigh ≈ 1e-13 of the rest: every truncation below the span's rank is the feature-metric one to
    that precision, they come last, and the full-rank head is W_c itself — new rows with a
    component outside the span keep the teacher's logits.
    """
    g = gram.double()
    g = 0.5 * (g + g.T)
    evals, q = torch.linalg.eigh(g)
    top = evals.max()
    if not bool(top > 0):  # no features at all: the Euclidean metric
        top = torch.ones((), dtype=g.dtype, device=g.device)
    root = evals.clamp_min(top * g.shape[0] * torch.finfo(torch.float64).eps).sqrt()
    return q * root, (q / root).T


def head_moments(weight: torch.Tensor, *, block: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """WᵀW (d×d, fp64) and the column mean w̄ (d,) of a head, over blocks of rows.

    Products in fp64 for an fp64 head, else fp32 blocks summed in fp64 (the Gram route's
    precision: singular values below ≈ 1e-3·σ_1 lose relative accuracy, which moves a W-error by
    far less than it shows). One V'×d×d product serves both truncations.
    """
    work = torch.float64 if weight.dtype == torch.float64 else torch.float32
    d = weight.shape[1]
    wtw = torch.zeros(d, d, dtype=torch.float64, device=weight.device)
    total = torch.zeros(d, dtype=torch.float64, device=weight.device)
    for lo in range(0, weight.shape[0], block):
        c = weight[lo:lo + block].to(work)
        wtw += (c.T @ c).double()
        total += c.double().sum(0)
    return 0.5 * (wtw + wtw.T), total / weight.shape[0]


def feature_truncations(weight: torch.Tensor, gram: torch.Tensor, ranks: Sequence[int], *,
                        gram_w: Optional[tuple[torch.Tensor, torch.Tensor]] = None
                        ) -> tuple[dict[int, tuple[torch.Tensor, torch.Tensor]], np.ndarray]:
    """Best rank-r heads of the centred head W_c in the feature metric, as factors (A, B).

    Parameters
    ----------
    weight : (V', d) the teacher's head on the real columns.
    gram : (d, d) the feature Gram HᵀH (or its mean over rows) of the metric rows, fp64.
    ranks : the ranks wanted.
    gram_w : :func:`head_moments` of ``weight``, when already computed.

    Returns
    -------
    factors : {r: (A (V'×r), B (r×d))} with A·B = [W_c·L]_r·L⁻¹ (the Eckart–Young truncation in the
        metric of G), balanced: with M = W_c·L = U·S·Vᵀ, A = M·V_r·S_r^{-1/2} = W_c·(L·V_r·S_r^{-1/2})
        and B = S_r^{1/2}·V_rᵀ·L⁻¹. Column i of A (row i of B) does not depend on r, so one V'×d×r_max
        product makes every rank. A in fp64 for an fp64 head, else fp32; B in fp64.
    w_error : (d,) float64, w_error[i-1] = W-error of the logit matrix H·W_cᵀ at rank i.
    """
    work = torch.float64 if weight.dtype == torch.float64 else torch.float32
    wtw, mean = gram_w if gram_w is not None else head_moments(weight)
    wcwc = wtw - weight.shape[0] * torch.outer(mean, mean)  # W_cᵀW_c without forming W_c
    L, Lp = feature_sqrt(gram.to(wtw.device))
    s2, v = torch.linalg.eigh(L.T @ wcwc @ L)  # MᵀM (k×k): right singular vectors of M, ascending
    s2, v = s2.flip(0).clamp_min(0), v.flip(1)
    w_err = _suffix_w_error(s2.cpu().numpy(), weight.shape[1])
    s = s2.sqrt()
    r_max = min(max(ranks), s.numel())
    sk = s[:r_max]
    inv = torch.where(sk > 0, sk.clamp_min(1e-300).rsqrt(), torch.zeros_like(sk))
    c = (L @ v[:, :r_max]) * inv  # (d, r_max)
    a_all = (weight.to(work) - mean.to(work)) @ c.to(work)  # W_c·C, columns M·v_i / sqrt(s_i)
    b_all = sk.sqrt()[:, None] * (v[:, :r_max].T @ Lp)
    return {r: _pad(a_all, b_all, r) for r in ranks}, w_err


def _pad(a_all: torch.Tensor, b_all: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first r factor columns / rows; zeros past the rank of the metric (nothing to carry)."""
    k = min(r, a_all.shape[1])
    a, b = a_all[:, :k], b_all[:k]
    if k < r:
        a = torch.cat([a, a.new_zeros(a.shape[0], r - k)], 1)
        b = torch.cat([b, b.new_zeros(r - k, b.shape[1])], 0)
    return a, b


def weight_truncations(weight: torch.Tensor, ranks: Sequence[int], *,
                       gram_w: Optional[tuple[torch.Tensor, torch.Tensor]] = None
                       ) -> tuple[dict[int, tuple[torch.Tensor, torch.Tensor]], np.ndarray]:
    """Rank-r truncations of the head matrix W itself (the paper's Fig. 8), as factors.

    Returns {r: (W·V_r (V'×r), V_rᵀ (r×d))} (V = right singular vectors of W, from eigh of the
    fp64 WᵀW; A in W's working precision as in :func:`feature_truncations`) and w_error (d,):
    sqrt(Σ_{i>r} σ_i²)/‖W‖_F.
    """
    work = torch.float64 if weight.dtype == torch.float64 else torch.float32
    wtw, _ = gram_w if gram_w is not None else head_moments(weight)
    s2, v = torch.linalg.eigh(wtw)
    s2, v = s2.flip(0).clamp_min(0), v.flip(1)
    w_err = _suffix_w_error(s2.cpu().numpy(), weight.shape[1])
    r_max = max(ranks)
    a_all = weight.to(work) @ v[:, :r_max].to(work)
    return {r: _pad(a_all, v[:, :r_max].T, r) for r in ranks}, w_err


def _suffix_w_error(s2: np.ndarray, d: int) -> np.ndarray:
    """W-error(i) for i = 1..d from squared singular values (zeros beyond their count)."""
    s2 = np.concatenate([np.asarray(s2, dtype=np.float64), np.zeros(max(0, d - len(s2)))])[:d]
    total = s2.sum()
    tail = np.concatenate([np.cumsum(s2[::-1])[::-1][1:], [0.0]])
    return np.sqrt(np.clip(tail, 0, None) / total) if total > 0 else np.zeros(d)
