"""Checkpoints of a streaming run: ``DIR/checkpoint.h5``, written atomically, read defensively.

A checkpoint holds everything a killed run needs to go on as if it had never stopped:

* ``/state/<accumulator>/<key>`` — every accumulator's :meth:`~rankest.accumulate.Accumulator.state`
  (fp64 sums, stored bit for bit; HDF5 Fletcher-32 checksums on every dataset, so a corrupted
  byte is detected on reading instead of silently changing a spectrum);
* ``/rng/<key>`` — the global RNG states (torch, CUDA, numpy, Python). rankest's own random
  choices use private seeded generators (the row plan, the sketch's counter-based test
  matrices), so these are restored for whatever else in the process draws from them;
* ``sha256`` — a digest of every attribute and every dataset (:func:`rankest.io.h5.digest`):
  an edited position, a flipped bit in a scalar or an RNG state is refused, not resumed;
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
from rankest.io.h5 import DIGEST_ATTR, check_sizes, checked_dataset, digest, h5_file, os_error_text, read_all

CHECKPOINT_NAME = "checkpoint.h5"
FORMAT = "rankest.checkpoint"
#: Bumped whenever the checkpoint layout changes; newer checkpoints are refused.
CHECKPOINT_VERSION = 2


#: States that may hold NaN by design: the row statistics' entropy sum (an MLE n-gram's zero
#: probabilities); their energy is checked by the run that restores them (Estimate.check_position).
MAY_HOLD_NAN = {("row_stats", "sums")}


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
        before = ("the previous checkpoint there is intact" if path.exists()
                  else "no earlier checkpoint exists")
        raise CheckpointWriteError(
            f"could not write the checkpoint {path}: {os_error_text(e)}; {before}. Free space or fix the disk, then "
            f"rerun with --resume.") from e


def _write_file(tmp: Path, *, config, derived, position, convergence, states, rng) -> None:
    """The HDF5 writer proper (separate so tests can inject I/O faults into it). The ``sha256``
    attribute covers every attribute and every dataset (:func:`rankest.io.h5.digest`)."""
    attrs = {"format": FORMAT, "version": CHECKPOINT_VERSION, "rankest_version": __version__,
             "config": _dumps(config), "derived": _dumps(derived), "position": _dumps(position),
             "convergence": _dumps({str(k): v for k, v in convergence.items()}),
             # A file that has it was written to the end by this function.
             "complete": True}
    arrays = {f"state/{name}/{key}": np.asarray(v) for name, state in states.items() for key, v in state.items()}
    arrays.update({f"rng/{key}": np.asarray(v) for key, v in rng.items()})
    with h5_file(tmp) as f:
        f.create_group("state")
        f.create_group("rng")
        for name in states:
            f.create_group(f"state/{name}")
        for key, value in arrays.items():
            group, _, leaf = key.rpartition("/")
            checked_dataset(f[group], leaf, value)
        for name, value in attrs.items():
            f.attrs[name] = value
        f.attrs[DIGEST_ATTR] = digest(attrs, arrays)


# ---- reading ---------------------------------------------------------------------------------
def read_checkpoint(path) -> Checkpoint:
    """Read a checkpoint; refuse (UserError) a missing, truncated, corrupt, foreign, newer or
    edited file (every byte is under its ``sha256``), a state of the wrong structure, and a
    state holding NaN or infinity (a run that would only fail later, in the eigensolver)."""
    path = Path(path)
    fix = "delete it (or pass --overwrite instead of --resume) to start afresh"
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}; run without --resume to start afresh.")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise UserError(f"the checkpoint {path} is not a readable HDF5 file (truncated or corrupt); {fix}.") from e
    try:
        with f:
            fmt = _attr(f, "format")
            if fmt != FORMAT:
                what = "a rankest results file" if fmt == "rankest.results" else (
                    f"a file of format {fmt!r:.60}" if fmt else "an HDF5 file without a rankest format mark")
                raise UserError(f"{path} is {what}, not a rankest checkpoint; {fix}.")
            version = int(np.asarray(f.attrs.get("version", -1)).item())
            if version > CHECKPOINT_VERSION:
                raise UserError(f"the checkpoint {path} has version {version}, newer than this rankest reads "
                                f"({CHECKPOINT_VERSION}); resume with the rankest that wrote it, or {fix}.")
            if version < CHECKPOINT_VERSION:
                raise UserError(f"the checkpoint {path} has version {version}, written by an older rankest without "
                                f"checksums; resume with the rankest that wrote it, or {fix}.")
            if not bool(f.attrs.get("complete", False)):
                raise UserError(f"the checkpoint {path} is incomplete (its writer did not finish); {fix}.")
            what = "checkpoint"
            check_sizes(f, path, what=what, fix=fix)
            _check_layout(f, path, fix)
            attrs, arrays = read_all(f)
    except UserError:
        raise
    except (OSError, KeyError, ValueError, TypeError, AttributeError) as e:
        # A damaged dataset fails its Fletcher-32 checksum (OSError); missing parts are KeyErrors.
        raise UserError(f"the checkpoint {path} is damaged ({type(e).__name__}: {' '.join(str(e).split())}); "
                        f"{fix}.") from e
    if str(attrs.get(DIGEST_ATTR)) != digest(attrs, arrays):
        raise UserError(f"the checkpoint {path} is damaged (its {DIGEST_ATTR} checksum does not match its content: "
                        f"edited or corrupted); {fix}.")
    states: dict[str, dict[str, np.ndarray]] = {}
    for key, a in arrays.items():
        top, *rest = key.split("/")
        if top == "state":
            states.setdefault(rest[0], {})[rest[1]] = a
    try:
        parts = {k: json.loads(_attr(f, k, attrs)) for k in ("config", "derived", "position", "convergence")}
        if not all(isinstance(v, dict) for v in parts.values()):
            raise TypeError("a JSON attribute is not an object")
        ckpt = Checkpoint(path=path, config=parts["config"], derived=parts["derived"], position=parts["position"],
                          convergence={int(k): v for k, v in parts["convergence"].items()},
                          states=states, rng={k[4:]: a for k, a in arrays.items() if k.startswith("rng/")})
    except (ValueError, TypeError) as e:
        raise UserError(f"the checkpoint {path} is damaged ({type(e).__name__}: {e}); {fix}.") from e
    check_finite_states(ckpt.states, path, fix)
    return ckpt


def _check_layout(f, path, fix: str) -> None:
    """``/state/<name>/<key>`` and ``/rng/<key>`` datasets, nothing else."""
    for top in ("state", "rng"):
        if not isinstance(f.get(top), h5py.Group):
            raise UserError(f"the checkpoint {path} is damaged (/{top} is missing or not a group); {fix}.")
    bad = [f"/state/{n}" for n, g in f["state"].items() if not isinstance(g, h5py.Group)]
    bad += [f"/state/{n}/{k}" for n, g in f["state"].items() if isinstance(g, h5py.Group)
            for k, d in g.items() if not isinstance(d, h5py.Dataset)]
    bad += [f"/rng/{k}" for k, d in f["rng"].items() if not isinstance(d, h5py.Dataset)]
    if bad:
        raise UserError(f"the checkpoint {path} is damaged ({bad[0]} is not laid out as a checkpoint's); {fix}.")


def check_finite_states(states: dict[str, dict[str, np.ndarray]], path, fix: str) -> None:
    """Refuse a state holding NaN or infinity, naming where (an accumulated sum that is not
    finite cannot give a spectrum)."""
    for name, state in states.items():
        for key, a in state.items():
            a = np.asarray(a)
            if (name, key) in MAY_HOLD_NAN:
                continue
            if a.dtype.kind in "fc" and not np.isfinite(a).all():
                n = int(a.size - np.isfinite(a).sum())
                raise UserError(f"the checkpoint {path} holds {n:,} non-finite values (NaN or infinity) in "
                                f"state/{name}/{key}: the run that wrote it streamed non-finite rows; {fix}.")


def _attr(f, name: str, attrs=None) -> str:
    v = (f.attrs if attrs is None else attrs).get(name)
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






