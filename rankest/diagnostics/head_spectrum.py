import math
from typing import Any

import numpy as np
import torch

from rankest.errors import UserError
from rankest.linalg import svdvals
from rankest.sources.finite import check_finite_tensor
from rankest.spectrum import Spectrum

#: Largest head entry whose SVD is safe: σ_0 ≤ √(V'·d)·max|w| and the W-error sums σ², so
#: max|w| beyond ~1e150 overflows fp64 (1.8e308).
_SVD_SAFE = 1e150
#: σ_i/σ_0 is kept for the first TOP_RATIOS singular values (the paper's Fig. 4 heat map).
TOP_RATIOS = 100


# ---- head spectrum ---------------------------------------------------------------------------
def singular_entropy_kl(sigma: np.ndarray, *, power: int = 1) -> float:
    """KL(p ‖ uniform) = log k − H(p) in nats, with p = σ^power / Σσ^power over k values.

    ``power=1`` is the paper's singular entropy (Godey et al. 2024, §4, Fig. 5); ``power=2``
    weighs by energy. 0 for a flat spectrum, log k for a single non-zero value (0·log 0 = 0).
    """
    s = np.asarray(sigma, dtype=np.float64).ravel()
    if s.size == 0:
        raise ValueError("singular_entropy_kl needs at least one singular value")
    if np.any(s < 0) or not np.all(np.isfinite(s)):
        raise ValueError("singular values must be finite and non-negative")
    w = s ** power
    total = w.sum()
    if total == 0:
        return float("nan")
    p = w[w > 0] / total
    return float(math.log(s.size) + np.sum(p * np.log(p)))


def head_spectrum_metrics(weight: torch.Tensor, n_cols: int, *, top: int = TOP_RATIOS) -> dict[str, Any]:
    """Singular spectrum of an LM head's real-vocabulary rows and the paper's measures of it.

    Parameters
    ----------
    weight : (V, d) tensor
        The LM head (rows = vocabulary, possibly padded beyond V').
    n_cols : int
        V': only rows ``[:n_cols]`` belong to real tokens; padded rows are dropped.
    top : int
        How many ratios σ_i/σ_0 to keep.

    Returns
    -------
    dict, keys prefixed ``head_`` (so they never clash with a target's ``sigma`` in one file): ``head_sigma`` (k = min(V', d), descending,
    fp64 SVD of the fp64 matrix), ``head_sigma_ratio`` (σ_i/σ_0, i < top), ``head_singular_entropy_kl``
    (p = σ/Σσ), ``head_singular_entropy_kl_sq`` (p = σ²/Σσ²), ``head_singular_entropy_max`` (log k),
    ``head_effective_rank``, ``head_stable_rank``, ``head_w_error`` (W-error of the head's own rank-d
    truncation for d = 1 … k, weight space), ``head_rank_at``, ``head_n_rows`` (V'), ``head_n_cols`` (d).
    The bias, if any, is not part of W and is not included.
    """
    if weight is None or weight.dim() != 2:
        raise UserError("the teacher's LM head is not a matrix; head-spectrum needs a linear output head")
    if not 1 <= n_cols <= weight.shape[0]:
        raise UserError(f"the head has {weight.shape[0]} rows but {n_cols} real vocabulary columns were asked for")
    w = weight[:n_cols].detach().to(torch.float64)
    check_finite_tensor(w, "the teacher's LM head", "its weights are damaged: download or save them again")
    if float(w.abs().max()) > _SVD_SAFE:
        raise UserError(f"the teacher's LM head has entries of magnitude {float(w.abs().max()):.2g}, beyond what its "
                        f"fp64 singular values can hold (σ² overflows past {_SVD_SAFE:.0e}); its weights are "
                        f"damaged or mis-scaled.")
    sigma = svdvals(w)
    # The Spectrum's own metric implementations (one copy of each formula): effective rank,
    # stable rank, the W-error curve as suffix sums of σ².
    spec = Spectrum(sigma=sigma, energy=float(np.sum(sigma[::-1] ** 2)), n_rows=int(n_cols),
                    n_cols=int(weight.shape[1]), space="head", route="svd")
    s = spec.sigma
    ratio = s[:top] / s[0] if s.size and s[0] > 0 else np.zeros(min(top, s.size))
    return {
        "head_sigma": s,
        "head_sigma_ratio": ratio,
        "head_singular_entropy_kl": singular_entropy_kl(s, power=1),
        "head_singular_entropy_kl_sq": singular_entropy_kl(s, power=2),
        "head_singular_entropy_max": math.log(s.size),
        "head_effective_rank": spec.effective_rank,
        "head_stable_rank": spec.stable_rank,
        "head_w_error": spec.w_error(),
        "head_rank_at": {k: v for k, v in spec.metrics()["rank_at"].items()},
        "head_n_rows": int(n_cols),
        "head_n_cols": int(weight.shape[1]),
    }


def teacher_head_spectrum(teacher, *, top: int = TOP_RATIOS) -> dict[str, Any]:
    """:func:`head_spectrum_metrics` of a loaded teacher's head over its V' real tokens."""
    weight, bias = teacher.head()  # UserError when the model has no output embeddings
    out = head_spectrum_metrics(weight, teacher.n_cols, top=top)
    out["head_has_bias"] = bias is not None
    return out
