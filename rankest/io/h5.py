"""The HDF5 conventions of rankest's result files: a ``format`` mark, a ``schema_version``, and
Fletcher-32 checksums on every dataset that can carry one — and one reader that checks all three,
so a damaged, foreign or newer file is refused with a sentence, never read as a result.
(Checkpoints use the same checksums with a ``version`` of their own, :mod:`rankest.io.checkpoint`;
the row cache of ``--passes`` is an intermediate file, vouched for by the checkpoint that counts it.)
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np

from rankest.errors import UserError


def checked_dataset(group, key: str, data) -> None:
    """``group[key] = data`` with a Fletcher-32 checksum (chunked storage; scalars and empty
    arrays, which cannot be chunked, are stored plain)."""
    data = np.asarray(data)
    if data.ndim == 0 or data.size == 0:
        group.create_dataset(key, data=data)
    else:
        group.create_dataset(key, data=data, fletcher32=True, chunks=True)


def mark(f, fmt: str, version: int) -> None:
    """Write the format mark and schema version of a file rankest owns."""
    f.attrs["format"] = fmt
    f.attrs["schema_version"] = version


@contextlib.contextmanager
def open_checked(path, *, fmt: str, version: int, what: str, fix: str) -> Iterator[h5py.File]:
    """Open ``path`` (a ``what``, e.g. "heads results file") for reading, refusing (UserError) a
    missing, unreadable, foreign or newer file; a failed checksum or a missing part while the
    caller reads inside the ``with`` block is refused too. ``fix`` says what to do."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no {what} at {path}; {fix}.")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise UserError(f"{path} is not a readable HDF5 file (truncated or corrupt?); {fix}.") from e
    with f:
        found = f.attrs.get("format")
        if found != fmt:
            raise UserError(f"{path} is not a {what} (its format mark is {found!r}, expected {fmt!r}); {fix}.")
        if int(f.attrs.get("schema_version", -1)) > version:
            raise UserError(f"{path} was written by a newer rankest (schema {int(f.attrs['schema_version'])}, this one "
                            f"reads {version}); upgrade rankest.")
        try:
            yield f
        except (OSError, KeyError, ValueError, TypeError) as e:
            # A damaged dataset fails its checksum (OSError); a missing part is a KeyError.
            raise UserError(f"{path} is a damaged {what} ({type(e).__name__}: {e}); {fix}.") from e
