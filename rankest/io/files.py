"""Files rankest writes: atomically (a crash leaves the previous file or none, never half of
one), as JSON with one policy for numpy values and non-finite floats, with readable
permissions.

Every writer goes through :func:`atomic_path`: a temporary name in the same folder, flushed,
fsynced, then renamed over the target, and the folder fsynced so the rename itself is durable.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import torch


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ---- atomic writes ---------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_path(path: os.PathLike | str) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync it and rename it over ``path``.
    The file gets the permissions of any new file (0666 less the umask: 0644 under umask 022)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp creates 0600; a result file is as readable as any other
    finally:
        os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        with contextlib.suppress(OSError):  # make the rename itself durable
            dfd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
    finally:
        tmp.unlink(missing_ok=True)


def _umask() -> int:
    """The process's umask (read by setting it and putting it back: there is no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text_atomic(path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def jsonable(x, *, keep_nan: bool = False):
    """``x`` as plain JSON values: numpy scalars and arrays become numbers and lists, paths,
    dtypes and devices strings. Non-finite floats: None in every file a person or script reads
    (JSON has no NaN; None reads as "not available"), kept (``keep_nan``, Python's NaN/Infinity
    extension) only in checkpoints, which must restore a run bit for bit. The one JSON policy of
    every file rankest writes."""
    if isinstance(x, dict):
        return {str(k): jsonable(v, keep_nan=keep_nan) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v, keep_nan=keep_nan) for v in x]
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist(), keep_nan=keep_nan)
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (Path, torch.dtype, torch.device)):
        return str(x)
    if isinstance(x, (float, np.floating)):
        v = float(x)
        return v if math.isfinite(v) or keep_nan else None
    return x


def to_json(obj, *, indent: int | None = 2, sort_keys: bool = False, keep_nan: bool = False) -> str:
    """:func:`jsonable` ``obj`` as JSON text."""
    return json.dumps(jsonable(obj, keep_nan=keep_nan), indent=indent, sort_keys=sort_keys)
