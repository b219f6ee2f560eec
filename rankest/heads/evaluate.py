from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from rankest.runtime import distributed

#: Elements of one logit chunk (rows × V'): bounds memory per head independently of the batch.
CHUNK_ELEMENTS = 1 << 23


# ---- evaluation ------------------------------------------------------------------------------
def _chunk_rows(n_cols: int) -> int:
    return max(16, CHUNK_ELEMENTS // max(1, n_cols))


def _logits(h: torch.Tensor, a: torch.Tensor, b: Optional[torch.Tensor], bias: Optional[torch.Tensor]) -> torch.Tensor:
    """(n, d) features → (n, V') logits of the head A·B (+ bias); b None means A is the full (V'×d) W."""
    z = h @ a.T if b is None else (h @ b.T) @ a.T
    return z if bias is None else z + bias


@torch.no_grad()
def evaluate_head(h: torch.Tensor, targets: torch.Tensor, a: torch.Tensor, b: Optional[torch.Tensor] = None,
                  bias: Optional[torch.Tensor] = None, *, teacher_weight: Optional[torch.Tensor] = None,
                  teacher_bias: Optional[torch.Tensor] = None) -> dict[str, float]:
    """Mean next-token cross-entropy (nats), top-1 accuracy (and KL to the teacher when its head is
    given) of a head over rows, computed in chunks of rows so memory stays O(chunk × V').

    h : (n, d) features; targets : (n,) int64 in [0, V'); a : (V', r) and b : (r, d), or a : (V', d)
    and b None for a dense head; bias : (V',) or None. Arithmetic in a's dtype.
    """
    sums = _eval_sums(h, targets, a, b, bias, teacher_weight=teacher_weight, teacher_bias=teacher_bias)
    return _eval_means(sums, h.shape[0], kl=teacher_weight is not None)


@torch.no_grad()
def _eval_sums(h: torch.Tensor, targets: torch.Tensor, a: torch.Tensor, b: Optional[torch.Tensor] = None,
               bias: Optional[torch.Tensor] = None, *, teacher_weight: Optional[torch.Tensor] = None,
               teacher_bias: Optional[torch.Tensor] = None) -> np.ndarray:
    """[Σ cross-entropy, Σ correct, Σ KL] over the rows (zeros for no rows): the sums that
    :func:`evaluate_head` divides, and that the processes of a torchrun job add up first."""
    dt = a.dtype
    step = _chunk_rows(a.shape[0])
    ce = correct = kl = 0.0
    for lo in range(0, h.shape[0], step):
        hc = h[lo:lo + step].to(dt)
        tc = targets[lo:lo + step].to(a.device)
        z = _logits(hc, a, b, bias)
        logq = torch.log_softmax(z, dim=-1)
        ce += float(-logq.gather(1, tc[:, None]).sum())
        correct += float((z.argmax(dim=-1) == tc).sum())
        if teacher_weight is not None:
            logp = torch.log_softmax(_logits(hc, teacher_weight.to(dt), None, teacher_bias), dim=-1)
            kl += float(F.kl_div(logq, logp, log_target=True, reduction="sum"))
    return np.array([ce, correct, kl])


def _eval_means(sums: np.ndarray, n: int, *, kl: bool) -> dict[str, float]:
    out = {"loss": float(sums[0]) / n, "accuracy": float(sums[1]) / n}
    if kl:
        out["kl"] = float(sums[2]) / n
    return out


def evaluate_heads(heads: Sequence[tuple], h: torch.Tensor, targets: torch.Tensor, *, world=None,
                   n_rows: Optional[int] = None, teacher_weight: Optional[torch.Tensor] = None,
                   teacher_bias: Optional[torch.Tensor] = None) -> list[dict[str, float]]:
    """:func:`evaluate_head` of several heads ``(a, b, bias)`` on this process's rows; under
    torchrun (``world`` active) the sums of every process are added (one all-reduce) and divided
    by ``n_rows``, the global row count, so every process gets the global means."""
    sums = np.array([_eval_sums(h, targets, *head, teacher_weight=teacher_weight, teacher_bias=teacher_bias)
                     for head in heads]).reshape(len(heads), 3)
    if world is not None:
        sums = distributed.all_sum(world, sums)
    n = h.shape[0] if n_rows is None else int(n_rows)
    return [_eval_means(s, n, kl=teacher_weight is not None) for s in sums]
