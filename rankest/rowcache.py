"""`RowCache`: target rows written once to HDF5, read again by the passes of a multi-pass SVD.

A neural teacher's rows cost a forward pass each time they are produced; the multi-pass
randomized SVD (``estimate --passes q``, :func:`rankest.linalg.randomized_svd`) needs them q
times. The first (teacher) pass appends every chunk of rows here; each pass of the SVD then
streams the file back in chunks. Disk: N·V'·(4 | 2) bytes (fp32 | fp16/bf16 on request) —
checked against the free space before the first row is written.

HDF5 layout: dataset ``rows`` (N, V'), chunked by row blocks, float32 / float16 natively;
bfloat16 is stored as its raw 16 bits (int16) (attribute ``dtype = "bf16"``), since HDF5 has no
bf16 type. fp16 rows saturate beyond ±65504 and lose the smallest probabilities below ~6e-8
(subnormal); bf16 rows keep the range and carry 8 bits of mantissa (relative error ≤ 2⁻⁹).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from .errors import UserError

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
    dtype : {"fp32", "fp16", "bf16"}, the dtype on disk.
    """

    def __init__(self, path, n_cols: int, n_rows: int, *, dtype: str = "fp32") -> None:
        import h5py

        if dtype not in CACHE_DTYPES:
            raise UserError(f"--row-cache-dtype must be one of {', '.join(CACHE_DTYPES)}, got {dtype!r}.")
        self.path, self.n_cols, self.capacity, self.dtype = Path(path), int(n_cols), int(n_rows), dtype
        self.path.parent.mkdir(parents=True, exist_ok=True)
        need = cache_nbytes(n_rows, n_cols, dtype)
        free = shutil.disk_usage(self.path.parent).free
        if need > 0.95 * free:
            raise UserError(f"the row cache of --passes needs {need / 2**30:.1f} GiB for {n_rows:,} rows × "
                            f"{n_cols:,} columns in {dtype}, but {self.path.parent} has {free / 2**30:.1f} GiB "
                            f"free; use --row-cache-dtype bf16, fewer --tokens, another --out, or --passes 1.")
        block = max(1, min(self.capacity, (4 << 20) // max(1, n_cols * CACHE_DTYPES[dtype].itemsize)))
        self._file = h5py.File(self.path, "w")
        self._rows = self._file.create_dataset("rows", shape=(self.capacity, self.n_cols), dtype=_H5_DTYPES[dtype],
                                               chunks=(block, self.n_cols))
        self._rows.attrs["dtype"] = dtype
        self.n_rows = 0

    # The accumulator interface the estimate loop feeds (the cache is written, not summed).
    cheap_finalize = False

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
        self._rows[self.n_rows:self.n_rows + n] = a
        self.n_rows += n

    def close(self) -> None:
        if self._file.id.valid:
            self._file.flush()
            self._file.close()

    def stream(self, *, device, chunk_rows: Optional[int] = None,
               out_dtype: torch.dtype = torch.float32) -> Callable[[], Iterator[torch.Tensor]]:
        """A zero-argument callable that yields the cached rows in order, chunk by chunk, as
        ``out_dtype`` tensors on ``device`` (the stream :func:`rankest.linalg.randomized_svd`
        reads once per pass)."""
        import h5py

        self.close()
        path, n, dtype = self.path, self.n_rows, self.dtype
        rows_per = chunk_rows or max(256, (64 << 20) // max(1, self.n_cols * 4))

        def chunks() -> Iterator[torch.Tensor]:
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
