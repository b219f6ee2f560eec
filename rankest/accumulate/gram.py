import numpy as np
import torch

from rankest import ops
from rankest.accumulate.base import Chunk, ExactRoute, gram_noise_floor, row_precision
from rankest.linalg import eigvalsh_lower
from rankest.spectrum import Spectrum


def gram_nbytes(n_cols: int, *, on_gpu: bool = False) -> int:
    """Memory the `gram` route needs: the fp64 V'×V' Gram plus the final eigensolver's workspace.

    LAPACK's eigvalsh on the CPU needs about 3 more Gram-sized buffers (the matrix copy and the
    reduction to tridiagonal form); on a GPU, torch.linalg.eigvalsh (cuSOLVER syevd, values
    only) needs about one copy.
    """
    workspace = 1.0 if on_gpu else 3.0
    return int(8 * n_cols * n_cols * (1 + workspace))


class Gram(ExactRoute):
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
        self.inputs.saw(chunk.rows)
        ops.gram_update(self.gram, chunk.rows, self.precision)
        self.n_rows += chunk.n

    def finalize_cost(self) -> str:
        return (f"an eigvalsh of the {self.n_cols:,}×{self.n_cols:,} Gram (snapshots are taken up to 4096 columns; "
                "--route sketch has them for a small --rank-max)")

    def finalize(self, energy: float = float("nan")) -> Spectrum:
        # UPLO='L' reads only the lower triangle that gram_update maintains: no symmetrised copy.
        lam = eigvalsh_lower(self.gram)
        sigma = np.sqrt(np.clip(lam, 0.0, None))
        precision = row_precision(self.precision)
        return Spectrum(sigma=sigma, energy=energy, n_rows=self.n_rows, n_cols=self.n_cols, space=self.space,
                        route="gram", exact=True, precision=precision, row_precision=self.inputs.name,
                        noise_floor=gram_noise_floor(float(lam.max()) if lam.size else 0.0, self.n_cols, precision))

