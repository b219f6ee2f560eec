"""`FamilySweep`: heads of every family × rank × seed trained side by side on the rank sweep's batches.

The same single pass as :class:`~rankest.heads.sweep.HeadSweep`: each batch of frozen features
(and, for ``kl``, the teacher's log-probs of it) is read once per row chunk for every head; each
head has its own AdamW param groups (its LR; weight decay on its matrices only) and Pythia's
schedule; under torchrun the gradients are summed before every step. Replicates differ only
in their init seed (:func:`~rankest.heads.families.head_seed`): the batches are the run's, so the
spread over seeds is the init's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from rankest.heads.evaluate import CHUNK_ELEMENTS, _logits
from rankest.heads.families import FamilySpec, HeadFamily, head_seed, make_head
from rankest.heads.sweep import AdamWHeads
from rankest.runtime import distributed


@dataclass
class FamilyHeadSpec:
    """One head of a families run: its family, the nominal rank it is compared at (``label``,
    the linear rank whose parameter count it matches with ``--match-params``), its own rank,
    its replicate (seed index) and peak LR."""

    family: FamilySpec
    label: str
    nominal_rank: int
    rank: int
    replicate: int
    lr: float


class FamilySweep(AdamWHeads):
    """Heads of :mod:`rankest.heads.families` trained together on shared batches.

    Parameters
    ----------
    specs : the heads.
    d, n_cols : feature width and V'.
    init : ``--init``; ``linear`` heads follow it (``svd`` takes ``svd_factors[rank]``), the others
        start from their variance-preserving init.
    bias : the teacher's head bias over V' (heads then carry a bias; ``svd`` starts from it), or None.
    """

    def __init__(self, specs: Sequence[FamilyHeadSpec], *, d: int, n_cols: int, init: str, seed: int, steps: int,
                 device: torch.device, dtype: torch.dtype = torch.float32, svd_factors: Optional[dict] = None,
                 bias: Optional[torch.Tensor] = None, objective: str = "ce", weight_decay: float = 0.01,
                 betas: tuple[float, float] = (0.9, 0.95), world=None) -> None:
        self.specs, self.world, self.objective = list(specs), world, objective
        self.steps, self.n_cols, self.dtype = int(steps), int(n_cols), dtype
        self.heads: list[HeadFamily] = []
        groups = []
        for sp in self.specs:
            head = make_head(sp.family, d, n_cols, sp.rank, bias=bias is not None)
            gen = torch.Generator().manual_seed(head_seed(seed, sp.family.label, sp.rank, sp.replicate))
            head.reset(gen, init, None if svd_factors is None else svd_factors.get(sp.rank),
                       None if bias is None else bias.double())
            head.to(device=device, dtype=dtype)
            self.heads.append(head)
            mats = {id(p) for p in head.weights()}
            groups.append({"params": head.weights(), "lr": sp.lr, "weight_decay": weight_decay})
            groups.append({"params": [p for p in head.parameters() if id(p) not in mats], "lr": sp.lr,
                           "weight_decay": 0.0})
        self._build_optimizer([g for g in groups if g["params"]], weight_decay, betas)
        widest = max([h.width for h in self.heads] + [1])
        self.chunk = max(16, CHUNK_ELEMENTS // max(1, n_cols * widest))

    def n_params(self) -> list[int]:
        return [h.n_params() for h in self.heads]

    def _teacher_logp(self, hc, teacher_weight, teacher_bias):
        if self.objective != "kl":
            return None
        with torch.no_grad():
            return torch.log_softmax(_logits(hc, teacher_weight.to(self.dtype), None, teacher_bias), -1)

    def step(self, h: torch.Tensor, targets: torch.Tensor, teacher_weight: Optional[torch.Tensor] = None,
             teacher_bias: Optional[torch.Tensor] = None, *, n_rows: Optional[int] = None) -> np.ndarray:
        """One AdamW step of every head on the rows; returns each head's mean training loss
        (before the step). Under torchrun, ``n_rows`` is the batch's global row count."""
        n = h.shape[0] if n_rows is None else int(n_rows)
        losses = np.zeros(len(self.heads))
        self.optimizer.zero_grad(set_to_none=True)
        for lo in range(0, h.shape[0], self.chunk):
            hc, tc = h[lo:lo + self.chunk].to(self.dtype), targets[lo:lo + self.chunk]
            logp = self._teacher_logp(hc, teacher_weight, teacher_bias)
            for i, head in enumerate(self.heads):
                logq = head(hc)
                if logp is None:
                    loss = F.nll_loss(logq, tc, reduction="sum")
                else:
                    loss = F.kl_div(logq, logp, log_target=True, reduction="sum")
                (loss / n).backward()
                losses[i] += float(loss.detach()) / n
        return self._apply_step(losses)

    @torch.no_grad()
    def evaluate(self, h: torch.Tensor, targets: torch.Tensor, *, n_rows: Optional[int] = None,
                 teacher_weight: Optional[torch.Tensor] = None,
                 teacher_bias: Optional[torch.Tensor] = None) -> list[dict[str, float]]:
        """Mean cross-entropy, top-1 accuracy (and KL(teacher ‖ head) for ``kl``) of every head on the
        rows (this process's shard under torchrun, summed over the processes; ``n_rows`` the global count)."""
        sums = np.zeros((len(self.heads), 3))
        for lo in range(0, h.shape[0], self.chunk):
            hc, tc = h[lo:lo + self.chunk].to(self.dtype), targets[lo:lo + self.chunk]
            logp = self._teacher_logp(hc, teacher_weight, teacher_bias)
            for i, head in enumerate(self.heads):
                logq = head(hc)
                sums[i, 0] += float(-logq.gather(1, tc[:, None]).sum())
                sums[i, 1] += float((logq.argmax(-1) == tc).sum())
                if logp is not None:
                    sums[i, 2] += float(F.kl_div(logq, logp, log_target=True, reduction="sum"))
        if self.world is not None:
            sums = distributed.all_sum(self.world, sums)
        n = h.shape[0] if n_rows is None else int(n_rows)
        out = []
        for s in sums:
            e = {"loss": s[0] / n, "accuracy": s[1] / n}
            if self.objective == "kl":
                e["kl"] = s[2] / n
            out.append(e)
        return out
