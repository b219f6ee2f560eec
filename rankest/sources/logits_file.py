"""Precomputed logits on disk: the rows of a ``--teacher logits:PATH`` target, read in chunks.

A :class:`LogitsFile` is an N×V matrix of logits (or log-probs), one row per context, stored
in one of three formats:

* ``.npy`` — a 2-D C-ordered floating array as written by ``numpy.save``;
* ``.safetensors`` — one 2-D ``F16`` / ``BF16`` / ``F32`` / ``F64`` tensor of the file,
  chosen with ``PATH::NAME`` when the file holds several;
* HDF5 (``.h5`` / ``.hdf5`` / ``.hdf``) — one 2-D floating dataset, chosen with
  ``PATH::DATASET/PATH`` when the file holds several.

The file is never loaded whole: N×V is the size of the target itself (tens of GiB for a
real vocabulary), so only the rows asked for are read, into freshly allocated buffers. The
``.npy`` and safetensors readers parse the header themselves and read row ranges with
``seek`` + ``readinto`` rather than memory-mapping the file: mapped pages that have been
touched count in the process's resident set until the kernel drops them, which hides how
much memory a run really needs and can get it killed on a small machine.

Every malformed input (missing file, unknown suffix, truncated data, unreadable header,
wrong rank, too few rows, non-floating dtype, ambiguous or unknown tensor name) is refused at
:meth:`LogitsFile.open` with a one-sentence :class:`~rankest.errors.UserError`, before any
row buffer is allocated. Non-finite values are not checked here: the pipeline checks rows.

Example::

    python -m rankest estimate --teacher logits:runs/logits.npy --space clr
    python -m rankest estimate --teacher logits:runs/logits.safetensors::logits --space clr
"""

from __future__ import annotations

import hashlib
import json
import operator
import os
import pathlib
from typing import Any

import h5py
import numpy as np
import torch

from rankest.errors import UserError, first_line

__all__ = ["LogitsFile"]

_NPY_SUFFIXES = (".npy",)
_SAFETENSORS_SUFFIXES = (".safetensors",)
_HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf")
_FORMATS_TEXT = ".npy, .safetensors or HDF5 (.h5/.hdf5/.hdf)"

# Stored dtype name -> little-endian numpy dtype of the raw bytes (bf16 has no numpy dtype:
# its raw 16-bit patterns are read as uint16 and widened on conversion).
_RAW_DTYPES = {"fp16": np.dtype("<f2"), "bf16": np.dtype("<u2"), "fp32": np.dtype("<f4"), "fp64": np.dtype("<f8")}
_NUMPY_FLOAT_NAMES = {2: "fp16", 4: "fp32", 8: "fp64"}  # itemsize of a numpy 'f' dtype -> name

_SAFETENSORS_FLOATS = {"F16": "fp16", "BF16": "bf16", "F32": "fp32", "F64": "fp64"}
_SAFETENSORS_ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8,
}
# The safetensors library itself refuses headers above 100 MB; a larger length field means
# the file is not safetensors at all rather than a truncated one.
_SAFETENSORS_MAX_HEADER = 100_000_000

_H5_GROUP_BYTES = 32 << 20  # rows per fancy-indexed HDF5 read, in bytes (bounds h5py's selection)
_H5_GROUP_ROWS = 4096  # and in rows
_MAX_LISTED = 20  # names listed in a message before "and K more"


class LogitsFile:
    """N×V matrix of logits or log-probs in an .npy, .safetensors or HDF5 file, read in row chunks.

    Create with :meth:`open`; the file stays open (one handle) until :meth:`close` or the end
    of a ``with`` block. Reads are not thread-safe: use one instance per thread.

    Attributes
    ----------
    path : pathlib.Path
        The file.
    key : str or None
        Tensor name (safetensors) or dataset path without the leading ``/`` (HDF5) of the
        matrix, also when it was found without ``::KEY``; None for .npy.
    format : str
        ``"npy"``, ``"safetensors"`` or ``"hdf5"``.
    n_rows : int
        N, the number of rows (contexts); at least 2.
    n_cols : int
        V, the number of columns (the vocabulary); at least 1.
    dtype : str
        The stored dtype: ``"fp16"``, ``"bf16"``, ``"fp32"`` or ``"fp64"``.
    """

    path: pathlib.Path
    key: str | None
    format: str
    n_rows: int
    n_cols: int
    dtype: str

    def __init__(self, *, path: pathlib.Path, key: str | None, format: str, n_rows: int, n_cols: int,
                 dtype: str, file_size: int, backend: Any) -> None:
        # Private: use LogitsFile.open, which validates everything before building one.
        self.path = path
        self.key = key
        self.format = format
        self.n_rows = n_rows
        self.n_cols = n_cols
        self.dtype = dtype
        self._file_size = file_size
        self._backend = backend

    # --- opening ---------------------------------------------------------------------------

    @classmethod
    def open(cls, spec: str | os.PathLike) -> LogitsFile:
        """Open ``spec`` (``"PATH"`` or ``"PATH::KEY"``) and validate it without reading rows.

        Parameters
        ----------
        spec : str or os.PathLike
            The file, optionally followed by ``::KEY``: the safetensors tensor name or the
            HDF5 dataset path of the matrix. Without KEY the file's only 2-D floating
            tensor / dataset is used. A path object is never split at ``::``.

        Returns
        -------
        LogitsFile

        Raises
        ------
        UserError
            The file is missing, a folder, of an unknown suffix, truncated or unreadable, or
            holds no single usable 2-D floating matrix (see the module docstring).
        """
        path, key = _split_spec(spec)
        if not path.exists():
            raise UserError(f"the logits file {path} does not exist; check the path given to --teacher logits:PATH")
        if path.is_dir():
            raise UserError(f"{path} is a folder, not a logits file; give an {_FORMATS_TEXT} file")
        suffix = path.suffix.lower()
        if suffix in _NPY_SUFFIXES:
            return _open_npy(cls, path, key)
        if suffix in _SAFETENSORS_SUFFIXES:
            return _open_safetensors(cls, path, key)
        if suffix in _HDF5_SUFFIXES:
            return _open_hdf5(cls, path, key)
        shown = repr(path.suffix) if path.suffix else "no suffix"
        raise UserError(f"{path} has {shown}, which is not a logits format; save the N×V matrix as {_FORMATS_TEXT}")

    # --- reading ---------------------------------------------------------------------------

    def read(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)``.

        Parameters
        ----------
        start, stop : int
            ``0 <= start <= stop <= n_rows``.

        Returns
        -------
        Tensor of shape (stop - start, V)
            float64 when stored fp64, else float32 (fp16 and bf16 widen exactly); CPU,
            contiguous, writable and not shared with any other call.

        Raises
        ------
        ValueError
            The range is outside the file, or the file is closed.
        """
        start, stop = operator.index(start), operator.index(stop)
        if not 0 <= start <= stop <= self.n_rows:
            raise ValueError(f"rows [{start}, {stop}) are outside [0, {self.n_rows}) of {self.path}")
        return _to_tensor(self._live_backend().read_range(start, stop), self.dtype)

    def read_rows(self, idx: np.ndarray) -> torch.Tensor:
        """Rows ``idx`` in the given order (any order, repeats allowed).

        The indices are sorted and deduplicated, neighbouring ones are coalesced into single
        range reads, and the rows are scattered back to the requested order.

        Parameters
        ----------
        idx : integer array of shape (K,)
            Row indices in ``[0, n_rows)``.

        Returns
        -------
        Tensor of shape (K, V)
            ``out[k] = row idx[k]``; dtype, device and ownership as in :meth:`read`.

        Raises
        ------
        ValueError
            ``idx`` is not a 1-D integer array, an index is outside ``[0, n_rows)``, or the
            file is closed.
        """
        idx = np.asarray(idx)
        if idx.ndim != 1 or not (idx.dtype.kind in "iu" or idx.size == 0):
            raise ValueError(f"row indices must be a 1-D integer array, got shape {idx.shape} and dtype {idx.dtype}")
        idx = idx.astype(np.int64, copy=False)
        if idx.size and (idx.min() < 0 or idx.max() >= self.n_rows):
            raise ValueError(f"row indices must lie in [0, {self.n_rows}) for {self.path}, "
                             f"got [{idx.min()}, {idx.max()}]")
        backend = self._live_backend()
        unique, inverse = np.unique(idx, return_inverse=True)
        rows = _to_tensor(backend.read_sorted(unique), self.dtype)
        if unique.size == idx.size and np.array_equal(unique, idx):  # sorted and distinct: no scatter
            return rows
        return rows[torch.from_numpy(inverse.reshape(-1))]

    def fingerprint(self) -> str:
        """Cheap identity of the matrix: sha256 hex of the format, key, shape, stored dtype,
        file size (at open) and the stored bytes of the first and the last row.

        Two opens of the same unchanged file agree; an edit of the first or last row, a
        different shape or a resized file changes it. Rows in between are not hashed (that
        would read the whole file).
        """
        backend = self._live_backend()
        meta = {"format": self.format, "key": self.key, "shape": [self.n_rows, self.n_cols],
                "dtype": self.dtype, "file_size": self._file_size}
        digest = hashlib.sha256()
        for part in (json.dumps(meta, sort_keys=True).encode(), backend.row_bytes(0),
                     backend.row_bytes(self.n_rows - 1)):
            digest.update(len(part).to_bytes(8, "little"))  # length-prefixed: parts cannot run together
            digest.update(part)
        return digest.hexdigest()

    def nbytes_per_row(self) -> int:
        """Bytes one row occupies in the file: V × the stored itemsize (2, 4 or 8).

        A returned row takes V × 4 bytes (V × 8 when stored fp64) in memory.
        """
        return self.n_cols * _RAW_DTYPES[self.dtype].itemsize

    # --- lifetime --------------------------------------------------------------------------

    def close(self) -> None:
        """Close the file handle; idempotent. Reads afterwards raise ValueError."""
        if self._backend is not None:
            self._backend.close()
            self._backend = None

    def __enter__(self) -> LogitsFile:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        key = f"::{self.key}" if self.key is not None else ""
        state = "" if self._backend is not None else ", closed"
        return f"LogitsFile({str(self.path)!r}{key}, {self.format}, {self.n_rows}×{self.n_cols} {self.dtype}{state})"

    def _live_backend(self) -> Any:
        if self._backend is None:
            raise ValueError(f"the logits file {self.path} is closed")
        return self._backend


# --- backends: stored rows as numpy arrays of the stored dtype --------------------------------


class _RawBackend:
    """Rows at a byte offset of a plain file (.npy and safetensors): seek + readinto."""

    def __init__(self, path: pathlib.Path, offset: int, raw_dtype: np.dtype, n_cols: int) -> None:
        # Unbuffered: readinto then goes straight from the kernel into our buffer, no copy.
        self._fh = open(path, "rb", buffering=0)
        self._path = path
        self._offset = offset
        self._dtype = raw_dtype
        self._row_bytes = n_cols * raw_dtype.itemsize
        self._n_cols = n_cols

    def _read_into(self, first_row: int, out: np.ndarray) -> None:
        """Fill the C-contiguous ``out`` with the rows from ``first_row`` on."""
        view = memoryview(out.reshape(-1).view(np.uint8))
        self._fh.seek(self._offset + first_row * self._row_bytes)
        done = 0
        while done < len(view):  # one read() may return less (e.g. above 2 GiB on Linux)
            got = self._fh.readinto(view[done:])
            if not got:
                raise UserError(f"{self._path} ended while reading row {first_row + done // self._row_bytes}; "
                                "it was truncated or replaced after it was opened, so open it again")
            done += got

    def read_range(self, start: int, stop: int) -> np.ndarray:
        out = np.empty((stop - start, self._n_cols), dtype=self._dtype)
        if out.size:
            self._read_into(start, out)
        return out

    def read_sorted(self, unique: np.ndarray) -> np.ndarray:
        out = np.empty((unique.size, self._n_cols), dtype=self._dtype)
        if out.size:
            for lo, hi in _runs(unique):
                self._read_into(int(unique[lo]), out[lo:hi])
        return out

    def row_bytes(self, i: int) -> bytes:
        return self.read_range(i, i + 1).tobytes()

    def close(self) -> None:
        self._fh.close()


class _H5Backend:
    """Rows of an h5py dataset, read by slicing."""

    def __init__(self, file: h5py.File, dataset: h5py.Dataset) -> None:
        self._file = file
        self._ds = dataset
        row_bytes = max(1, dataset.shape[1] * dataset.dtype.itemsize)
        self._group = max(1, min(_H5_GROUP_ROWS, _H5_GROUP_BYTES // row_bytes))

    def read_range(self, start: int, stop: int) -> np.ndarray:
        return np.ascontiguousarray(self._ds[start:stop])

    def read_sorted(self, unique: np.ndarray) -> np.ndarray:
        out = np.empty((unique.size, self._ds.shape[1]), dtype=self._ds.dtype)
        if out.size:
            # h5py fancy indexing needs increasing indices (``unique`` is); groups bound the
            # size of each hyperslab selection h5py builds.
            for lo in range(0, unique.size, self._group):
                part = unique[lo:lo + self._group]
                if int(part[-1]) - int(part[0]) + 1 == part.size:  # one run: a plain slice is cheaper
                    out[lo:lo + part.size] = self._ds[int(part[0]):int(part[-1]) + 1]
                else:
                    out[lo:lo + part.size] = self._ds[part]
        return out

    def row_bytes(self, i: int) -> bytes:
        return np.ascontiguousarray(self._ds[i]).tobytes()

    def close(self) -> None:
        self._file.close()


# --- format readers ----------------------------------------------------------------------------


def _open_npy(cls: type[LogitsFile], path: pathlib.Path, key: str | None) -> LogitsFile:
    if key is not None:
        raise UserError(f"{path} is an .npy file, which holds a single array; drop ::{key} from the spec")
    size = path.stat().st_size
    with open(path, "rb") as fh:
        try:
            version = np.lib.format.read_magic(fh)
        except ValueError:
            raise UserError(f"{path} is not an .npy file (it does not start with the .npy magic string); "
                            "write the logits with numpy.save") from None
        try:
            if version == (1, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(fh)
            elif version == (2, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(fh)
            else:
                raise UserError(f"{path} uses .npy format version {version[0]}.{version[1]}, which is not "
                                "supported for logits; write them again with numpy.save")
        except UserError:
            raise
        except Exception:  # numpy raises ValueError, SyntaxError or tokenize errors, by the damage
            raise UserError(f"{path} has a garbled .npy header that cannot be parsed; "
                            "write the logits again with numpy.save") from None
        offset = fh.tell()
    where = f"the array in {path}"
    n_rows, n_cols = _check_shape(tuple(shape), where)
    if dtype.kind != "f" or dtype.itemsize not in _NUMPY_FLOAT_NAMES:
        raise _dtype_error(where, str(dtype))
    if fortran_order:
        raise UserError(f"{path} is stored in Fortran (column-major) order, so its rows are not contiguous; "
                        "save numpy.ascontiguousarray(logits) instead")
    name = _NUMPY_FLOAT_NAMES[dtype.itemsize]
    _check_size(path, offset + n_rows * n_cols * dtype.itemsize, size)
    # A big-endian array is read as stored and byte-swapped by the conversion to the native dtype.
    backend = _RawBackend(path, offset, dtype if dtype.byteorder == ">" else _RAW_DTYPES[name], n_cols)
    return cls(path=path, key=None, format="npy", n_rows=n_rows, n_cols=n_cols, dtype=name,
               file_size=size, backend=backend)


def _open_safetensors(cls: type[LogitsFile], path: pathlib.Path, key: str | None) -> LogitsFile:
    size = path.stat().st_size

    def garbled(reason: str) -> UserError:
        return UserError(f"{path} has an unreadable safetensors header ({reason}); "
                         "write the logits again with safetensors' save_file")

    with open(path, "rb") as fh:
        prefix = fh.read(8)
        if len(prefix) < 8:
            raise garbled(f"the file is only {len(prefix)} bytes long")
        header_len = int.from_bytes(prefix, "little")
        if header_len > _SAFETENSORS_MAX_HEADER:
            raise garbled(f"its length field says {header_len} bytes")
        if 8 + header_len > size:
            raise UserError(f"{path} is truncated: its safetensors header declares {header_len} bytes "
                            f"but the file holds {size - 8} after the length field; copy or write it again")
        raw = fh.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise garbled("it is not JSON") from None
    if not isinstance(header, dict):
        raise garbled("it is not a JSON object")
    tensors: dict[str, dict] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not (isinstance(entry, dict) and isinstance(entry.get("dtype"), str)
                and isinstance(entry.get("shape"), list)
                and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in entry["shape"])
                and isinstance(entry.get("data_offsets"), list) and len(entry["data_offsets"]) == 2
                and all(isinstance(o, int) and not isinstance(o, bool) for o in entry["data_offsets"])):
            raise garbled(f"the entry of tensor {name!r} lacks a valid dtype, shape or data_offsets")
        tensors[name] = entry
    data_start = 8 + header_len
    data_end = max((e["data_offsets"][1] for e in tensors.values()), default=0)
    _check_size(path, data_start + data_end, size)

    key = _choose(path, key, {n: (tuple(e["shape"]), e["dtype"] in _SAFETENSORS_FLOATS) for n, e in tensors.items()},
                  what="tensor")
    entry = tensors[key]
    where = f"tensor {key!r} in {path}"
    n_rows, n_cols = _check_shape(tuple(entry["shape"]), where)
    if entry["dtype"] not in _SAFETENSORS_FLOATS:
        raise _dtype_error(where, entry["dtype"])
    name = _SAFETENSORS_FLOATS[entry["dtype"]]
    begin, end = entry["data_offsets"]
    need = n_rows * n_cols * _SAFETENSORS_ITEMSIZE[entry["dtype"]]
    if not 0 <= begin <= end or end - begin != need:
        raise garbled(f"tensor {key!r} has data_offsets [{begin}, {end}] but its shape and dtype need {need} bytes")
    backend = _RawBackend(path, data_start + begin, _RAW_DTYPES[name], n_cols)
    return cls(path=path, key=key, format="safetensors", n_rows=n_rows, n_cols=n_cols, dtype=name,
               file_size=size, backend=backend)


def _open_hdf5(cls: type[LogitsFile], path: pathlib.Path, key: str | None) -> LogitsFile:
    size = path.stat().st_size
    try:
        file = h5py.File(path, "r")
    except OSError as exc:
        if "truncated" in str(exc).lower():
            raise UserError(f"{path} is truncated: the HDF5 file is shorter than its superblock declares; "
                            "copy or write it again") from None
        raise UserError(f"{path} is not a readable HDF5 file ({first_line(exc)}); "
                        "write the logits with h5py") from None
    try:
        datasets: dict[str, h5py.Dataset] = {}

        def collect(name: str, obj: object) -> None:
            if isinstance(obj, h5py.Dataset):
                datasets[name] = obj

        file.visititems(collect)
        if key is not None:
            key = key.strip("/")  # "/a/b" and "a/b" name the same dataset
        key = _choose(path, key, {n: (tuple(d.shape or ()), _is_float(d.dtype)) for n, d in datasets.items()},
                      what="dataset")
        ds = datasets[key]
        where = f"dataset {key!r} in {path}"
        n_rows, n_cols = _check_shape(tuple(ds.shape) if ds.shape is not None else (), where)
        if not _is_float(ds.dtype):
            raise _dtype_error(where, str(ds.dtype))
        name = _NUMPY_FLOAT_NAMES[ds.dtype.itemsize]
    except BaseException:
        file.close()
        raise
    return cls(path=path, key=key, format="hdf5", n_rows=n_rows, n_cols=n_cols, dtype=name,
               file_size=size, backend=_H5Backend(file, ds))


# --- helpers -----------------------------------------------------------------------------------


def _split_spec(spec: str | os.PathLike) -> tuple[pathlib.Path, str | None]:
    """``"PATH::KEY"`` -> (PATH, KEY); a path object, or a string naming an existing file, is whole."""
    if not isinstance(spec, str):
        return pathlib.Path(spec).expanduser(), None
    text = spec.strip()
    key: str | None = None
    if "::" in text and not pathlib.Path(text).expanduser().exists():
        text, _, key = text.rpartition("::")
        if not key:
            raise UserError(f"the logits spec {spec!r} ends with an empty name after ::; "
                            "give logits:PATH or logits:PATH::NAME")
    if not text:
        raise UserError(f"the logits spec {spec!r} has no path; give logits:PATH or logits:PATH::NAME")
    return pathlib.Path(text).expanduser(), key


def _choose(path: pathlib.Path, key: str | None, entries: dict[str, tuple[tuple, bool]], *, what: str) -> str:
    """The name of the matrix: ``key`` if it exists, else the only entry or the only 2-D float one.

    entries : name -> (shape, is floating)
    """
    if key is not None:
        if key not in entries:
            listing = _listing(entries) if entries else "none"
            raise UserError(f"{path} holds no {what} named {key!r} (it has: {listing}); "
                            f"choose one with logits:{path}::NAME")
        return key
    if not entries:
        raise UserError(f"{path} holds no {what}s; save the N×V logits in it first")
    if len(entries) == 1:  # the only one: its own shape / dtype message is the clearest
        return next(iter(entries))
    candidates = [n for n, (shape, is_float) in entries.items() if len(shape) == 2 and is_float]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise UserError(f"{path} holds no 2-D floating {what} (it has: {_listing(entries)}); "
                        "save the logits as an N×V fp16, bf16, fp32 or fp64 array")
    raise UserError(f"{path} holds several 2-D {what}s ({_listing({n: entries[n] for n in candidates})}); "
                    f"choose one with logits:{path}::NAME")


def _listing(entries: dict[str, Any]) -> str:
    names = sorted(entries)
    shown = ", ".join(names[:_MAX_LISTED])
    return shown if len(names) <= _MAX_LISTED else f"{shown} and {len(names) - _MAX_LISTED} more"


def _check_shape(shape: tuple, where: str) -> tuple[int, int]:
    if len(shape) != 2:
        raise UserError(f"{where} has shape {list(shape)}, not 2-D; the logits must be an N×V matrix, "
                        "one row per context")
    n_rows, n_cols = int(shape[0]), int(shape[1])
    if n_rows < 2:
        raise UserError(f"{where} has {n_rows} row{'s' if n_rows != 1 else ''}; a spectrum needs at least "
                        "2 rows (contexts), so write more rows")
    if n_cols == 0:
        raise UserError(f"{where} has 0 columns; each row must hold the V > 0 logits of one context")
    return n_rows, n_cols


def _check_size(path: pathlib.Path, need: int, have: int) -> None:
    if need > have:
        raise UserError(f"{path} is truncated: its header declares {need} bytes but the file holds {have}; "
                        "copy or write it again")


def _is_float(dtype: np.dtype) -> bool:
    return dtype.kind == "f" and dtype.itemsize in _NUMPY_FLOAT_NAMES


def _dtype_error(where: str, dtype: str) -> UserError:
    return UserError(f"{where} has dtype {dtype}, but logits must be floating point (fp16, bf16, fp32 or fp64); "
                     "convert them with .astype('float32') and save again")


def _runs(unique: np.ndarray) -> list[tuple[int, int]]:
    """Positions ``[lo, hi)`` of maximal runs of consecutive values in sorted distinct ``unique``."""
    breaks = np.flatnonzero(np.diff(unique) != 1) + 1
    edges = [0, *breaks.tolist(), int(unique.size)]
    return list(zip(edges[:-1], edges[1:]))


def _to_tensor(stored: np.ndarray, dtype: str) -> torch.Tensor:
    """(R, V) stored rows -> fresh contiguous CPU tensor, float64 for fp64 and float32 otherwise."""
    if dtype == "bf16":
        # bf16 is the top half of an fp32: widening the bit pattern is exact.
        wide = stored.astype(np.uint32)
        wide <<= 16
        out = wide.view(np.float32)
    else:
        target = np.float64 if dtype == "fp64" else np.float32
        # astype copies only when needed (fp16, or a byte-swapped .npy); the buffers handed in
        # are fresh per call, so returning them as is shares nothing.
        out = stored.astype(target, copy=False)
    return torch.from_numpy(np.ascontiguousarray(out))
