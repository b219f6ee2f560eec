"""Non-finite values in a teacher's weights, found where the teacher is built and named there.

A NaN in one embedding row, a head row or a norm's weight otherwise passes silently into
every row that touches it: validation losses of ``nan``, anisotropy printing ``nan``, an
eigensolver or SVD that "did not converge", or a factor route refused for "soft-capping".
One pass of ``torch.isfinite`` over the parameters (a fraction of one forward pass) names the
tensor and its first bad row instead.
"""

from __future__ import annotations

import torch

from rankest.errors import UserError


def first_nonfinite(t: torch.Tensor) -> tuple[int, tuple[int, ...]] | None:
    """(count, index of the first) non-finite entries of ``t``, or None when all are finite."""
    bad = ~torch.isfinite(t.detach())
    if not bool(bad.any()):
        return None
    return int(bad.sum()), tuple(int(i) for i in bad.nonzero()[0])


def check_finite_tensor(t: torch.Tensor, what: str, fix: str) -> None:
    """Refuse (UserError) a tensor ``what`` with NaN or infinite entries, naming the first."""
    if not t.is_floating_point() or t.device.type == "meta":
        return
    found = first_nonfinite(t)
    if found is not None:
        n, idx = found
        where = f"row {idx[0]}" if t.dim() >= 2 else f"entry {idx[0] if idx else 0}"
        raise UserError(f"{what} holds {n:,} NaN or infinite values (the first at {where}); {fix}.")


def check_finite_weights(model: torch.nn.Module, name: str) -> None:
    """Refuse a model any of whose floating-point parameters or buffers holds NaN or infinity,
    naming the tensor (offloaded ``meta`` tensors are not read)."""
    fix = "its weights are damaged: download or save them again"
    for pname, p in list(model.named_parameters()) + list(model.named_buffers()):
        if "rotary" in pname or "inv_freq" in pname:  # derived buffers, not weights
            continue
        check_finite_tensor(p, f"the weight {pname} of teacher {name}", fix)
