from typing import Optional

import numpy as np
import torch

from rankest import ops
from rankest.accumulate.base import Chunk, ExactRoute, gram_noise_floor, row_precision
from rankest.linalg import psd_sqrt, svdvals
from rankest.spectrum import Spectrum


def centred_head_gram(weight: torch.Tensor, bias: Optional[torch.Tensor], n_cols: int, *, block: int = 8192) -> torch.Tensor:
    """G_W = W̃ᵀW̃ in fp64 for W̃ = [Wc bc], the column-centred head over the real vocabulary.

    weight : (V, d), bias : (V,) or None → (d', d') float64 with d' = d + 1 when the centred
    bias bc = b' − mean(b') is non-zero, else d. Wc = W' − 1·w̄ᵀ (W' = the first n_cols rows).
    Built block by block so the fp64 copy is block×d, even for a 50k×4096 head.
    """
    w_mean = weight[:n_cols].to(torch.float64).mean(dim=0)
    b = None
    if bias is not None:
        b = bias[:n_cols].to(torch.float64)
        b = b - b.mean()
        # A bias constant over V' is centred away: the ones column is then not needed.
        b = b if bool((b != 0).any()) else None
    d = weight.shape[1] + (b is not None)
    g = torch.zeros(d, d, dtype=torch.float64, device=weight.device)
    for start in range(0, n_cols, block):
        stop = min(start + block, n_cols)
        wb = weight[start:stop].to(torch.float64) - w_mean
        if b is not None:
            wb = torch.cat([wb, b[start:stop, None]], dim=1)
        g += wb.T @ wb
    return g


def gram_factor(g_lower: torch.Tensor) -> torch.Tensor:
    """A factor R with RᵀR = G of the PSD matrix whose lower triangle ``g_lower`` holds (d×d fp64).

    Cholesky (R = Lᵀ, d³/3 flops) when G is numerically positive definite, else the eigh square
    root :func:`~rankest.linalg.psd_sqrt` (rank-deficient G: LayerNorm features on a hyperplane).
    Any R with RᵀR = G gives σ(R·R_W) = σ(H̃W̃ᵀ); both are backward stable on G, and Cholesky is
    ~10× cheaper than eigh, which the convergence snapshots pay at every milestone.
    """
    if g_lower.device.type == "cpu":  # numpy's LAPACK on CPU, as rankest.linalg.eigh_lower
        try:
            return torch.from_numpy(np.linalg.cholesky(g_lower.numpy()).T.copy())  # lower triangle only
        except np.linalg.LinAlgError:
            return psd_sqrt(g_lower)
    chol, info = torch.linalg.cholesky_ex(g_lower)
    return chol.T if int(info) == 0 else psd_sqrt(g_lower)


class Factor(ExactRoute):
    """Exact spectrum of a linear-head teacher's ``clr`` matrix from two small factors.

    T = H·Wcᵀ + 1·bcᵀ = H̃·W̃ᵀ with H̃ = [H 1] (N×(d+1)) and W̃ = [Wc bc] (V'×(d+1)).
    Streams G_H = H̃ᵀH̃ (fp64 carry); at the end σ(T) = svdvals(R_H·R_W), R = G^{1/2}
    (TᵀT = W̃·G_H·W̃ᵀ has the non-zero eigenvalues of R_H·G_W·R_H). Cost O(N·d²) + O(V'·d²).
    """

    name = "factor"
    needs = "features"
    summed = "g_h"

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], n_cols: int, *,
                 precision: str = "fp64", device="cpu", g_w: Optional[torch.Tensor] = None) -> None:
        super().__init__()
        self.n_cols, self.precision = n_cols, precision
        # g_w: centred_head_gram(weight, bias, n_cols) when the caller already has it (read only).
        self.g_w = (centred_head_gram(weight, bias, n_cols) if g_w is None else g_w).to(device)
        self.with_ones = self.g_w.shape[0] == weight.shape[1] + 1
        self.g_h = torch.zeros_like(self.g_w)
        self._r_w: Optional[torch.Tensor] = None

    def update(self, chunk: Chunk) -> None:
        if chunk.features is None:
            raise ValueError("the factor route needs the teacher's features in every chunk")
        h = chunk.features
        if self.with_ones:
            h = torch.cat([h, h.new_ones(h.shape[0], 1)], dim=1)
        self.inputs.saw(chunk.features)
        ops.gram_update(self.g_h, h, self.precision)
        self.n_rows += chunk.n

    def model_energy(self) -> float:
        """‖H̃W̃ᵀ‖_F² = trace(G_H·G_W), from the factors alone."""
        g_h = torch.tril(self.g_h) + torch.tril(self.g_h, -1).T
        return float((g_h * self.g_w).sum())

    def finalize(self, energy: float = float("nan")) -> Spectrum:
        if self._r_w is None:
            self._r_w = psd_sqrt(self.g_w)
            self._lam_w = _top_eigenvalue(self.g_w)
        sigma = svdvals(gram_factor(self.g_h) @ self._r_w)  # any F with FᵀF = G_H: Cholesky when definite
        precision = row_precision(self.precision)
        # TᵀT has the eigenvalues of G_W^½·G_H·G_W^½: an error δ in G_H (resolved to d'·u·λ_1(G_H))
        # moves them by at most λ_1(G_W)·δ (Weyl), so that is the floor of σ², whatever σ_1(T) is.
        floor = gram_noise_floor(_top_eigenvalue(self.g_h) * self._lam_w, self.g_h.shape[0], precision)
        return Spectrum(sigma=sigma, energy=energy, n_rows=self.n_rows, n_cols=self.n_cols, space="clr",
                        route="factor", exact=True, precision=precision, row_precision=self.inputs.name,
                        noise_floor=floor)


def _top_eigenvalue(g: torch.Tensor, iters: int = 50) -> float:
    """λ_1 of the PSD matrix whose lower triangle ``g`` holds, by power iteration (a few per cent
    is enough for a noise floor; a full eigensolve would double the finalize's cost)."""
    full = torch.tril(g) + torch.tril(g, -1).T
    diag = float(torch.diagonal(full).max()) if full.numel() else 0.0
    if diag <= 0:
        return 0.0
    x = torch.ones(full.shape[0], dtype=full.dtype, device=full.device)
    est = 0.0
    for _ in range(iters):
        y = full @ x
        nrm = float(torch.linalg.vector_norm(y))
        if nrm == 0.0:
            break
        est, x = nrm / float(torch.linalg.vector_norm(x)), y / nrm
    return max(est, diag)
