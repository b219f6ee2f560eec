"""The rank of a trained head's own output distribution: the clr spectrum of its log-prob matrix.

For rows h (n × d) a head gives log-probs L (n × V'); its ``clr`` matrix is T = L − mean_j(L)·1ᵀ
(row-centred, as ``estimate``'s clr target: centred log-probs equal centred logits), and its
singular values come from the exact :class:`~rankest.accumulate.gram.Gram` accumulator of
``estimate``, fed by :func:`rankest.ops.transform_rows` like every target:

* V' ≤ n: the V'×V' Gram TᵀT, streamed by row chunks (T never held);
* V' > n: the n×n Gram of Tᵀ (σ(T) = σ(Tᵀ)), streamed by column blocks of T held in the head's dtype.

A linear head's T has rank ≤ r (≤ r + 1 with a bias): T = (I − 11ᵀ/V')·(A·B·h + b) over rows;
a mixture of softmaxes is not low-rank, so its measured rank may exceed r and d.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from rankest import ops
from rankest.accumulate import Chunk, Gram
from rankest.spectrum import CLIFF_FLOOR, Spectrum


@torch.no_grad()
def output_spectrum(log_probs: Callable[[torch.Tensor], torch.Tensor], h: torch.Tensor, n_cols: int, *,
                    chunk: int = 256) -> Spectrum:
    """clr spectrum of the log-prob matrix ``log_probs(h)`` (n × V') through the Gram accumulator.

    Parameters
    ----------
    log_probs : (m, d) → (m, V') log-probabilities (a head's forward).
    h : (n, d) the rows.
    n_cols : V'.
    chunk : rows per forward call.

    Returns
    -------
    Spectrum with ``space="clr"``, ``route="gram"``, n_rows = n, n_cols = V', ``energy`` = ‖T‖_F²
    (fp64 sum of the rows' squared norms); exact (every singular value of T).
    """
    n = h.shape[0]
    no_target = torch.full((min(chunk, n),), -1, dtype=torch.long, device=h.device)
    energy = 0.0
    if n_cols <= n:
        acc = Gram(n_cols, space="clr", precision="fp64", device=h.device)
        for lo in range(0, n, chunk):
            z = log_probs(h[lo:lo + chunk])
            rows, stats = ops.transform_rows(z, no_target[:z.shape[0]], n_cols, "clr", True, torch.float64)
            energy += float(stats[:, 3].double().sum())
            acc.update(Chunk(stats, rows=rows))
    else:
        parts = []
        for lo in range(0, n, chunk):
            z = log_probs(h[lo:lo + chunk])
            rows, stats = ops.transform_rows(z, no_target[:z.shape[0]], n_cols, "clr", True, z.dtype)
            energy += float(stats[:, 3].double().sum())
            parts.append(rows)
        t = torch.cat(parts)
        del parts
        acc = Gram(n, space="clr", precision="fp64", device=h.device)
        for lo in range(0, n_cols, chunk):
            cols = t[:, lo:lo + chunk].T  # rows of Tᵀ
            acc.update(Chunk(cols.new_zeros(cols.shape[0], 4), rows=cols))
    return dataclasses.replace(acc.finalize(energy), n_rows=n, n_cols=n_cols)


def resolved_rank(spec: Spectrum) -> int:
    """#{σ_i > 1e-6·σ_1}: the singular values the Gram route resolves (it squares the condition
    number: an fp64 Gram resolves σ_i ≥ ~1e-7·σ_1), the floor of the numerical rank's candidates.
    Unlike the largest-gap numerical rank it counts a full-rank spectrum without a cliff as full."""
    s = spec.sigma
    return int((s > CLIFF_FLOOR * s[0]).sum()) if s.size and s[0] > 0 else 0


def output_rank_summary(spec: Spectrum) -> dict:
    """The scalar measures of an output spectrum stored per head (``estimate``'s result names)."""
    return {"numerical_rank": spec.numerical_rank, "resolved_rank": resolved_rank(spec),
            "threshold_rank": spec.threshold_rank,
            "rank_at_0.1": spec.rank_at(0.1), "rank_at_0.01": spec.rank_at(0.01),
            "effective_rank": spec.effective_rank}
