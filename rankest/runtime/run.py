"""The run skeleton every command shares: a run folder, checkpoints, signals, the final write.

    run = Run.open("estimate", out=cfg.out, resume=cfg.resume, overwrite=cfg.overwrite,
                   results_file="results.h5", config=run_config, world=world, every=cfg.checkpoint_every)
    run.check_derived(derived)                 # a checkpoint of other rows or another model: refused
    start = 0 if run.position is None else run.position["next_batch"]
    for j in run.units(start, n_units, stride=world.size, save=save_state, stopped=describe):
        ...                                    # one unit of work (a round of batches, a step)
    run.finish(write)                          # rank 0 writes the results, then drops the checkpoint

What each step guarantees:

* **open** (rank 0, the decision broadcast): create the folder, or refuse an existing one
  without ``--overwrite``; lock it (one writer per folder: a second run on it is refused while
  the first lives; the lock dies with its process); under ``--resume`` say where it resumes; under ``--resume`` read and check ``checkpoint.h5`` (the same command,
  the same configuration), or start afresh with a note when there is none; a finished run is
  not resumed. Stale temporary files of a writer killed mid-write are removed.
* **units**: after each unit, a SIGINT/SIGTERM on any process (the flag is all-reduced) or every
  ``every`` units, the state is checkpointed — collectively: rank 0 writes, and a failed write
  stops every process with the same sentence — and a signal then stops the run with exit status
  128 + signal (:class:`Interrupted`). The first signal waits for the end of the unit; a second
  acts at once.
* **finish**: results are written atomically (each file to a temporary name, fsynced, renamed)
  before the checkpoint is removed, so a crash in between leaves a resumable folder; a full
  disk removes what this finish wrote and says so (exit 2). A failed run leaves no empty folder.
"""

from __future__ import annotations

import atexit
import fcntl
import os
import signal
import sys
import threading
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np

from rankest.errors import UserError
from rankest.io.checkpoint import (
    CHECKPOINT_NAME,
    Checkpoint,
    CheckpointWriteError,
    check_same_run,
    read_checkpoint,
    remove_checkpoint,
    rng_state,
    set_rng_state,
    write_checkpoint,
)
from rankest.io.files import check_writable_folder
from rankest.io.h5 import os_error_text
from rankest.runtime import distributed
from rankest.sources.corpus import corpus_name


class Interrupted(KeyboardInterrupt):
    """The run stopped on SIGINT/SIGTERM after writing a checkpoint. ``exit_code`` = 128 + signal."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + int(signum)


# ---- signals -----------------------------------------------------------------------------------
class StopOnSignal:
    """Context manager: the first SIGINT/SIGTERM only sets ``signum`` (the streaming loop then
    writes a checkpoint at the end of the current chunk and stops); a second one acts at once
    (the previous handlers are back). A no-op outside the main thread, where Python cannot
    install handlers."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.signum: Optional[int] = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        self.signum = signum
        self._restore()
        print(f"\nrankest: received {signal.Signals(signum).name}; writing a checkpoint after this chunk "
              f"(send it again to stop at once)", file=sys.stderr, flush=True)

    def _restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}

    def __enter__(self) -> "StopOnSignal":
        if self.enabled and threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self._restore()


def check_checkpoint_options(cfg, *, unit: str) -> None:
    """The checks every checkpointing command makes of ``cfg.checkpoint_every`` (counted in
    ``unit``), ``cfg.resume``, ``cfg.out`` and ``cfg.overwrite``, each failure a sentence."""
    if cfg.checkpoint_every is not None and int(cfg.checkpoint_every) < 1:
        raise UserError(f"--checkpoint-every must be a positive number of {unit}, got {cfg.checkpoint_every}.")
    for flag, on in (("--checkpoint-every", cfg.checkpoint_every is not None), ("--resume", cfg.resume)):
        if on and not cfg.out:
            raise UserError(f"{flag} needs a run folder for the checkpoint; add --out DIR.")
    if cfg.resume and cfg.overwrite:
        raise UserError("--resume continues the run in --out while --overwrite starts it afresh; pass only one.")


def open_run_folder(out, *, resume: bool, overwrite: bool, results_file: str, command: str, run: str,
                    run_config: dict) -> "Checkpoint | None":
    """Prepare the run folder ``out`` (rank 0) and, under ``resume``, read and check its checkpoint.

    Returns the checkpoint to continue from, or None to start afresh (also under ``resume`` when
    there is none: a scheduler can always pass it, and is told so on stderr). Refused: resuming a
    finished ``run`` (``results_file`` there and no checkpoint), a checkpoint written by another
    command than ``command`` (positions without a ``command`` are estimate's), or one of another
    configuration. Stale temporary files of a writer killed mid-write are removed.
    """
    folder = Path(out)
    has_ckpt = resume and (folder / CHECKPOINT_NAME).is_file()
    if resume and not has_ckpt and (folder / results_file).is_file():
        raise UserError(f"the {run} in {folder} has finished ({results_file} and no {CHECKPOINT_NAME}); nothing to "
                        f"resume: pass --overwrite to compute it again, or choose another --out.")
    folder = prepare_run_folder(folder, overwrite=overwrite or resume)
    if (folder / results_file).is_dir():
        raise UserError(f"{folder / results_file} is a folder, where the {run} writes its results file; "
                        f"remove it or choose another --out.")
    for stale in folder.glob(f".{CHECKPOINT_NAME}.*.tmp"):
        stale.unlink(missing_ok=True)
    if not has_ckpt:
        if resume:
            print(f"rankest: no {CHECKPOINT_NAME} in {folder}; starting from the beginning", file=sys.stderr)
        return None
    ckpt = read_checkpoint(folder / CHECKPOINT_NAME)
    if ckpt.position.get("command", "estimate") != command:
        raise UserError(f"the checkpoint {ckpt.path} is not a {command} checkpoint (written by another command); "
                        f"pass --overwrite instead of --resume to start afresh, or choose another --out.")
    check_same_run(ckpt.config, run_config, ckpt.path)
    print(f"rankest: resuming from {ckpt.path}: {describe_position(ckpt.position)}", file=sys.stderr)
    return ckpt


def describe_position(position: dict) -> str:
    """Where a checkpoint stopped, as a person reads it ("6,144 of 8,192 rows done (batch 24 of 32)")."""
    if "rows_done" in position:
        return (f"{int(position['rows_done']):,} rows done (batch {int(position['next_batch'])} of "
                f"{int(position.get('n_batches', -1))})")
    if "step" in position:
        return f"step {int(position['step'])} of {int(position.get('steps', -1))} done"
    return ", ".join(f"{k} = {v}" for k, v in sorted(position.items()) if k not in ("command", "world_size"))


#: Options that say where and how a run executes, not what it computes: a checkpoint may be
#: resumed with other values of these (the one list every command uses).
EXECUTION_OPTIONS = ("out", "overwrite", "quiet", "resume", "checkpoint_every", "device", "device_map", "max_memory")
#: Options left out of the config a result file records (they say where it was written).
OUTPUT_OPTIONS = ("out", "overwrite", "quiet", "resume", "checkpoint_every")


def _option_value(name: str, v):
    """An option as a config records it: a loaded teacher by name and a local one by absolute
    path, the corpus by :func:`rankest.sources.corpus.corpus_name`, rows in memory as "memory"."""
    if name == "teacher":
        v = v if isinstance(v, str) or v is None else getattr(v, "name", str(v))
        return str(Path(v).resolve()) if v is not None and Path(v).exists() else v  # ./m and /abs/m: one teacher
    if name == "corpus":
        return corpus_name(v)
    if name == "rows":
        return None if v is None else "memory"
    return v


def run_config(cfg, *, skip: tuple[str, ...] = EXECUTION_OPTIONS) -> dict:
    """The options of a run (a config dataclass) that a checkpoint must share with the run that
    resumes it, JSON-able: every field but ``skip``."""
    return {f.name: _option_value(f.name, getattr(cfg, f.name)) for f in fields(cfg) if f.name not in skip}


def result_config(cfg) -> dict:
    """The options a result file records: every field but :data:`OUTPUT_OPTIONS`."""
    return run_config(cfg, skip=OUTPUT_OPTIONS)


# ---- run folder --------------------------------------------------------------------------------
def create_run_folder(out) -> Path:
    """Create (or reuse) the run folder ``out`` and lock it for this process
    (:func:`lock_run_folder`); its writability is checked before anything is created, so a bad
    ``--out`` fails in a second, not after an hour. Each failure is a sentence (UserError)."""
    if not str(out).strip():
        raise UserError("--out is empty; give the run folder a name, or leave --out out to save nothing.")
    out = check_writable_folder(out, "--out")  # names, a file in the way, permissions
    existed = out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the run folder {out} ({os_error_text(e)}); choose a writable --out.") from e
    lock_run_folder(out, created=not existed)
    return out


def prepare_run_folder(out, *, overwrite: bool = False) -> Path:
    """:func:`create_run_folder`, refusing an existing non-empty folder unless ``overwrite``."""
    out = create_run_folder(out)
    if any(p.name != LOCK_NAME for p in out.iterdir()) and not overwrite:
        release_run_folder(out)
        raise UserError(f"the run folder {out} already exists and is not empty; pass --overwrite to replace "
                        f"its results or choose another --out.")
    return out


# ---- one writer per run folder ------------------------------------------------------------------
#: The lock file of a run folder: flock'ed by the process writing it, holding its pid.
LOCK_NAME = ".rankest.lock"
#: Folders this process holds: resolved path → (lock file descriptor, folder, created by this run).
_HELD: dict[Path, tuple[int, Path, bool]] = {}


def lock_run_folder(folder: Path, *, created: bool = False) -> None:
    """Take the exclusive lock of ``folder`` for this process (again: a no-op), or refuse
    (UserError) while another process holds it. The lock is an ``flock`` on ``LOCK_NAME``, which
    the kernel drops when its process dies, so a kill -9 leaves no stale lock: the next run
    takes it over. Released by :func:`release_run_folder` (at the latest when the process exits)."""
    key = folder.resolve()
    if key in _HELD:
        return
    path = folder / LOCK_NAME
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"cannot write to the run folder {folder} ({os_error_text(e)}); choose a writable "
                            f"--out.") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise UserError(f"another rankest process{f' (pid {pid})' if pid.isdigit() else ''} is writing to the "
                            f"run folder {folder}; wait for it to finish, or choose another --out.") from None
        except OSError as e:  # a file system without flock (some network mounts): go on, unguarded
            warnings.warn(f"cannot lock the run folder {folder} ({os_error_text(e)}); make sure no other run "
                          f"writes to it", stacklevel=2)
        try:  # the holder before us may have removed the file between our open and our flock
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _HELD[key] = (fd, folder, created)


def release_run_folder(folder: Path) -> None:
    """Drop this process's lock of ``folder``; a folder this run created and left empty (a run
    that failed before writing anything) is removed."""
    held = _HELD.pop(Path(folder).resolve(), None)
    if held is None:
        return
    fd, folder, created = held
    try:
        (folder / LOCK_NAME).unlink(missing_ok=True)
    except OSError:
        pass
    os.close(fd)
    if created:
        try:
            folder.rmdir()  # only if empty
        except OSError:
            pass


def release_all() -> None:
    """Release every run folder this process holds (the CLI's last step; also at exit)."""
    for key in list(_HELD):
        release_run_folder(key)


atexit.register(release_all)


# ---- the skeleton --------------------------------------------------------------------------------
@dataclass
class Run:
    """One run of a command: its folder, its checkpoint, its signals (module docstring).

    Build it with :meth:`open` on every process of ``world``; rank 0 alone touches the folder.
    """

    command: str
    world: distributed.World
    out: Optional[Path]  # the run folder (every process knows its name; rank 0 alone writes)
    every: Optional[int]  # checkpoint every this many units (None: on signals only)
    config: dict  # the options a resume must share (run_config)
    position: Optional[dict] = None  # every process: where the checkpoint stopped (None: fresh)
    checkpoint: Optional[Checkpoint] = None  # rank 0: the checkpoint read
    derived: dict = field(default_factory=dict)  # what the data and model resolved to
    saved: bool = False  # a checkpoint of this run exists (it was resumed from one, or wrote one)

    @classmethod
    def open(cls, command: str, *, out, resume: bool, overwrite: bool, results_file: str, config: dict,
             world: distributed.World, every: Optional[int] = None, what: str = "run") -> "Run":
        """Prepare or reopen the run folder ``out`` (None: a run without folder, checkpoints or
        signal handling) and read its checkpoint under ``resume``; collective."""
        if out is not None and not str(out).strip():
            raise UserError("--out is empty; give the run folder a name, or leave --out out to save nothing.")
        box: dict[str, Any] = {}

        def prepare() -> Optional[dict]:
            box["ckpt"] = open_run_folder(out, resume=resume, overwrite=overwrite, results_file=results_file,
                                          command=command, run=what, run_config=config)
            return None if box["ckpt"] is None else box["ckpt"].position

        position = distributed.on_main(world, prepare) if out else None
        return cls(command, world, Path(out) if out else None, every, config, position, box.get("ckpt"),
                   saved=position is not None)

    @classmethod
    def in_memory(cls, command: str) -> "Run":
        """A run of one process without a folder: no checkpoints, no signal handling (an estimate
        made inside another one, or of rows prepared in Python)."""
        return cls(command, distributed.World(), None, None, {})

    @property
    def enabled(self) -> bool:
        """A run folder exists: signals are caught and checkpoints written."""
        return self.out is not None

    @property
    def checkpoint_path(self) -> Optional[Path]:
        return None if self.out is None else self.out / CHECKPOINT_NAME

    def check_derived(self, derived: dict) -> None:
        """Record what the data and model resolved to; refuse a checkpoint of other rows or another
        model (collective: rank 0 compares, every process raises)."""
        self.derived = derived
        if self.position is not None:
            ck = self.checkpoint
            distributed.on_main(self.world, lambda: check_same_run(ck.derived, derived, ck.path, "data or teacher"))

    def saved_states(self, names) -> Optional[dict[str, dict[str, np.ndarray]]]:
        """Rank 0: the checkpoint's states of the accumulators ``names`` (a missing one refused);
        None elsewhere or when starting afresh."""
        if self.checkpoint is None or not self.world.main:
            return None
        missing = [n for n in names if n not in self.checkpoint.states]
        if missing:
            raise UserError(f"the checkpoint {self.checkpoint.path} has no {', '.join(missing)} state; delete it and "
                            f"start afresh.")
        return self.checkpoint.states

    def restore_rng(self, device=None) -> None:
        """Rank 0 restores the global RNG states the checkpoint saved."""
        if self.checkpoint is not None and self.world.main:
            try:
                set_rng_state(self.checkpoint.rng, device)
            except (ValueError, TypeError, RuntimeError, OverflowError, IndexError) as e:
                raise UserError(f"the checkpoint {self.checkpoint.path} holds RNG states this rankest cannot restore "
                                f"({type(e).__name__}); delete it (or pass --overwrite instead of --resume) to start "
                                f"afresh.") from e

    def save(self, *, position: dict, states: dict[str, dict[str, np.ndarray]], convergence: Optional[dict] = None,
             device=None) -> None:
        """Write the checkpoint (collective): rank 0 writes ``states`` (already summed over the
        processes); a failed write raises the same :class:`CheckpointWriteError` on every process."""
        message = None
        if self.world.main:
            try:
                write_checkpoint(self.checkpoint_path, config=self.config, derived=self.derived,
                                 convergence=convergence or {}, states=states, rng=rng_state(device),
                                 position={"command": self.command, "world_size": self.world.size, **position})
            except UserError as e:
                if not self.world.active:
                    raise
                message = str(e)
        message = distributed.broadcast(self.world, message)
        if message is not None:
            raise CheckpointWriteError(message)
        self.saved = True

    def units(self, start: int, stop: int, *, stride: int = 1, save: Callable[[int], None],
              stopped: Callable[[int], str], held_by: Optional[Path] = None) -> Iterator[int]:
        """Yield the first unit u of each round [u, u + stride) of units [start, stop).

        After each round with units left: ``save(done)`` every ``every`` units and on a signal,
        then, on a signal, :class:`Interrupted` with ``stopped(done)`` ("stopped after …") and how
        to resume. ``save`` is collective (every process calls it), as is the signal check.
        ``held_by`` names the file that holds the finished units when it is not the checkpoint
        (a sweep's result file, appended unit by unit).
        """
        with StopOnSignal(enabled=self.enabled) as stop_signal:
            for u in range(start, stop, stride):
                yield u
                done = min(u + stride, stop)
                stopping = self.enabled and distributed.any_true(self.world, stop_signal.signum is not None)
                if done < stop and (stopping or (self.every and done // self.every > u // self.every)):
                    save(done)
                if stopping and done < stop:
                    where = f"the checkpoint {self.checkpoint_path}" if held_by is None else str(held_by)
                    raise Interrupted(f"{stopped(done)}; {where} holds them: rerun the same command with --resume "
                                      f"to continue", stop_signal.signum or 15)

    def finish(self, write: Callable[[Path], Any]) -> Any:
        """Rank 0: ``write(folder)`` the results (atomically, file by file), then remove the
        checkpoint, which they now supersede, and release the folder. Returns what ``write``
        returned (None elsewhere or without a folder). A write that fails (a full disk) removes
        the files it had written — no folder with results but no report — keeps the checkpoint
        and raises a UserError."""
        if self.out is None or not self.world.main:
            return None
        before = _listing(self.out)
        try:
            result = write(self.out)
        except OSError as e:
            written = {name for name, stamp in _listing(self.out).items() if before.get(name) != stamp}
            for name in written - {CHECKPOINT_NAME, LOCK_NAME}:
                (self.out / name).unlink(missing_ok=True)
            kept = (f"the checkpoint {self.checkpoint_path} is intact: free space, then rerun with --resume"
                    if self.checkpoint_path.exists() else "free space, then run it again")
            raise UserError(f"could not write the results to {self.out}: {os_error_text(e)}; the files written so far "
                            f"were removed ({kept}).") from e
        remove_checkpoint(self.checkpoint_path)
        release_run_folder(self.out)
        return result


def _listing(folder: Path) -> dict[str, tuple[int, int]]:
    """name → (inode, mtime in ns) of every file of ``folder``: what a write changed."""
    out = {}
    for p in folder.iterdir():
        try:
            st = p.stat()
        except FileNotFoundError:
            continue
        out[p.name] = (st.st_ino, st.st_mtime_ns)
    return out
