"""The Target interface: what produces the rows of the target matrix T.

A target is a fixed, seeded plan of ``n_rows`` rows in ``n_units`` units (a teacher's batches,
an n-gram model's chunks of contexts, row ranges of a file of logits). The estimate pipeline
(:mod:`rankest.estimator.pipeline`) knows nothing else about it:

* ``chunk(j, needs)`` gives unit j's rows as a :class:`~rankest.accumulate.base.Chunk` with
  what the route's accumulator ``needs`` (``rows``, ``features`` or ``sparse``) and the row
  statistics (``stats``: logsumexp, entropy, NLL of the true next token — NaN without one —
  and the squared norm of the target-space row);
* ``rows_before(j)`` is the first global row of unit j: under torchrun, unit j goes to
  process j mod P, and the rows never depend on P;
* ``derived()`` fingerprints the rows and the model, so a checkpoint of other rows is refused;
* ``head()`` / ``linear`` tell whether the exact ``factor`` route applies (a linear head);
  ``gram_nbytes`` and ``gram_what`` size and describe the exact Gram for the route choice;
* ``accumulator(route, …)`` may replace the generic accumulator of a route (the n-gram target's
  sparse Gram), ``finish(spectrum)`` completes a finished spectrum (its own columns, meta),
  ``extra_accumulators`` are states that join the checkpoint and the all-reduce (the
  diagnostics of a neural teacher).

Targets: :class:`~rankest.targets.neural.NeuralTarget` (a causal LM over a corpus),
:class:`~rankest.targets.ngram.NgramTarget` (count-based n-gram models),
:class:`~rankest.targets.logits.LogitsTarget` (an N×V file of logits or log-probs, or chunks of
rows made in memory: :func:`~rankest.targets.logits.rows_target`).
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from rankest.accumulate.base import Accumulator, Chunk
from rankest.accumulate.gram import gram_nbytes
from rankest.spectrum import Spectrum


class Target:
    """Base class of every target (module docstring). Subclasses set the attributes in
    ``__init__`` and implement :meth:`chunk`, :meth:`rows_before` and :meth:`derived`."""

    #: Teacher label in results ("pythia-70m", "ngram:5", "logits:FILE").
    name: str = "target"
    #: Where the rows come from, for results' ``teacher_source``.
    source: str = ""
    #: V', the columns the accumulators see.
    n_cols: int
    #: Rows of the plan, and the units they come in.
    n_rows: int
    n_units: int
    #: Where the rows are made and accumulated, and their dtype.
    device: torch.device = torch.device("cpu")
    row_dtype: torch.dtype = torch.float32
    #: True / False when the target has a linear head (checked), None when it has none.
    linear: Optional[bool] = None
    #: A route precision the target imposes (n-gram rows are exact in fp64), or None for --gram-precision.
    precision: Optional[str] = None
    #: The unit of the progress bar and of --checkpoint-every.
    unit: str = "tok"
    #: Whether --passes ≥ 2 may re-read the rows through a row cache.
    supports_passes: bool = True
    #: Whether the rows are stored (a file, memory): making them again costs a read, not a model's
    #: forward, so ``--passes auto`` caches them and runs passes until the SVD's estimate meets tol.
    rows_stored: bool = False
    #: Whether the rows come from --corpus (results name it only then).
    uses_corpus: bool = True

    def rows_before(self, j: int) -> int:
        """First global row of unit j; ``n_rows`` for j ≥ ``n_units``."""
        raise NotImplementedError

    def chunk(self, j: int, needs: str) -> Chunk:
        """Unit j's rows, carrying what an accumulator that ``needs`` "rows" / "features" /
        "sparse" reads, and the row statistics."""
        raise NotImplementedError

    def derived(self) -> dict[str, Any]:
        """What the rows and the model resolved to (a checkpoint of other ones is refused)."""
        raise NotImplementedError

    def head(self):
        """(weight (V, d), bias (V,) or None) of a linear head (the factor route), or None."""
        return None

    def gram_nbytes(self, *, on_gpu: bool) -> int:
        """Memory of the exact Gram route for this target (Gram plus eigensolver workspace)."""
        return gram_nbytes(self.n_cols, on_gpu=on_gpu)

    def gram_what(self) -> str:
        """How the exact Gram is described in route reasons and refusals."""
        return f"the V'×V' fp64 Gram plus eigensolver workspace for V' = {self.n_cols:,}"

    def accumulator(self, route: str, *, precision: str, space: str) -> Optional[Accumulator]:
        """The accumulator of ``route`` when the target has its own (None: the generic one)."""
        return None

    def extra_accumulators(self) -> list[Accumulator]:
        """Accumulators the target feeds itself (in :meth:`chunk`) whose states join checkpoints."""
        return []

    def finish(self, spec: Spectrum) -> Spectrum:
        """Complete a finalized spectrum (a snapshot's too) with what only the target knows."""
        return spec

    def meta(self) -> dict[str, Any]:
        """Facts about the target for the spectrum's ``meta`` (results.json)."""
        return {"teacher": self.name, "teacher_source": self.source}

    def write(self, out, *, config: dict, prov: dict) -> None:
        """Files of the target's own beside the results in the run folder ``out`` (default none)."""

    def close(self) -> None:
        """Release files the target holds open."""
