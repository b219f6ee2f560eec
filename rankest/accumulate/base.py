"""Accumulators: streaming, mergeable summaries of the target matrix T (N × V').

Every accumulator has one small interface (ARCHITECTURE.md, "Data flow"):

* ``update(chunk)``   — consume a chunk of rows (never keeps the rows);
* ``merge(other)``    — add another accumulator's state (shards, processes);
* ``state()`` / ``load_state(state)`` — a dict of numpy arrays, written to HDF5 by checkpoints;
* ``finalize(energy)`` → :class:`~rankest.spectrum.Spectrum`, without changing the state
  (so convergence snapshots can finalize a prefix and go on).

Routes:

``RowStats``  ‖T‖_F² (exact, fp64) and the teacher's NLL / entropy on the rows.
``Gram``      the V'×V' Gram TᵀT with an fp64 carry; eigvalsh at the end. Exact; O(V'²) memory.
``Factor``    a linear-head teacher's ``clr`` matrix T = H̃·W̃ᵀ (H̃ = [H 1], W̃ = [Wc bc]); only the
              (d+1)×(d+1) Gram of the features is streamed; σ(T) = σ(R_H·R_W) with R = G^{1/2}.
              Exact; O(d²) memory; O(N·d²) time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from rankest import ops
from rankest.spectrum import Spectrum


@dataclass
class Chunk:
    """A chunk of n target rows, as produced by the pipeline.

    stats : (n, 4) float32/float64 — ``ops.reference.STAT_NAMES`` (logsumexp, entropy, nll, sq_norm)
    rows : (n, V') — target-space rows, or None when no route needs them
    features : (n, d) — the teacher's final features (input of its head), or None
    """

    stats: torch.Tensor
    rows: Optional[torch.Tensor] = None
    features: Optional[torch.Tensor] = None

    @property
    def n(self) -> int:
        return int(self.stats.shape[0])

    def slice(self, start: int, stop: int) -> "Chunk":
        cut = lambda t: None if t is None else t[start:stop]  # noqa: E731
        return Chunk(self.stats[start:stop], cut(self.rows), cut(self.features))


class Accumulator:
    """Base class: the interface every route implements."""

    name = "base"
    #: True when ``finalize`` is cheap enough to run at every convergence milestone.
    cheap_finalize = True

    def __init__(self) -> None:
        self.n_rows = 0

    def update(self, chunk: Chunk) -> None:
        raise NotImplementedError

    #: Name of the tensor attribute that is a plain sum over rows. When set, merge adds it,
    #: state / load_state save and restore it (with n_rows); routes with more state override.
    summed: Optional[str] = None
    #: Entries of ``state()`` that identify the accumulator (seed, shapes) and are equal on every
    #: shard; every other entry is a sum over rows, which is how rankest.distributed reduces states.
    fixed_state_keys: tuple[str, ...] = ()

    def _summed(self) -> torch.Tensor:
        if self.summed is None:
            raise NotImplementedError(f"{type(self).__name__} must set `summed` or override merge/state")
        return getattr(self, self.summed)

    def merge(self, other: "Accumulator") -> None:
        self._check_merge(other)
        mine = self._summed()
        mine += other._summed().to(mine.device)
        self.n_rows += other.n_rows

    def state(self) -> dict[str, np.ndarray]:
        return {self.summed: self._summed().cpu().numpy(), "n_rows": np.asarray(self.n_rows)}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        self._summed().copy_(torch.as_tensor(np.asarray(state[self.summed])))
        self.n_rows = int(np.asarray(state["n_rows"]))

    def finalize(self, energy: float = float("nan")) -> Spectrum:
        raise NotImplementedError

    def nbytes(self) -> int:
        """Bytes held by the accumulator's state."""
        return sum(int(np.asarray(v).nbytes) for v in self.state().values())

    def _check_merge(self, other) -> None:
        if type(other) is not type(self):
            raise TypeError(f"cannot merge {type(other).__name__} into {type(self).__name__}")


class RowStats(Accumulator):
    """‖T‖_F² and per-row teacher statistics, summed in fp64."""

    name = "row_stats"
    summed = "sums"

    def __init__(self, device="cpu") -> None:
        super().__init__()
        # [energy, nll_sum, nll_count, entropy_sum]; fp64 so N = 1e8 rows lose nothing.
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)

    def update(self, chunk: Chunk) -> None:
        s = chunk.stats.to(torch.float64)
        nll = s[:, 2]
        has = ~torch.isnan(nll)
        self.sums += torch.stack([s[:, 3].sum(), torch.where(has, nll, 0).sum(), has.sum().to(torch.float64),
                                  s[:, 1].sum()])
        self.n_rows += chunk.n

    @property
    def energy(self) -> float:
        return float(self.sums[0])

    def summary(self) -> dict[str, float]:
        energy, nll_sum, nll_n, ent_sum = (float(x) for x in self.sums.cpu())
        nll = nll_sum / nll_n if nll_n else float("nan")
        return {"energy": energy, "nll": nll, "perplexity": float(np.exp(nll)) if nll_n else float("nan"),
                "entropy": ent_sum / self.n_rows if self.n_rows else float("nan"), "n_rows": self.n_rows}


def gram_nbytes(n_cols: int, *, on_gpu: bool = False) -> int:
    """Memory the `gram` route needs: the fp64 V'×V' Gram plus the final eigensolver's workspace.

    LAPACK's eigvalsh on the CPU needs about 3 more Gram-sized buffers (the matrix copy and the
    reduction to tridiagonal form); on a GPU, torch.linalg.eigvalsh (cuSOLVER syevd, values
    only) needs about one copy.
    """
    workspace = 1.0 if on_gpu else 3.0
    return int(8 * n_cols * n_cols * (1 + workspace))


class Gram(Accumulator):
    """Exact V'×V' Gram TᵀT, fp64 carry (lower triangle), eigvalsh at the end.

    precision ``fp64``: rows cast to fp64 before the products (σ_i ≥ ~1e-7·σ_1 resolved);
    ``fast``: fp32 products per chunk, fp64 carry (σ_i ≥ ~1e-3·σ_1 resolved; a Gram squares
    the condition number).
    """

    name = "gram"
    summed = "gram"

    def __init__(self, n_cols: int, *, space: str, precision: str = "fp64", device="cpu",
                 convergence_max_cols: int = 4096) -> None:
        super().__init__()
        self.n_cols, self.space, self.precision = n_cols, space, precision
        self.gram = torch.zeros(n_cols, n_cols, dtype=torch.float64, device=device)
        # eigvalsh of the Gram at each convergence milestone only while it is affordable.
        self.cheap_finalize = n_cols <= convergence_max_cols

    def update(self, chunk: Chunk) -> None:
        if chunk.rows is None:
            raise ValueError("the gram route needs target rows in every chunk")
        ops.gram_update(self.gram, chunk.rows, self.precision)
        self.n_rows += chunk.n

    def finalize(self, energy: float = float("nan")) -> Spectrum:
        # UPLO='L' reads only the lower triangle that gram_update maintains: no symmetrised copy.
        if self.gram.device.type == "cpu":  # numpy's LAPACK: see eigh_lower
            lam = np.linalg.eigvalsh(self.gram.numpy(), UPLO="L")
        else:
            lam = torch.linalg.eigvalsh(self.gram, UPLO="L").cpu().numpy()
        sigma = np.sqrt(np.clip(lam, 0.0, None))
        return Spectrum(sigma=sigma, energy=energy, n_rows=self.n_rows, n_cols=self.n_cols, space=self.space,
                        route="gram", exact=True, precision=_row_precision(self.precision))


def psd_sqrt(g: torch.Tensor) -> torch.Tensor:
    """Symmetric square root R = V·diag(sqrt(max(λ, 0)))·Vᵀ of a PSD matrix (fp64), so RᵀR = G.

    Not Cholesky: a LayerNorm's features lie on an affine hyperplane, so [H 1] (and a fresh
    model's H) is rank-deficient and Cholesky fails; eigh tolerates it (ARCHITECTURE.md).
    """
    lam, vec = eigh_lower(g)
    return (vec * lam.clamp_min(0).sqrt()) @ vec.T


def eigh_lower(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenpairs (ascending) of the symmetric matrix whose lower triangle ``g`` holds.

    On CPU through numpy's LAPACK: torch 2.13's CPU eigh/svd (MKL) runs 10–200× slower whenever
    another process holds a core (a 576² eigh took 8 s instead of 0.04 s on the shared 2-core
    benchmark machine); numpy's is unaffected (see also rankest.linalg.sym_eigh).
    """
    if g.device.type == "cpu":
        lam, vec = np.linalg.eigh(g.numpy(), UPLO="L")
        return torch.from_numpy(lam), torch.from_numpy(vec)
    return torch.linalg.eigh(g, UPLO="L")


def svdvals(a: torch.Tensor) -> np.ndarray:
    """Singular values (fp64 numpy); numpy's LAPACK on CPU for the reason given in eigh_lower."""
    if a.device.type == "cpu":
        return np.linalg.svd(a.numpy(), compute_uv=False)
    return torch.linalg.svdvals(a).cpu().numpy()


def head_gram(weight: torch.Tensor, bias: Optional[torch.Tensor], n_cols: int, *, block: int = 8192) -> torch.Tensor:
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


class Factor(Accumulator):
    """Exact spectrum of a linear-head teacher's ``clr`` matrix from two small factors.

    T = H·Wcᵀ + 1·bcᵀ = H̃·W̃ᵀ with H̃ = [H 1] (N×(d+1)) and W̃ = [Wc bc] (V'×(d+1)).
    Streams G_H = H̃ᵀH̃ (fp64 carry); at the end σ(T) = svdvals(R_H·R_W), R = G^{1/2}
    (TᵀT = W̃·G_H·W̃ᵀ has the non-zero eigenvalues of R_H·G_W·R_H). Cost O(N·d²) + O(V'·d²).
    """

    name = "factor"
    summed = "g_h"

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], n_cols: int, *,
                 precision: str = "fp64", device="cpu") -> None:
        super().__init__()
        self.n_cols, self.precision = n_cols, precision
        self.g_w = head_gram(weight, bias, n_cols).to(device)
        self.with_ones = self.g_w.shape[0] == weight.shape[1] + 1
        self.g_h = torch.zeros_like(self.g_w)
        self._r_w: Optional[torch.Tensor] = None

    def update(self, chunk: Chunk) -> None:
        if chunk.features is None:
            raise ValueError("the factor route needs the teacher's features in every chunk")
        h = chunk.features
        if self.with_ones:
            h = torch.cat([h, h.new_ones(h.shape[0], 1)], dim=1)
        ops.gram_update(self.g_h, h, self.precision)
        self.n_rows += chunk.n

    def model_energy(self) -> float:
        """‖H̃W̃ᵀ‖_F² = trace(G_H·G_W), from the factors alone."""
        g_h = torch.tril(self.g_h) + torch.tril(self.g_h, -1).T
        return float((g_h * self.g_w).sum())

    def finalize(self, energy: float = float("nan")) -> Spectrum:
        if self._r_w is None:
            self._r_w = psd_sqrt(self.g_w)
        r_h = psd_sqrt(self.g_h)
        sigma = svdvals(r_h @ self._r_w)
        return Spectrum(sigma=sigma, energy=energy, n_rows=self.n_rows, n_cols=self.n_cols, space="clr",
                        route="factor", exact=True, precision=_row_precision(self.precision))


def _row_precision(gram_precision: str) -> str:
    return "fp64" if gram_precision == "fp64" else "fp32"
