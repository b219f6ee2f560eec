"""`SparseGram`: the exact fp64 Gram of rows that are sparse plus a per-row constant.

The rows of a count-based model (MLE or add-k smoothing, :mod:`rankest.targets.ngram`) over m
observed columns, plus one merged column for the V − m columns no context gives mass beyond the
smoothing floor, are x_r = d_r + α_r·1 with d_r sparse. Their Gram is

    G = DᵀD + u·1ᵀ + 1·uᵀ + A·11ᵀ,   u = Σ_r α_r d_r,  A = Σ_r α_r²,

so only the sparse part DᵀD is accumulated (CSR, no densifying, ``ops.sparse_gram_update``,
lower triangle, fp64) and the constants enter as exact rank-2 corrections at the end. The
merged column stands for ``rest`` identical columns α_r: scaled by sqrt(rest) it has the
spectrum of all of them (k identical columns a have the spectrum of one column √k·a).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from rankest import ops
from rankest.accumulate.base import Accumulator, Chunk, gram_noise_floor
from rankest.linalg import eigvalsh_lower
from rankest.spectrum import Spectrum

#: Widths up to which the eigensolve is cheap enough for every convergence milestone.
CONVERGENCE_MAX_COLS = 4096


class SparseGram(Accumulator):
    """Exact fp64 Gram of :class:`~rankest.accumulate.base.SparseRows` chunks.

    Parameters
    ----------
    m : int
        Observed (sparse) columns.
    width : int
        Columns of the Gram: m, or m + 1 with the merged column of the ``rest`` others.
    rest : int
        Columns merged into column m (V − m).
    space : str
        Target space of the rows (recorded in the Spectrum).
    n_cols : int
        V, the columns of the full matrix the spectrum describes.
    """

    name = "sparse_gram"
    needs = "sparse"
    fixed_state_keys = ("shape",)

    def __init__(self, m: int, width: int, rest: int, *, space: str, n_cols: int) -> None:
        super().__init__()
        if width not in (m, m + 1):
            raise ValueError(f"width must be m or m + 1, got m = {m}, width = {width}")
        self.m, self.width, self.rest, self.space, self.n_cols = int(m), int(width), int(rest), space, int(n_cols)
        self.g = torch.zeros(self.width, self.width, dtype=torch.float64)
        self.u = torch.zeros(self.m, dtype=torch.float64)
        self.a = torch.zeros((), dtype=torch.float64)
        self.cheap_finalize = self.width <= CONVERGENCE_MAX_COLS

    def update(self, chunk: Chunk) -> None:
        rows = chunk.sparse
        if rows is None:
            raise ValueError("the sparse Gram needs sparse rows in every chunk")
        ops.sparse_gram_update(self.g, torch.from_numpy(rows.crow), torch.from_numpy(rows.col),
                               torch.from_numpy(rows.val))
        if rows.alpha.any():
            per_entry = np.repeat(rows.alpha, np.diff(rows.crow))
            self.u += torch.from_numpy(np.bincount(rows.col, weights=rows.val * per_entry, minlength=self.m))
            self.a += float((rows.alpha ** 2).sum())
        self.n_rows += rows.n

    def gram(self) -> torch.Tensor:
        """The full (width × width) Gram, lower triangle valid; the corrections go to a copy."""
        a = float(self.a)
        if a == 0.0:
            return self.g
        g = self.g.clone()
        m, u = self.m, self.u
        g[:m, :m] += u[:, None] + u[None, :] + a
        if self.width > m:
            s = math.sqrt(self.rest)
            g[m, :m] += s * (u + a)
            g[m, m] += self.rest * a
        return g

    # ---- state: three sums over rows ------------------------------------------------------
    def merge(self, other: "SparseGram") -> None:
        self._check_merge(other)
        self.g += other.g
        self.u += other.u
        self.a += other.a
        self.n_rows += other.n_rows

    def state(self) -> dict[str, np.ndarray]:
        return {"g": self.g.numpy().copy(), "u": self.u.numpy().copy(), "a": np.asarray(float(self.a)),
                "n_rows": np.asarray(self.n_rows, dtype=np.int64),
                "shape": np.asarray([self.m, self.width, self.rest], dtype=np.int64)}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        shape = [int(v) for v in np.asarray(state["shape"]).ravel()]
        if shape != [self.m, self.width, self.rest]:
            raise ValueError(f"a sparse Gram state of shape {shape} cannot continue one of "
                             f"{[self.m, self.width, self.rest]}")
        self.g.copy_(torch.as_tensor(np.asarray(state["g"])))
        self.u.copy_(torch.as_tensor(np.asarray(state["u"])))
        self.a.fill_(float(np.asarray(state["a"])))
        self.n_rows = int(np.asarray(state["n_rows"]))

    def finalize(self, energy: float = float("nan")) -> Spectrum:
        """Exact spectrum: eigvalsh of the corrected Gram; the V − width values not stored are 0."""
        lam = eigvalsh_lower(self.gram()) if self.width else np.zeros(0)
        sigma = np.sqrt(np.clip(lam, 0.0, None))[::-1]
        floor = gram_noise_floor(float(lam.max()) if lam.size else 0.0, self.width, "fp64")
        return Spectrum(sigma=sigma[:min(self.n_rows, sigma.size)], energy=energy, n_rows=self.n_rows,
                        n_cols=self.n_cols, space=self.space, route="gram", exact=True, precision="fp64",
                        row_precision="fp64", noise_floor=floor)

    def finalize_cost(self) -> str:
        return f"an eigvalsh of the {self.width:,}×{self.width:,} compressed Gram (snapshots up to {CONVERGENCE_MAX_COLS})"
