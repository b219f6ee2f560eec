import hashlib
import math
import warnings
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from rankest.errors import UserError

_RANDPERM_MAX = 1 << 24  # candidates up to which a full permutation (8 bytes each) is drawn


@dataclass
class RowPlan:
    """Which contexts become rows.

    Attributes
    ----------
    windows : LongTensor of shape (W',)
        Indices into the packed windows, in a seeded random order: every prefix of the plan
        is a uniform random subsample of the windows that hold rows.
    positions : BoolTensor of shape (W', seq_len)
        ``positions[k, j]``: position ``j`` of window ``windows[k]`` is a row (its context is
        ``w[:j + 1]``, its target ``w[j + 1]``).
    n_rows : int
        ``positions.sum()``.
    """

    windows: torch.Tensor
    positions: torch.Tensor
    n_rows: int

    def rows_before(self) -> torch.Tensor:
        """LongTensor (W' + 1,): rows in the first k windows of the plan, for prefixes."""
        counts = self.positions.sum(dim=1)
        return torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])


def _position_mask(positions: str, seq_len: int) -> torch.Tensor:
    """(seq_len,) bool mask of the positions a window offers as candidates."""
    text = positions.strip().lower()
    mask = torch.zeros(seq_len, dtype=torch.bool)
    if text == "all":
        mask[:] = True
    elif text == "last":
        mask[-1] = True
    elif text.startswith("stride:"):
        try:
            k = int(text.split(":", 1)[1])
        except ValueError:
            k = 0
        if k < 1:
            raise UserError(f"--positions {positions}: the stride must be a positive integer, e.g. stride:64")
        # Counted back from the last position, so stride:1 is all and the last is always in.
        mask[torch.arange(seq_len - 1, -1, -k)] = True
    else:
        raise UserError(f"unknown --positions {positions!r}; use all, last or stride:K")
    return mask


def _sample_without_replacement(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """k distinct integers of [0, n), uniformly over k-subsets (unsorted order not meaningful).

    A permutation when it is small; otherwise draw with replacement, deduplicate and
    subsample — exchangeable in the items, hence uniform over k-subsets — so that memory
    is O(k) rather than O(n).
    """
    if n <= _RANDPERM_MAX or 2 * k > n:
        return torch.randperm(n, generator=gen)[:k]
    chosen = torch.empty(0, dtype=torch.long)
    while chosen.numel() < k:
        need = k - chosen.numel()
        draw = torch.randint(n, (need + need // 8 + 16,), generator=gen)
        chosen = torch.unique(torch.cat([chosen, draw]))
    return chosen[torch.randperm(chosen.numel(), generator=gen)[:k]]


def plan_rows(
    n_windows: int,
    seq_len: int,
    *,
    positions: str = "all",
    tokens: int | None = None,
    seed: int = 0,
    allow_fewer: bool = False,
    sample: str = "windows",
) -> RowPlan:
    """Choose the rows (contexts) of a run.

    Parameters
    ----------
    n_windows, seq_len : int
        Shape of the packed windows' inputs (W, L).
    positions : {"all", "last", "stride:K"}
        Candidate positions of each window; ``stride:K`` takes L-1, L-1-K, L-1-2K, …
    tokens : int, optional
        Draw this many rows uniformly without replacement among all candidates (default:
        every candidate).
    seed : int
        Seeds a private ``torch.Generator``: the same seed gives the same plan.
    allow_fewer : bool
        When ``tokens`` exceeds the candidates, use them all with a warning instead of raising.
    sample : {"windows", "rows"}
        ``windows`` (default): windows are drawn uniformly without replacement, in a seeded
        random order, and all their candidate positions are rows, until ``tokens`` rows
        (the last window contributes a seeded random subset of its positions). The teacher
        then runs on ≈ tokens / positions-per-window windows: the cost of one forward pass
        over N tokens. ``rows``: every candidate row is equally likely and rows are
        independent of their windows — a simple random sample of contexts, but the windows
        forwarded grow to min(W, N), up to seq_len times the cost.

    Returns
    -------
    RowPlan
    """
    if n_windows < 1:
        raise UserError("the corpus gives no windows; use a bigger corpus or a smaller --seq-len")
    mask = _position_mask(positions, seq_len)
    slots = torch.nonzero(mask).flatten()  # (P,) candidate positions of one window
    per_window = slots.numel()
    n_candidates = n_windows * per_window
    gen = torch.Generator().manual_seed(int(seed))
    if tokens is not None:
        if tokens < 1:
            raise UserError(f"--tokens must be at least 1, got {tokens}")
        if tokens > n_candidates:
            message = (
                f"--tokens {tokens} asks for more rows than the {n_candidates} candidates "
                f"({n_windows} windows × {per_window} positions with --positions {positions})"
            )
            if not allow_fewer:
                raise UserError(
                    f"{message}; use a bigger corpus, --positions all or a longer --seq-len, "
                    f"or ask for at most {n_candidates} tokens"
                )
            warnings.warn(f"{message}: using all {n_candidates}", stacklevel=2)
            tokens = None
    if tokens is None:
        order = torch.randperm(n_windows, generator=gen)
        return RowPlan(order, mask.expand(n_windows, seq_len).clone(), n_candidates)
    if sample == "windows":
        order = torch.randperm(n_windows, generator=gen)
        n_full, rest = divmod(tokens, per_window)
        used = order[: n_full + (rest > 0)]
        plan_mask = mask.expand(used.numel(), seq_len).clone()
        if rest:
            keep = slots[torch.randperm(per_window, generator=gen)[:rest]]
            plan_mask[-1] = False
            plan_mask[-1, keep] = True
        return RowPlan(used, plan_mask, tokens)
    if sample != "rows":
        raise UserError(f"unknown sampling unit {sample!r}; use windows or rows")
    picked = _sample_without_replacement(n_candidates, tokens, gen)
    window_of = picked // per_window
    used, inverse = torch.unique(window_of, return_inverse=True)  # sorted distinct windows
    order = torch.randperm(used.numel(), generator=gen)  # random order of the windows used
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel())
    plan_mask = torch.zeros(used.numel(), seq_len, dtype=torch.bool)
    plan_mask[rank[inverse], slots[picked % per_window]] = True
    return RowPlan(used[order], plan_mask, tokens)


# --- batches -------------------------------------------------------------------------------
@dataclass
class Batch:
    """One batch of the plan: B windows, inputs and targets of length L.

    ``input_ids`` (B, L) int64, ``targets`` (B, L) int64 (``targets[:, j]`` is the token after
    ``input_ids[:, :j + 1]``), ``mask`` (B, L) bool (which positions are rows), ``windows``
    (B,) int64 indices into the packed windows, ``start`` the offset of this batch in the plan.
    """

    input_ids: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor
    windows: torch.Tensor
    start: int

    @property
    def n_rows(self) -> int:
        return int(self.mask.sum())


def iter_batches(windows: torch.Tensor, plan: RowPlan, batch_size: int, *, start: int = 0) -> Iterator[Batch]:
    """Walk the plan in order, ``batch_size`` windows at a time.

    Parameters
    ----------
    windows : LongTensor of shape (W, L + 1)
        From :func:`pack_windows`.
    plan : RowPlan
    batch_size : int
    start : int
        Skip the first ``start`` windows of the plan (to resume).
    """
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    if plan.positions.shape[1] != windows.shape[1] - 1:
        raise ValueError(
            f"plan for seq_len {plan.positions.shape[1]} used with windows of length {windows.shape[1]}"
        )
    for lo in range(start, plan.windows.numel(), batch_size):
        idx = plan.windows[lo : lo + batch_size]
        block = windows[idx]
        yield Batch(block[:, :-1], block[:, 1:], plan.positions[lo : lo + batch_size], idx, lo)


def rows_fingerprint(windows: torch.Tensor, plan) -> str:
    """sha256 of the sampled windows' tokens and the plan's row positions: the rows themselves."""
    h = hashlib.sha256()
    h.update(windows[plan.windows].contiguous().numpy().tobytes())
    h.update(plan.positions.contiguous().numpy().tobytes())
    return h.hexdigest()


def windows_needed(tokens: Optional[int], seq_len: int, positions: str) -> Optional[int]:
    """Windows to tokenise for a plan of ``tokens`` rows: a pool of at least 8× the sample (and
    2^20 rows), so that the seeded sample is drawn from far more contexts than it takes; None
    (the whole corpus) for ``tokens=None``. The one formula of every command that plans rows."""
    if tokens is None:
        return None
    return math.ceil(max(8 * int(tokens), 2**20) / rows_per_window(positions, seq_len))


def rows_per_window(positions: str, seq_len: int) -> int:
    """Rows a window of ``seq_len`` tokens gives under ``positions`` (all | last | stride:K)."""
    return int(_position_mask(positions, seq_len).sum())
