from typing import Sequence

import numpy as np
import torch

from rankest import ops
from rankest.accumulate.base import Accumulator
from rankest.errors import UserError
from rankest.linalg import eigh_lower


# ---- anisotropy ------------------------------------------------------------------------------
class Anisotropy(Accumulator):
    """Streaming, mergeable per-layer anisotropy, mean norm and first-principal-direction share.

    State per layer l (width d_l; layers may differ in width): the fp64 sums Σĥ (d_l,), Σh
    (d_l,), Σ‖h‖, the count of non-zero rows, and — with ``pca`` — the fp64 Gram Σ h hᵀ
    (d_l × d_l, lower triangle, :func:`rankest.ops.gram_update`). Every piece is a plain sum
    over rows, so ``merge`` adds and the result does not depend on the chunking.

    Zero vectors have no direction: they are left out of the anisotropy (n counts the non-zero
    rows of the layer) but kept in the mean norm and the covariance.

    Parameters
    ----------
    widths : sequence of int
        d_l of each representation, embeddings first (L + 1 entries for L blocks).
    pca : bool
        Keep the per-layer Gram for the variance share of the first principal direction.
        Memory 8·Σ d_l² bytes (SmolLM2-135M: 31 × 576² → 82 MB; Pythia-6.9B: 33 × 4096² → 4.4 GB).
    device : torch.device or str
    """

    name = "anisotropy"
    fixed_state_keys = ("widths",)

    def __init__(self, widths: Sequence[int], *, pca: bool = True, device="cpu") -> None:
        super().__init__()
        if len(widths) < 1:
            raise ValueError("Anisotropy needs at least one layer")
        self.widths = [int(w) for w in widths]
        self.pca = bool(pca)
        f64 = dict(dtype=torch.float64, device=device)
        self.unit_sum = [torch.zeros(w, **f64) for w in self.widths]
        self.vec_sum = [torch.zeros(w, **f64) for w in self.widths]
        self.gram = [torch.zeros(w, w, **f64) for w in self.widths] if self.pca else []
        # [Σ‖h‖, number of non-zero rows] per layer.
        self.counts = torch.zeros(len(self.widths), 2, **f64)

    @property
    def n_layers(self) -> int:
        return len(self.widths)

    def update(self, layers: Sequence[torch.Tensor]) -> None:
        """Add n rows of every layer.

        layers : sequence of (n, d_l) tensors (any float dtype), the same n rows in every layer.
        """
        if len(layers) != self.n_layers:
            raise ValueError(f"expected {self.n_layers} layers, got {len(layers)}")
        n = int(layers[0].shape[0])
        for l, h in enumerate(layers):
            if h.dim() != 2 or h.shape[1] != self.widths[l] or h.shape[0] != n:
                raise ValueError(f"layer {l}: expected ({n}, {self.widths[l]}), got {tuple(h.shape)}")
            x = h.to(device=self.unit_sum[l].device, dtype=torch.float64)
            norm = torch.linalg.vector_norm(x, dim=1)
            nonzero = norm > 0
            # Σĥ = (1/‖h‖)ᵀ·H as one matrix-vector product (no n×d copy of unit vectors); a zero
            # row gets weight 0 and contributes nothing.
            inv = torch.where(nonzero, 1.0 / torch.where(nonzero, norm, 1.0), 0.0)
            self.unit_sum[l] += inv @ x
            self.vec_sum[l] += x.sum(dim=0)
            self.counts[l, 0] += norm.sum()
            self.counts[l, 1] += nonzero.sum()
            if self.pca:
                ops.gram_update(self.gram[l], x, "fp64")
        self.n_rows += n

    def _tensors(self) -> dict[str, torch.Tensor]:
        out = {"counts": self.counts}
        for l in range(self.n_layers):
            out[f"unit_sum_{l}"] = self.unit_sum[l]
            out[f"vec_sum_{l}"] = self.vec_sum[l]
            if self.pca:
                out[f"gram_{l}"] = self.gram[l]
        return out

    def merge(self, other: "Anisotropy") -> None:
        self._check_merge(other)
        if other.widths != self.widths or other.pca != self.pca:
            raise ValueError("cannot merge anisotropy accumulators of different layer widths or pca settings")
        theirs = other._tensors()
        for key, mine in self._tensors().items():
            mine += theirs[key].to(mine.device)
        self.n_rows += other.n_rows

    def nbytes(self) -> int:
        """Bytes of the state where it lives (without copying it to the host, as state() would)."""
        return sum(t.numel() * t.element_size() for t in self._tensors().values())

    def state(self) -> dict[str, np.ndarray]:
        out = {k: v.cpu().numpy() for k, v in self._tensors().items()}
        out["widths"] = np.asarray(self.widths, dtype=np.int64)
        out["n_rows"] = np.asarray(self.n_rows)
        return out

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        if [int(w) for w in np.asarray(state["widths"])] != self.widths:
            raise ValueError("the saved anisotropy state has other layer widths")
        for key, mine in self._tensors().items():
            mine.copy_(torch.as_tensor(np.asarray(state[key])))
        self.n_rows = int(np.asarray(state["n_rows"]))

    def finalize(self) -> dict[str, np.ndarray]:
        """Per-layer results (embeddings first), without changing the state.

        Returns
        -------
        dict with (L + 1,) float64 arrays ``anisotropy`` (A(H), NaN for a layer with < 2
        non-zero rows), ``depth`` (l / L), ``mean_norm`` (mean ‖h‖), ``pc1_variance_share``
        (λ_max / trace of the covariance Σhhᵀ/n − μμᵀ, NaN without ``pca``), ``width`` (d_l)
        and ``n_rows``.
        """
        if self.n_rows < 2:
            raise UserError(f"anisotropy needs at least 2 representations per layer, got {self.n_rows}; "
                            "raise --tokens")
        bad = [k for k, v in self._tensors().items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            raise UserError(f"the teacher's hidden states hold NaN or infinite values (their sums {', '.join(bad)} are "
                            f"not finite after {self.n_rows:,} rows); check its weights and --dtype")
        n_layers = self.n_layers
        aniso = np.full(n_layers, np.nan)
        share = np.full(n_layers, np.nan)
        counts = self.counts.cpu().numpy()
        for l in range(n_layers):
            m = counts[l, 1]
            if m >= 2:
                s2 = float(torch.dot(self.unit_sum[l], self.unit_sum[l]))
                aniso[l] = (s2 - m) / (m * m - m)
            if self.pca:
                share[l] = self._pc1_share(l)
        depth = np.arange(n_layers, dtype=np.float64) / max(n_layers - 1, 1)
        return {
            "anisotropy": aniso,
            "depth": depth,
            "mean_norm": counts[:, 0] / self.n_rows,
            "pc1_variance_share": share,
            "width": np.asarray(self.widths, dtype=np.int64),
            "n_rows": np.asarray(self.n_rows, dtype=np.int64),
        }

    def _pc1_share(self, l: int) -> float:
        # Covariance from the raw moments in fp64: C = G/n − μμᵀ. The cancellation costs
        # ≈ 1e-16·‖μ‖²/var relative — negligible unless the spread is 1e-8 of the mean's norm.
        n = float(self.n_rows)
        mu = self.vec_sum[l].cpu() / n
        # Only the lower triangle of the Gram is defined (gram_update); eigh_lower reads only it.
        lam, _ = eigh_lower(self.gram[l].cpu() / n - torch.outer(mu, mu))
        lam = lam.clamp_min(0)
        total = float(lam.sum())
        return float(lam[-1]) / total if total > 0 else float("nan")
