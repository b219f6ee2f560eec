"""The HDF5 conventions of rankest's files: a ``format`` mark, a ``schema_version``, Fletcher-32
checksums on every dataset that can carry one, a SHA-256 ``sha256`` attribute over every other
byte (attributes, scalar datasets), and one reader that checks them all, so a damaged, foreign,
edited or newer file is refused with a sentence, never read as a result.

* Writing (:func:`write_h5`) goes through a Python file object that records the first failed
  ``write`` (ENOSPC, EIO) and swallows the rest, so HDF5 can always close the file and no
  half-closed handle is left to fail again — with tracebacks, or a segfault — when it is
  garbage-collected; the recorded error is then raised, the temporary file removed and the
  previous file left in place (:func:`rankest.io.files.atomic_path`).
* Reading (:func:`open_checked`) first compares every dataset's declared size with the size of
  the file (rankest never compresses, so a dataset cannot hold more bytes than its file: a
  header that declares 10¹² entries of fill value is refused before anything is allocated),
  then checks the ``sha256`` digest (:func:`file_digest`).

(Checkpoints use the same pieces with a ``version`` of their own, :mod:`rankest.io.checkpoint`;
the row cache of ``--passes`` is an intermediate file, vouched for by the checkpoint that counts it.)
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
from pathlib import Path
from typing import Iterator, Mapping

import h5py
import numpy as np

from rankest.errors import UserError
from rankest.io.files import atomic_path

#: The attribute holding :func:`digest` of everything else in the file.
DIGEST_ATTR = "sha256"
#: Schema versions from which the digest is mandatory (older results files predate it).
DIGEST_SINCE = 2


def checked_dataset(group, key: str, data) -> None:
    """``group[key] = data`` with a Fletcher-32 checksum (chunked storage; scalars and empty
    arrays, which cannot be chunked, are stored plain — the file's digest covers them)."""
    data = np.asarray(data)
    if data.ndim == 0 or data.size == 0:
        group.create_dataset(key, data=data)
    else:
        group.create_dataset(key, data=data, fletcher32=True, chunks=True)


def mark(f, fmt: str, version: int) -> None:
    """Write the format mark and schema version of a file rankest owns."""
    f.attrs["format"] = fmt
    f.attrs["schema_version"] = version


# ---- the digest ------------------------------------------------------------------------------
def _canon(value) -> str:
    """An attribute value as canonical text (what was written and what is read back agree)."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray):
        value = [value.dtype.str, list(value.shape), value.tolist()]
    elif isinstance(value, np.generic):
        value = value.item()
    return json.dumps(value, default=_text)


def _text(x) -> str:
    """What JSON cannot hold (bytes in a string array, anything else) as text."""
    return x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x)


def digest(attrs: Mapping[str, object], arrays: Mapping[str, object]) -> str:
    """SHA-256 of attribute values (by name, ``sha256`` itself left out) and of arrays (by path:
    dtype, shape, raw bytes; numpy arrays, or h5py datasets read block by block). The one
    definition writers and readers share."""
    h = hashlib.sha256()
    for name in sorted(attrs):
        if name != DIGEST_ATTR:
            h.update(f"attr {name}={_canon(attrs[name])}\n".encode())
    for key in sorted(arrays):
        a = arrays[key]
        h.update(f"data {key} {np.dtype(a.dtype).str} {list(a.shape)}\n".encode())
        for block in _blocks(a):
            h.update(memoryview(np.ascontiguousarray(block)).cast("B"))
    return h.hexdigest()


def _blocks(a, nbytes: int = 64 << 20) -> Iterator[np.ndarray]:
    """``a`` in slices of about ``nbytes`` along its first axis (a scalar or empty array whole)."""
    if not a.shape or a.shape[0] == 0:
        yield np.asarray(a[()])
        return
    step = max(1, nbytes // max(1, int(np.prod(a.shape[1:], dtype=np.int64)) * np.dtype(a.dtype).itemsize))
    for lo in range(0, a.shape[0], step):
        yield np.asarray(a[lo:lo + step])


def _objects(f) -> tuple[dict, dict]:
    """Every attribute of every object of ``f`` (keyed ``path@name``; the root's by name) and
    every dataset (by path), not read."""
    attrs: dict[str, object] = dict(f.attrs.items())
    datasets: dict[str, h5py.Dataset] = {}

    def visit(name, obj) -> None:
        attrs.update({f"{name}@{k}": v for k, v in obj.attrs.items()})
        if isinstance(obj, h5py.Dataset):
            datasets[name] = obj

    f.visititems(visit)
    return attrs, datasets


def read_all(f) -> tuple[dict, dict[str, np.ndarray]]:
    """:func:`_objects` with every dataset read into memory — call :func:`check_sizes` first."""
    attrs, datasets = _objects(f)
    return attrs, {k: np.asarray(ds[()]) for k, ds in datasets.items()}


def file_digest(f) -> str:
    """:func:`digest` of an open file's own attributes and datasets (read block by block)."""
    return digest(*_objects(f))


def check_sizes(f, path, *, what: str, fix: str) -> None:
    """Refuse (UserError) a file any of whose datasets declares more bytes than the file holds:
    rankest writes no compressed data, so such a header is damaged or forged, and reading it
    would allocate what it declares."""
    size = Path(path).stat().st_size

    def visit(name, obj) -> None:
        if isinstance(obj, h5py.Dataset):
            if obj.dtype.kind not in "biufcSO" or obj.compression is not None:
                raise UserError(f"{path} is a damaged {what} (dataset {name} has a {obj.dtype} "
                                f"{obj.compression or 'raw'} layout rankest never writes); {fix}.")
            declared = int(np.prod(obj.shape, dtype=object) if obj.shape else 1) * obj.dtype.itemsize
            if declared > size:
                raise UserError(f"{path} is a damaged {what} (dataset {name} declares shape {obj.shape}, "
                                f"{declared:,} bytes, in a file of {size:,}); {fix}.")

    f.visititems(visit)


def check_digest(f, path, *, what: str, fix: str, required: bool) -> None:
    """Refuse a file whose ``sha256`` does not match its content (or is missing, when ``required``)."""
    stored = f.attrs.get(DIGEST_ATTR)
    if stored is None:
        if required:
            raise UserError(f"{path} is a damaged {what} (it has no {DIGEST_ATTR} checksum); {fix}.")
        return
    if _canon(stored) != _canon(file_digest(f)):
        raise UserError(f"{path} is a damaged {what} (its {DIGEST_ATTR} checksum does not match its content: "
                        f"edited or corrupted); {fix}.")


# ---- writing -------------------------------------------------------------------------------
class _Sink:
    """A binary file for h5py's ``fileobj`` driver that keeps the first OSError of a write and
    reports success from then on (writes discarded), so HDF5 always closes cleanly. ``raw`` is
    unbuffered (a buffered file would raise a deferred write error from ``seek``)."""

    def __init__(self, raw) -> None:
        self.raw, self.error = raw, None

    def _guard(self, fn, *args, default=None):
        if self.error is None:
            try:
                return fn(*args)
            except OSError as e:
                self.error = e
        return default

    def _write_all(self, view: memoryview) -> None:
        while len(view):
            view = view[self.raw.write(view):]  # FileIO writes may be partial

    def write(self, b) -> int:
        view = memoryview(b).cast("B")
        self._guard(self._write_all, view)
        return len(view)

    def truncate(self, size=None):
        self._guard(self.raw.truncate, size)
        return size

    def flush(self) -> None:
        pass  # unbuffered: nothing to flush (fsync is atomic_path's)

    def read(self, n=-1):
        return self.raw.read(n)

    def readinto(self, b):
        return self.raw.readinto(b)

    def seek(self, pos, whence=0):
        return self.raw.seek(pos, whence)

    def tell(self):
        return self.raw.tell()


@contextlib.contextmanager
def h5_file(path, *, mode: str = "w") -> Iterator[h5py.File]:
    """Yield ``path`` open (``mode`` "w" or "a") as an h5py File written through :class:`_Sink`:
    an OSError of any write (ENOSPC, EIO) is raised after HDF5 has closed the file cleanly."""
    with open(path, "r+b" if mode == "a" else "w+b", buffering=0) as raw:
        sink = _Sink(raw)
        f = h5py.File(sink, mode)
        try:
            yield f
        except BaseException:
            with contextlib.suppress(Exception):
                f.close()
            if sink.error is not None:  # the cause: reading back what a full disk discarded fails too
                raise sink.error from None
            raise
        f.close()
        if sink.error is not None:
            raise sink.error


@contextlib.contextmanager
def write_h5(path, *, copy_from=None) -> Iterator[h5py.File]:
    """Yield an h5py File (:func:`h5_file`) that becomes ``path`` atomically when the block ends,
    its ``sha256`` attribute set to :func:`file_digest` of the rest first. ``copy_from``: start
    from a copy of that file. On an OSError ``path`` is untouched."""
    path = Path(path)
    with atomic_path(path) as tmp:
        if copy_from is not None:
            with open(copy_from, "rb") as src, open(tmp, "wb") as dst:
                while block := src.read(1 << 20):
                    dst.write(block)
        with h5_file(tmp, mode="a" if copy_from is not None else "w") as f:
            yield f
            f.attrs[DIGEST_ATTR] = file_digest(f)


def os_error_text(e: OSError) -> str:
    """``No space left on device (ENOSPC)``: an OSError as one line (HDF5's messages span lines)."""
    code = errno.errorcode.get(e.errno, "") if e.errno else ""
    text = os.strerror(e.errno) if e.errno else " ".join(str(e).split())
    return text + (f" ({code})" if code else "")


# ---- reading -------------------------------------------------------------------------------
@contextlib.contextmanager
def open_checked(path, *, fmt: str, version: int, what: str, fix: str, oldest: int = 0) -> Iterator[h5py.File]:
    """Open ``path`` (a ``what``, e.g. "heads results file") for reading, refusing (UserError) a
    missing, unreadable, foreign, newer or older (schema below ``oldest``) file, one whose
    datasets declare more than the file holds, or whose checksum fails; a missing part while the
    caller reads inside the ``with`` block is refused too. ``fix`` says what to do."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no {what} at {path}; {fix}.")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise UserError(f"{path} is not a readable HDF5 file (truncated or corrupt?); {fix}.") from e
    with f:
        try:
            found = f.attrs.get("format")
            if isinstance(found, bytes):
                found = found.decode("utf-8", "replace")
            if found != fmt:
                raise UserError(f"{path} is not a {what} (its format mark is {found!r:.60}, expected {fmt!r}); {fix}.")
            schema = int(np.asarray(f.attrs.get("schema_version", -1)).item())
            if schema > version:
                raise UserError(f"{path} was written by a newer rankest (schema {schema}, this one reads {version}); "
                                f"upgrade rankest.")
            if schema < oldest:
                raise UserError(f"{path} was written by an older rankest (schema {schema}, this one reads "
                                f"{oldest} to {version}); {fix}.")
            check_sizes(f, path, what=what, fix=fix)
            check_digest(f, path, what=what, fix=fix, required=schema >= DIGEST_SINCE)
            yield f
        except UserError:
            raise
        except (OSError, KeyError, ValueError, TypeError, AttributeError) as e:
            # A damaged dataset fails its checksum (OSError); a missing part is a KeyError.
            raise UserError(f"{path} is a damaged {what} ({type(e).__name__}: {' '.join(str(e).split())}); "
                            f"{fix}.") from e
