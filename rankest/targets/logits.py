"""Targets of precomputed rows: an N×V file of logits or log-probs, or chunks made in memory.

    python -m rankest estimate --teacher logits:runs/logits.npy --space clr --out runs/file
    python -m rankest estimate --teacher logits:scores.h5::val/logits --space prob --route sketch
    rankest.estimate(rows=[chunk_1, chunk_2, ...], space="clr")        # (n_i, V) tensors in memory

Any model of any domain (an image classifier's logits, an API's returned log-probs) gets the
same spectra, routes and reports as a language model: a row is turned into the target space by
the same ``ops.transform_rows`` (the centred log-probs of logits and of log-probs are equal, and
so are their softmaxes), without next-token targets (the NLL is not defined). The file is read
in units of ``chunk_rows`` rows (2^20 values, 4 MiB of fp32; at least 64 rows), never whole
(:class:`~rankest.sources.logits_file.LogitsFile`). ``--tokens N`` below the file's rows takes
a seeded uniform sample, streamed in random order so that every prefix (the convergence
snapshots) is a uniform subsample too; ``--tokens all`` takes every row in file order.
There is no head: the exact routes are ``gram`` (when V'² fits) and the ``sketch``.
"""

from __future__ import annotations

import hashlib
from typing import Any, Optional, Sequence

import numpy as np
import torch

from rankest import ops
from rankest.accumulate.base import Chunk
from rankest.errors import UserError
from rankest.sources.logits_file import LogitsFile
from rankest.targets.base import Target

#: Elements of one unit of rows (rows × V): 4 MiB of fp32, whatever V (the chunk, its target-space
#: rows and their fp64 products then stay near 16 MiB in all).
UNIT_ELEMENTS = 1 << 20


def chunk_rows_for(n_cols: int) -> int:
    """Rows per unit for V = ``n_cols`` columns: UNIT_ELEMENTS elements, between 64 and 16384 rows."""
    return max(64, min(16384, UNIT_ELEMENTS // max(1, n_cols)))


class InMemoryRows:
    """Chunks of rows made in memory, read like a :class:`LogitsFile` (``read(start, stop)``)."""

    format = "memory"

    def __init__(self, chunks) -> None:
        if isinstance(chunks, (torch.Tensor, np.ndarray)):
            chunks = [chunks]
        self.parts = [torch.as_tensor(c) for c in chunks]
        if not self.parts:
            raise UserError("rows= holds no chunk; give a 2-D tensor or a sequence of (n_i, V) tensors.")
        widths = {tuple(p.shape[1:]) for p in self.parts}
        if any(p.dim() != 2 for p in self.parts) or len(widths) != 1:
            raise UserError(f"rows= must be 2-D chunks of one width V, got shapes "
                            f"{sorted({tuple(p.shape) for p in self.parts})[:4]}; reshape them to (n_i, V).")
        if any(not p.is_floating_point() for p in self.parts):
            raise UserError("rows= must hold floating-point logits or log-probs.")
        self.n_cols = int(self.parts[0].shape[1])
        self.offsets = np.cumsum([0] + [int(p.shape[0]) for p in self.parts])
        self.n_rows = int(self.offsets[-1])
        if self.n_rows < 2 or self.n_cols < 1:
            raise UserError(f"rows= holds {self.n_rows} row(s) of width {self.n_cols}; a spectrum needs at least "
                            f"2 rows and 1 column.")
        self.path, self.key = "memory", None

    def read(self, start: int, stop: int) -> torch.Tensor:
        out = []
        for p, lo in zip(self.parts, self.offsets[:-1]):
            a, b = max(start, lo), min(stop, lo + p.shape[0])
            if a < b:
                out.append(p[a - lo:b - lo])
        return torch.cat(out).to("cpu")

    def read_rows(self, idx: np.ndarray) -> torch.Tensor:
        part = np.searchsorted(self.offsets, idx, side="right") - 1
        return torch.stack([self.parts[k][i - self.offsets[k]] for k, i in zip(part, idx)]).to("cpu")

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for p in self.parts:
            h.update(p.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def close(self) -> None:
        pass


class LogitsTarget(Target):
    """Rows of logits or log-probs from a :class:`LogitsFile` or :class:`InMemoryRows`.

    Parameters
    ----------
    source : LogitsFile or InMemoryRows (n_rows × n_cols)
    space : str — target space of the rows
    tokens : int or None — rows to use (None: all, in order; fewer: a seeded uniform sample)
    seed : int — seed of that sample
    row_dtype : torch.dtype of the rows handed to the accumulators (fp64 sources give fp64)
    name : str — the label in results
    """

    unit = "row"
    uses_corpus = False  # the rows are the file's
    rows_stored = True  # --passes auto: accuracy-driven passes over the cached rows

    def __init__(self, source, *, space: str, tokens: Optional[int] = None, seed: int = 0,
                 row_dtype: Optional[torch.dtype] = None, name: str = "rows") -> None:
        self.source_rows, self.space = source, space
        self.name, self.source = name, str(source.path)
        self.n_cols = int(source.n_cols)
        total = int(source.n_rows)
        self.capped = tokens is not None and int(tokens) > total
        if tokens is None or int(tokens) >= total:
            self.order = None  # every row, in file order: read as ranges
            self.n_rows = total
        else:
            gen = np.random.default_rng(seed)
            self.order = gen.choice(total, size=int(tokens), replace=False)  # random order: uniform prefixes
            self.n_rows = int(tokens)
        self.chunk_rows = chunk_rows_for(self.n_cols)
        self.n_units = -(-self.n_rows // self.chunk_rows)
        stored64 = getattr(source, "dtype", "") == "fp64" or any(
            getattr(p, "dtype", None) == torch.float64 for p in getattr(source, "parts", []))
        self.row_dtype = row_dtype or (torch.float64 if stored64 else torch.float32)
        self.linear = None  # no head: the factor route does not apply

    @classmethod
    def open(cls, spec: str, cfg) -> "LogitsTarget":
        """``logits:PATH[::KEY]`` with ``cfg``'s space, tokens and seed."""
        path = spec.split(":", 1)[1]
        if not path:
            raise UserError("--teacher logits:PATH needs a file: logits:FILE.npy, logits:FILE.safetensors[::NAME] or "
                            "logits:FILE.h5[::DATASET].")
        return cls(LogitsFile.open(path), space=cfg.space, tokens=cfg.tokens, seed=cfg.seed, name=spec)

    def rows_before(self, j: int) -> int:
        return min(j * self.chunk_rows, self.n_rows)

    def derived(self) -> dict[str, Any]:
        h = hashlib.sha256(self.source_rows.fingerprint().encode())
        if self.order is not None:
            h.update(self.order.tobytes())
        return {"n_cols": self.n_cols, "n_rows": self.n_rows, "rows_sha256": h.hexdigest()}

    def chunk(self, j: int, needs: str) -> Chunk:
        a, b = self.rows_before(j), self.rows_before(j + 1)
        logits = self.source_rows.read(a, b) if self.order is None else self.source_rows.read_rows(self.order[a:b])
        no_target = torch.full((logits.shape[0],), -1, dtype=torch.int64)
        rows, stats = ops.transform_rows(logits, no_target, self.n_cols, self.space, True, self.row_dtype)
        if not bool(torch.isfinite(stats[:, 0]).all()):
            bad = int(torch.nonzero(~torch.isfinite(stats[:, 0]))[0, 0])
            where = a + bad if self.order is None else int(self.order[a + bad])
            raise UserError(f"row {where:,} of {self.source} holds NaN or Inf values (or only -inf); fix or drop it.")
        return Chunk(stats=stats, rows=rows)

    def meta(self) -> dict[str, Any]:
        out = {"teacher": self.name, "teacher_source": self.source, "rows_total": int(self.source_rows.n_rows),
               "rows_order": "file order" if self.order is None else "seeded uniform sample, random order"}
        if getattr(self.source_rows, "dtype", None):
            out["stored_dtype"] = self.source_rows.dtype
        return out

    def close(self) -> None:
        self.source_rows.close()


def rows_target(rows: Sequence, cfg) -> LogitsTarget:
    """The target of ``rankest.estimate(rows=...)``: chunks of logits or log-probs in memory."""
    return LogitsTarget(InMemoryRows(rows), space=cfg.space, tokens=cfg.tokens, seed=cfg.seed, name="rows")
