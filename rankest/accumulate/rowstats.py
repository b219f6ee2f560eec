import math

import numpy as np
import torch

from rankest.accumulate.base import Accumulator, Chunk
from rankest.errors import UserError


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

    def check_finite(self, where: str) -> None:
        """Refuse (UserError) rows whose energy ‖T‖_F² summed to NaN or infinity: logits beyond
        the range of the arithmetic (a head scaled by 1e37: ‖t‖² overflows fp32) or a NaN in the
        teacher, which would otherwise give an off-model energy of 1 or fail in the eigensolver.
        (The entropy is not checked: an MLE n-gram's zero probabilities leave it NaN by design.)"""
        energy = float(self.sums[0])
        if not math.isfinite(energy):
            raise UserError(f"the target's rows hold NaN or infinite values ({where}: ‖T‖_F² = {energy:.3g}): the "
                            f"teacher's logits overflow the arithmetic or hold NaN; check its weights (their scale) "
                            f"and --dtype.")

    @property
    def energy(self) -> float:
        return float(self.sums[0])

    def summary(self) -> dict[str, float]:
        energy, nll_sum, nll_n, ent_sum = (float(x) for x in self.sums.cpu())
        nll = nll_sum / nll_n if nll_n else float("nan")
        return {"energy": energy, "nll": nll, "perplexity": float(np.exp(nll)) if nll_n else float("nan"),
                "entropy": ent_sum / self.n_rows if self.n_rows else float("nan"), "n_rows": self.n_rows}
