"""The Accumulator interface: streaming, mergeable summaries of the target matrix T (N × V').

Every route of ``estimate`` is an accumulator, and every accumulator has one small interface:

* ``update(chunk)``   — consume a :class:`Chunk` of rows (never keeps the rows);
* ``merge(other)``    — add another accumulator's state (shards, processes);
* ``state()`` / ``load_state(state)`` — a dict of numpy arrays, written to HDF5 by checkpoints
  and summed over processes entry by entry (all but ``fixed_state_keys``);
* ``finalize(energy)`` → :class:`~rankest.spectrum.Spectrum`, without changing the state
  (so convergence snapshots can finalize a prefix and go on);
* ``needs`` — what a chunk must carry for it: ``"rows"`` (target-space rows), ``"features"``
  (a linear-head teacher's features) or ``"sparse"`` (CSR rows of a count-based target).

The routes (one file each): :class:`~rankest.accumulate.rowstats.RowStats` (‖T‖_F² and the
teacher's NLL, entropy), :class:`~rankest.accumulate.gram.Gram` (exact V'×V' Gram),
:class:`~rankest.accumulate.factor.Factor` (exact, from two d×d factors),
:class:`~rankest.accumulate.sketch.Sketch` (single-pass Nyström),
:class:`~rankest.accumulate.sparse_gram.SparseGram` (exact Gram of sparse n-gram rows) and
:class:`~rankest.accumulate.anisotropy.Anisotropy` (per-layer representation sums). Gram and
Factor share :class:`ExactRoute` (a plain sum plus the inputs' precision). A new route is a new
accumulator, nothing else (docs/design.md, "Accumulators").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from rankest.spectrum import Spectrum


@dataclass
class SparseRows:
    """n rows x_r = d_r + α_r·1 in CSR form: d_r sparse, α_r a constant over every column.

    crow : (n+1,) int64 row pointers; col : (nnz,) int64 column of each entry; val : (nnz,)
    float64 entries of d_r; alpha : (n,) float64 — the rows of a smoothed count-based model
    (:mod:`rankest.targets.ngram`), which are dense only through their constant.
    """

    crow: np.ndarray
    col: np.ndarray
    val: np.ndarray
    alpha: np.ndarray

    @property
    def n(self) -> int:
        return int(self.alpha.shape[0])

    def slice(self, start: int, stop: int) -> "SparseRows":
        lo, hi = int(self.crow[start]), int(self.crow[stop])
        return SparseRows(self.crow[start:stop + 1] - lo, self.col[lo:hi], self.val[lo:hi], self.alpha[start:stop])


@dataclass
class Chunk:
    """A chunk of n target rows, as a target produces it.

    stats : (n, 4) float32/float64 — ``ops.reference.STAT_NAMES`` (logsumexp, entropy, nll, sq_norm)
    rows : (n, V') — target-space rows, or None when no route needs them
    features : (n, d) — the teacher's final features (input of its head), or None
    sparse : the rows as :class:`SparseRows`, or None
    """

    stats: torch.Tensor
    rows: Optional[torch.Tensor] = None
    features: Optional[torch.Tensor] = None
    sparse: Optional[SparseRows] = None

    @property
    def n(self) -> int:
        return int(self.stats.shape[0])

    def slice(self, start: int, stop: int) -> "Chunk":
        cut = lambda t: None if t is None else t[start:stop]  # noqa: E731
        return Chunk(self.stats[start:stop], cut(self.rows), cut(self.features),
                     None if self.sparse is None else self.sparse.slice(start, stop))


class Accumulator:
    """Base class: the interface every route implements."""

    name = "base"
    #: What a chunk must carry for ``update``: "rows", "features" or "sparse".
    needs = "rows"
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
    #: shard; every other entry is a sum over rows, which is how rankest.runtime.distributed reduces states.
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

    def finalize_cost(self) -> str:
        """What one finalize costs, in words: why convergence snapshots are skipped when not cheap."""
        return "a finalize"

    def nbytes(self) -> int:
        """Bytes held by the accumulator's state."""
        return sum(int(np.asarray(v).nbytes) for v in self.state().values())

    def _check_merge(self, other) -> None:
        if type(other) is not type(self):
            raise TypeError(f"cannot merge {type(other).__name__} into {type(self).__name__}")


def row_precision(gram_precision: str) -> str:
    """The Spectrum's ``precision`` of a route's products: fp64, or fp32 for ``fast``."""
    return "fp64" if gram_precision == "fp64" else "fp32"


#: Precisions a route's input (rows, or a linear head's features) can have, by state code.
INPUT_PRECISIONS = ("fp64", "fp32", "bf16", "fp16")
_DTYPE_PRECISION = {torch.float64: "fp64", torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
#: Unit round-off of each precision (the threshold rank's eps).
UNIT_ROUNDOFF = {"fp64": 2.0 ** -52, "fp32": 2.0 ** -23, "bf16": 2.0 ** -8, "fp16": 2.0 ** -11}


class InputPrecision:
    """The coarsest precision of the inputs (rows or features) an accumulator has seen.

    The threshold rank's eps follows the precision the rows actually had (fp32 rows of a CPU
    teacher carry fp32 round-off whatever the products' precision), so every exact route keeps
    it, in its checkpointed state too (``code``: an index of :data:`INPUT_PRECISIONS`, −1 none).
    """

    def __init__(self) -> None:
        self.name: Optional[str] = None

    def saw(self, t: Optional[torch.Tensor]) -> None:
        if t is None:
            return
        self.join(_DTYPE_PRECISION.get(t.dtype, "fp64"))

    def join(self, name: Optional[str]) -> None:
        if name is not None and (self.name is None or UNIT_ROUNDOFF[name] > UNIT_ROUNDOFF[self.name]):
            self.name = name

    @property
    def code(self) -> np.ndarray:
        return np.asarray(-1 if self.name is None else INPUT_PRECISIONS.index(self.name), dtype=np.int64)

    def load(self, code) -> None:
        c = int(np.asarray(code))
        self.name = INPUT_PRECISIONS[c] if 0 <= c < len(INPUT_PRECISIONS) else None


class ExactRoute(Accumulator):
    """An exact route whose state is one plain sum (``summed``): it also keeps the precision its
    inputs had (:class:`InputPrecision`, ``self.inputs``; subclasses call ``self.inputs.saw``),
    through merge, state and load_state — a fixed entry, equal on every shard, not summed."""

    fixed_state_keys = ("row_precision",)

    def __init__(self) -> None:
        super().__init__()
        self.inputs = InputPrecision()

    def merge(self, other: "ExactRoute") -> None:
        super().merge(other)
        self.inputs.join(other.inputs.name)

    def state(self) -> dict[str, np.ndarray]:
        return {**super().state(), "row_precision": self.inputs.code}

    def load_state(self, state) -> None:
        super().load_state(state)
        if "row_precision" in state:  # states written before rankest kept it
            self.inputs.load(state["row_precision"])


def gram_noise_floor(lam_max: float, n: int, precision: str) -> float:
    """σ at or below which a spectrum computed from an n×n Gram is round-off.

    The eigenvalues of a Gram whose products had unit round-off u are resolved to about
    n·u·λ_max (the matrix_rank rule applied to the Gram itself), so the singular values below
    sqrt(n·u·λ_max) — e.g. the ≈ sqrt(u)·σ_1 square roots of a rank-deficient Gram's round-off
    eigenvalues — are not values of T.
    """
    return float(np.sqrt(max(lam_max, 0.0) * n * UNIT_ROUNDOFF[precision]))
