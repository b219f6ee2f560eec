"""Checkpoints of a streaming run: ``DIR/checkpoint.h5``, written atomically, read defensively.

A checkpoint holds everything a killed run needs to go on as if it had never stopped:

* ``/state/<accumulator>/<key>`` — every accumulator's :meth:`~rankest.accumulate.Accumulator.state`
  (fp64 sums, stored bit for bit; HDF5 Fletcher-32 checksums on every dataset, so a corrupted
  byte is detected on reading instead of silently changing a spectrum);
* ``/rng/<key>`` — the global RNG states (torch, CUDA, numpy, Python). rankest's own random
  choices use private seeded generators (the row plan, the sketch's counter-based test
  matrices), so these are restored for whatever else in the process draws from them;
* attributes: ``format`` = ``rankest.checkpoint``, ``version`` (the schema version of a checkpoint), the run's ``config`` and
  ``derived`` keys (what the data and teacher resolved to: V', dtype, a fingerprint of the
  sampled rows), ``position`` (the next batch of the row plan, rows done, route) and the
  ``convergence`` snapshots so far (JSON).

Writing goes to a temporary file in the run folder, is flushed and fsynced, then renamed over
the previous checkpoint (:func:`rankest.io.files.atomic_path`): a crash or a full disk leaves
the previous checkpoint or none, never half of one. A checkpoint is position-based, not
process-based: it holds the sum over all processes' shards, so a run may resume with a
different number of processes (see :mod:`rankest.runtime.distributed`).

    python -m rankest estimate --out runs/x --checkpoint-every 50     # checkpoint every 50 chunks
    python -m rankest estimate --out runs/x --checkpoint-every 50 --resume   # after a crash
"""

from __future__ import annotations

import errno
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import h5py
import numpy as np
import torch

from rankest._version import __version__
from rankest.errors import UserError
from rankest.io.files import atomic_path, to_json
from rankest.io.h5 import checked_dataset

CHECKPOINT_NAME = "checkpoint.h5"
FORMAT = "rankest.checkpoint"
#: Bumped whenever the checkpoint layout changes; newer checkpoints are refused.
CHECKPOINT_VERSION = 1


class CheckpointWriteError(UserError):
    """Writing a checkpoint failed (disk full, I/O error); the previous checkpoint is intact."""




@dataclass
class Checkpoint:
    """What :func:`read_checkpoint` returns (all arrays in host memory)."""

    path: Path
    config: dict
    derived: dict
    position: dict
    convergence: dict[int, dict]
    states: dict[str, dict[str, np.ndarray]]
    rng: dict[str, np.ndarray] = field(default_factory=dict)


def _dumps(obj) -> str:
    """Compact, key-sorted JSON that keeps NaN (:func:`rankest.io.files.jsonable`): a resume is bit for bit."""
    return to_json(obj, indent=None, sort_keys=True, keep_nan=True)


# ---- RNG state -------------------------------------------------------------------------------
def rng_state(device: Optional[torch.device] = None) -> dict[str, np.ndarray]:
    """The process's global RNG states as arrays (torch CPU, CUDA of ``device``, numpy, Python)."""
    out = {"torch": torch.get_rng_state().numpy().copy()}
    if device is not None and torch.device(device).type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state(torch.device(device)).numpy().copy()
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    out["numpy_keys"] = np.asarray(keys, dtype=np.uint32)
    out["numpy_rest"] = np.asarray([pos, has_gauss, gauss], dtype=np.float64)
    version, internal, py_gauss = random.getstate()
    out["python"] = np.asarray(internal, dtype=np.int64)
    out["python_rest"] = np.asarray([version, np.nan if py_gauss is None else py_gauss], dtype=np.float64)
    return out


def set_rng_state(state: dict[str, np.ndarray], device: Optional[torch.device] = None) -> None:
    """Restore what :func:`rng_state` saved (a missing entry leaves that generator alone)."""
    if "torch" in state:
        torch.set_rng_state(torch.from_numpy(np.asarray(state["torch"], dtype=np.uint8).copy()))
    if "cuda" in state and device is not None and torch.device(device).type == "cuda":
        torch.cuda.set_rng_state(torch.from_numpy(np.asarray(state["cuda"], dtype=np.uint8).copy()),
                                 torch.device(device))
    if "numpy_keys" in state:
        pos, has_gauss, gauss = np.asarray(state["numpy_rest"]).tolist()
        np.random.set_state(("MT19937", np.asarray(state["numpy_keys"], dtype=np.uint32), int(pos),
                             int(has_gauss), float(gauss)))
    if "python" in state:
        version, py_gauss = np.asarray(state["python_rest"]).tolist()
        random.setstate((int(version), tuple(int(v) for v in np.asarray(state["python"])),
                         None if np.isnan(py_gauss) else py_gauss))


# ---- writing ---------------------------------------------------------------------------------
def write_checkpoint(path, *, config: dict, derived: dict, position: dict, convergence: dict,
                     states: dict[str, dict[str, np.ndarray]], rng: Optional[dict] = None) -> None:
    """Write ``path`` atomically (temporary file beside it, fsync, rename).

    Raises :class:`CheckpointWriteError` (a UserError: exit 2) when the disk refuses the write
    (ENOSPC, EIO, …); the previous checkpoint at ``path`` is then untouched.
    """
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            _write_file(tmp, config=config, derived=derived, position=position, convergence=convergence,
                        states=states, rng=rng or {})
    except OSError as e:
        code = errno.errorcode.get(e.errno, "") if e.errno else ""
        what = f"{e.strerror or e}" + (f" ({code})" if code else "")
        before = ("the previous checkpoint there is intact" if path.exists()
                  else "no earlier checkpoint exists")
        raise CheckpointWriteError(
            f"could not write the checkpoint {path}: {what}; {before}. Free space or fix the disk, then rerun "
            f"with --resume.") from e


def _write_file(tmp: Path, *, config, derived, position, convergence, states, rng) -> None:
    """The HDF5 writer proper (separate so tests can inject I/O faults into it)."""
    with h5py.File(tmp, "w") as f:
        f.attrs["format"] = FORMAT
        f.attrs["version"] = CHECKPOINT_VERSION
        f.attrs["rankest_version"] = __version__
        f.attrs["config"] = _dumps(config)
        f.attrs["derived"] = _dumps(derived)
        f.attrs["position"] = _dumps(position)
        f.attrs["convergence"] = _dumps({str(k): v for k, v in convergence.items()})
        for name, state in states.items():
            g = f.create_group(f"state/{name}")
            for key, value in state.items():
                checked_dataset(g, key, value)
        g = f.create_group("rng")
        for key, value in rng.items():
            checked_dataset(g, key, value)
        # Written last: a file that has it was written to the end by this function.
        f.attrs["complete"] = True


# ---- reading ---------------------------------------------------------------------------------
def read_checkpoint(path) -> Checkpoint:
    """Read a checkpoint; refuse (UserError) a missing, truncated, corrupt, foreign or newer file."""
    path = Path(path)
    fix = "delete it (or pass --overwrite instead of --resume) to start afresh"
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}; run without --resume to start afresh.")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise UserError(f"the checkpoint {path} is not a readable HDF5 file (truncated or corrupt: {e}); "
                        f"{fix}.") from e
    try:
        with f:
            fmt = _attr(f, "format")
            if fmt != FORMAT:
                what = "a rankest results file" if fmt == "rankest.results" else (
                    f"a file of format {fmt!r}" if fmt else "an HDF5 file without a rankest format mark")
                raise UserError(f"{path} is {what}, not a rankest checkpoint; {fix}.")
            version = int(f.attrs.get("version", -1))
            if version > CHECKPOINT_VERSION:
                raise UserError(f"the checkpoint {path} has version {version}, newer than this rankest reads "
                                f"({CHECKPOINT_VERSION}); resume with the rankest that wrote it, or {fix}.")
            if not bool(f.attrs.get("complete", False)):
                raise UserError(f"the checkpoint {path} is incomplete (its writer did not finish); {fix}.")
            ckpt = Checkpoint(
                path=path, config=json.loads(_attr(f, "config")), derived=json.loads(_attr(f, "derived")),
                position=json.loads(_attr(f, "position")),
                convergence={int(k): v for k, v in json.loads(_attr(f, "convergence")).items()},
                states={name: {key: ds[()] for key, ds in g.items()} for name, g in f["state"].items()},
                rng={key: ds[()] for key, ds in f["rng"].items()} if "rng" in f else {})
    except UserError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as e:
        # A damaged dataset fails its Fletcher-32 checksum (OSError); missing parts are KeyErrors.
        raise UserError(f"the checkpoint {path} is damaged ({type(e).__name__}: {e}); {fix}.") from e
    return ckpt


def _attr(f, name: str) -> str:
    v = f.attrs.get(name)
    if v is None:
        return ""
    return v.decode() if isinstance(v, bytes) else str(v)


def config_diff(saved: dict, current: dict) -> list[str]:
    """Keys whose values differ between two configs (a key missing on one side differs)."""
    keys = sorted(set(saved) | set(current))
    # Compare through JSON so that tuples/lists and numpy scalars compare as they were stored.
    norm = lambda d, k: json.loads(_dumps(d[k])) if k in d else "<absent>"  # noqa: E731
    return [k for k in keys if norm(saved, k) != norm(current, k)]


def check_same_run(saved: dict, current: dict, path, what: str = "configuration") -> None:
    """Refuse (UserError) to resume from a checkpoint of another run, listing the differing keys."""
    diff = config_diff(saved, current)
    if diff:
        detail = "; ".join(f"{k}: checkpoint {saved.get(k, '<absent>')!r}, now {current.get(k, '<absent>')!r}"
                           for k in diff)
        raise UserError(f"the checkpoint {path} is from a different {what} ({detail}); rerun with the "
                        f"checkpoint's options, or pass --overwrite instead of --resume to start afresh.")




def remove_checkpoint(path) -> None:
    """Delete a finished run's checkpoint (the results now hold everything it did)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass






