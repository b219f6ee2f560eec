"""`RowCache`: target rows written once to HDF5, read again by the passes of a multi-pass SVD.

A neural teacher's rows cost a forward pass each time they are produced; the multi-pass
randomized SVD (``estimate --passes q``, :func:`rankest.linalg.randomized_svd`) needs them q
times. The first (teacher) pass appends every chunk of rows here; each pass of the SVD then
streams the file back in chunks. Disk: N·V'·(4 | 2) bytes (fp32 | fp16/bf16 on request) —
checked against the free space before the first row is written.

HDF5 layout: dataset ``rows`` (N, V'), contiguous and allocated when the file is created,
float32 / float16 natively; bfloat16 is stored as its raw 16 bits (int16) (attribute ``dtype =
"bf16"``), since HDF5 has no bf16 type. Allocated up front, appending rows writes raw data only,
never HDF5 metadata: a process killed mid-write leaves a readable file whose rows up to the last
:meth:`RowCache.sync` are intact, so a checkpointed run reopens it (``resume_rows``) and writes
on from there. Each sync also writes the SHA-256 of the rows so far (dataset ``seals``: two
alternating slots of 8 bytes of row count + 32 of digest, allocated up front like the rows), and
a reopen recomputes it over the rows the checkpoint counts: a cache damaged on disk is refused,
not streamed into the spectrum. Under torchrun every process caches its own shard (``rows.rank{r}.h5``). fp16 rows saturate beyond ±65504 and lose the smallest probabilities below ~6e-8
(subnormal); bf16 rows keep the range and carry 8 bits of mantissa (relative error ≤ 2⁻⁹).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Callable, Iterator, Optional

import h5py
import numpy as np
import torch

from rankest.errors import UserError
from rankest.io.h5 import check_sizes, os_error_text

CACHE_DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_H5_DTYPES = {"fp64": np.float64, "fp32": np.float32, "fp16": np.float16, "bf16": np.int16}


def resolve_cache_dtype(dtype: str, row_dtype: torch.dtype) -> str:
    """``auto``: the dtype of the rows themselves (bf16 rows stay bf16, fp64 rows fp64), else fp32."""
    if dtype != "auto":
        return dtype
    return {torch.float64: "fp64", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(row_dtype, "fp32")


def cache_nbytes(n_rows: int, n_cols: int, dtype: str) -> int:
    """Bytes the cached rows take on disk."""
    return int(n_rows) * int(n_cols) * CACHE_DTYPES[dtype].itemsize


class RowCache:
    """Append-only HDF5 file of target rows (n, V'), streamed back chunk by chunk.

    Parameters
    ----------
    path : file to create (replaced if it exists).
    n_cols : V'.
    n_rows : rows that will be appended (for the disk check and the preallocated dataset).
    dtype : {"fp64", "fp32", "fp16", "bf16"}, the dtype on disk.
    resume_rows : reopen the existing file (written by a run with the same n_rows, V' and dtype)
        and append after its first ``resume_rows`` rows, which a checkpoint vouched for.
    """

    def __init__(self, path, n_cols: int, n_rows: int, *, dtype: str = "fp32",
                 resume_rows: Optional[int] = None) -> None:

        if dtype not in CACHE_DTYPES:
            raise UserError(f"--row-cache-dtype must be one of {', '.join(CACHE_DTYPES)}, got {dtype!r}.")
        self.path, self.n_cols, self.capacity, self.dtype = Path(path), int(n_cols), int(n_rows), dtype
        if resume_rows is not None:
            self._reopen(int(resume_rows))
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        need = cache_nbytes(n_rows, n_cols, dtype)
        free = shutil.disk_usage(self.path.parent).free
        if need > 0.95 * free:
            raise UserError(f"the row cache of --passes needs {need / 2**30:.1f} GiB for {n_rows:,} rows × "
                            f"{n_cols:,} columns in {dtype}, but {self.path.parent} has {free / 2**30:.1f} GiB "
                            f"free; use --row-cache-dtype bf16, fewer --tokens, another --out, or --passes 1.")
        self._file = h5py.File(self.path, "w")
        # Contiguous storage allocated now (never filled: no N·V' write of zeros), so that later
        # appends touch raw data only and a kill cannot leave the HDF5 metadata half-written.
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
        dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
        self._rows = self._file.create_dataset("rows", shape=(max(1, self.capacity), self.n_cols),
                                               dtype=_H5_DTYPES[dtype], dcpl=dcpl)
        self._rows.attrs["dtype"] = dtype
        # Two (rows, sha256 of those rows) slots, written alternately by sync(): the checkpoint
        # that counts R rows was written after the slot for R, and the next sync overwrites the
        # other slot, so a reopen at R always finds R's digest (module docstring).
        self._seals = self._file.create_dataset("seals", shape=(2, 40), dtype=np.uint8, dcpl=dcpl)
        self._hash = hashlib.sha256()
        self._slot = 0
        self.n_rows = 0
        self.sync()

    def _reopen(self, rows: int) -> None:

        want = (max(1, self.capacity), self.n_cols)
        try:
            self._file = h5py.File(self.path, "r+")
            self._rows = self._file["rows"]
            found = (tuple(self._rows.shape), str(self._rows.attrs.get("dtype")))
            check_sizes(self._file, self.path, what="row cache", fix="delete the checkpoint and start afresh")
        except UserError:
            self._file.close()
            raise
        except (OSError, KeyError) as e:
            raise UserError(f"--resume: the row cache {self.path} of the checkpointed run is missing or unreadable "
                            f"({e}); delete the checkpoint and start afresh.") from e
        if found != (want, self.dtype) or not 0 <= rows <= self.capacity or "seals" not in self._file:
            self._file.close()
            raise UserError(f"--resume: the row cache {self.path} holds {found[0]} {found[1]} rows, not the "
                            f"checkpointed run's {want} {self.dtype}; delete the checkpoint and start afresh.")
        self._seals = self._file["seals"]
        self._hash = hashlib.sha256()
        for lo in range(0, rows, 4096):  # one read of the rows the checkpoint counts
            self._hash.update(np.ascontiguousarray(self._rows[lo:min(rows, lo + 4096)]).data)
        seals = {int(np.frombuffer(s[:8].tobytes(), np.int64)[0]): s[8:].tobytes() for s in self._seals[...]}
        if seals.get(rows) != self._hash.digest():
            self._file.close()
            raise UserError(f"--resume: the first {rows:,} rows of the row cache {self.path} are not those the "
                            f"checkpoint counted (their sha256 differs: damaged on disk); delete the checkpoint and "
                            f"start afresh.")
        self._slot = next(i for i, s in enumerate(self._seals[...])
                          if int(np.frombuffer(s[:8].tobytes(), np.int64)[0]) != rows or i == 1)
        self.n_rows = rows

    def sync(self) -> None:
        """Make the rows written so far durable (HDF5 flush, then fsync of the file): a checkpoint
        that counts them is written only after this returns."""
        try:
            self._file.flush()
            fd = os.open(self.path, os.O_RDONLY)
            try:
                os.fsync(fd)  # the rows first, then the seal that vouches for them
                self._seals[self._slot] = np.frombuffer(np.int64(self.n_rows).tobytes() + self._hash.digest(),
                                                        np.uint8)
                self._slot = 1 - self._slot
                self._file.flush()
            finally:
                os.close(fd)
            fd = os.open(self.path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            self._abandon()
            raise UserError(f"could not write the row cache {self.path}: {os_error_text(e)}; free space, or use "
                            f"--row-cache-dtype bf16, fewer --tokens or --passes 1.") from e

    # The accumulator interface the estimate loop feeds (the cache is written, not summed).
    cheap_finalize = False
    needs = "rows"  # what update() reads of a chunk (the Accumulator convention)

    def update(self, chunk) -> None:
        if chunk.rows is None:
            raise ValueError("the row cache needs target rows in every chunk")
        self.append(chunk.rows)

    def append(self, rows: torch.Tensor) -> None:
        """Write the next rows (n, V') of any float dtype, on any device."""
        if rows.dim() != 2 or rows.shape[1] != self.n_cols:
            raise ValueError(f"rows must have shape (n, {self.n_cols}), got {tuple(rows.shape)}")
        n = int(rows.shape[0])
        if self.n_rows + n > self.capacity:
            raise ValueError(f"the row cache holds {self.capacity} rows; {self.n_rows + n} were appended")
        t = rows.detach().to(CACHE_DTYPES[self.dtype]).cpu()
        a = t.view(torch.int16).numpy() if self.dtype == "bf16" else t.numpy()
        try:
            self._rows[self.n_rows:self.n_rows + n] = a
            self._hash.update(np.ascontiguousarray(a).data)
        except OSError as e:  # a full disk under a sparse preallocation: one sentence, the file closed now
            self._abandon()
            raise UserError(f"could not write the row cache {self.path}: {os_error_text(e)}; free space, or use "
                            f"--row-cache-dtype bf16, fewer --tokens or --passes 1.") from e
        self.n_rows += n

    def _abandon(self) -> None:
        """Close the file after a failed write, whatever HDF5 says (no handle left for the GC)."""
        try:
            self._file.close()
        except Exception:  # noqa: BLE001 - the write error is the one reported
            pass

    def close(self) -> None:
        if self._file.id.valid:
            self._file.flush()
            self._file.close()

    def stream(self, *, device, chunk_rows: Optional[int] = None,
               out_dtype: torch.dtype = torch.float32) -> Callable[[], Iterator[torch.Tensor]]:
        """A zero-argument callable that yields the cached rows in order, chunk by chunk, as
        ``out_dtype`` tensors on ``device`` (the stream :func:`rankest.linalg.randomized_svd`
        reads once per pass)."""
        self.close()
        path, n, dtype = self.path, self.n_rows, self.dtype
        rows_per = chunk_rows or max(256, (64 << 20) // max(1, self.n_cols * 4))

        def chunks() -> Iterator[torch.Tensor]:
            if n == 0:  # a shard without rows still yields V' (a distributed pass needs every process)
                yield torch.empty(0, self.n_cols, dtype=out_dtype, device=device)
                return
            with h5py.File(path, "r") as f:
                ds = f["rows"]
                for lo in range(0, n, rows_per):
                    a = ds[lo:min(n, lo + rows_per)]
                    t = torch.from_numpy(a)
                    if dtype == "bf16":
                        t = t.view(torch.bfloat16)
                    yield t.to(device=device).to(out_dtype)

        return chunks

    def remove(self) -> None:
        self.close()
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass
