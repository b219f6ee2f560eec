"""Files rankest writes: atomically (a crash leaves the previous file or none, never half of
one), as JSON with one policy for numpy values and non-finite floats, with readable
permissions; every path checked for writability before the work starts
(:func:`check_writable_folder`, :func:`check_writable_file`), so a run does not fail after an
hour because its output cannot be written.

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

from rankest.errors import UserError


# ---- writability, checked before the work ------------------------------------------------------
def check_name_lengths(path: Path, flag: str) -> None:
    """Refuse a path the file system cannot hold: a component longer than NAME_MAX or a whole
    path longer than PATH_MAX (checked on the text: ``Path.exists`` raises on such a name)."""
    text = os.fspath(path)
    limit_path = 4096
    if len(os.fsencode(text)) >= limit_path:
        raise UserError(f"{flag} {text[:40]}… is {len(text)} characters long, longer than a path may be "
                        f"({limit_path}); choose a shorter path.")
    for part in Path(text).parts:
        n = len(os.fsencode(part))
        if n > 255:  # NAME_MAX of every common Linux/macOS file system
            raise UserError(f"{flag}: the name {part[:40]}… is {n} bytes long, more than a file or folder "
                            f"name may be (255); choose a shorter name.")


def _probe(folder: Path, fix: str) -> None:
    """Create and remove a file in ``folder``: the one test of writability that root, ACLs and
    read-only mounts all answer truthfully."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=".write-test-", dir=folder)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise UserError(f"cannot write to the folder {folder} ({e.strerror}); {fix}.") from None


def check_writable_folder(path: os.PathLike | str, flag: str = "--out", *, must_exist: bool = False,
                          fix: str | None = None) -> Path:
    """A folder rankest will write into: a writable folder, or (unless ``must_exist``) a path
    whose nearest existing ancestor is a writable folder, so it can be created later (nothing is
    created here: a refused run leaves no folder behind).

    Raises :class:`~rankest.errors.UserError` (one sentence naming ``flag``) for a name too long,
    an existing file, a folder that cannot be created or written; ``fix`` ends the sentence
    (default: choose a writable ``flag``). Returns the path.
    """
    path = Path(path)
    fix = fix or f"choose a writable {flag}"
    check_name_lengths(path, flag)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} exists and is not a folder; choose another path.")
    if path.is_dir():
        _probe(path, fix)
        return path
    if must_exist:
        raise UserError(f"{flag}: the folder {path} does not exist; check the path.")
    ancestor = path.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"cannot create the folder {path}: {ancestor} is a file; {fix}.")
    _probe(ancestor, fix)
    return path


def check_writable_file(path: os.PathLike | str, flag: str) -> Path:
    """A file rankest will write (replace, or create): not a folder, in an existing writable
    folder (a missing folder is not created: a typo should not leave folders behind).

    Raises :class:`~rankest.errors.UserError` (one sentence naming ``flag``). Returns the path.
    """
    path = Path(path)
    check_name_lengths(path, flag)
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder, not a file; pass a file path.")
    parent = path.parent
    if not parent.is_dir():
        raise UserError(f"{flag} {path}: the folder {parent} does not exist; create it or choose another path.")
    _probe(parent, f"choose a writable {flag}")
    return path


def cache_home() -> Path:
    """rankest's cache folder: ``$RANKEST_CACHE``, else ``$XDG_CACHE_HOME/rankest``, else
    ``~/.cache/rankest`` (the compiled ops, the dequantised GGUF teacher, offline tokenizers)."""
    base = os.environ.get("RANKEST_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "rankest")
    return Path(base)


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
