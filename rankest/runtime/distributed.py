"""Several processes, one run: torch.distributed under ``torchrun`` (no home-made cluster code).

    torchrun --nproc_per_node=4 -m rankest estimate --teacher pythia-1b --tokens 1000000 --out runs/p1b
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --rdzv_backend=c10d \\
             --rdzv_endpoint=HOST:29500 -m rankest estimate ...          # on each node

Every accumulator is a sum over rows (docs/design.md, "Scale beyond one process"), so the
processes split the batches of the seeded row plan — batch j goes to process j mod P, in
rounds of P consecutive batches — and their states are summed before ``finalize``. The rows
are those of the one-process plan, whatever P; only the order of the fp64 additions changes.

Detected from torchrun's environment (``WORLD_SIZE`` > 1, ``RANK``, ``LOCAL_RANK``): NCCL and
``cuda:LOCAL_RANK`` when the run is on GPUs, gloo on CPUs. Sums travel as their
:meth:`~rankest.accumulate.Accumulator.state` arrays (fp64 and int64), reduced to rank 0,
which alone finalises, writes results and checkpoints and shows the progress bar; every entry of
a state is summed except the accumulator's ``fixed_state_keys`` (seed, shapes: equal on all).
"""

from __future__ import annotations

import contextlib
import gc
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist

from rankest.errors import UserError

#: Values reduced per collective call (2^24 fp64 = 128 MiB of scratch per process).
REDUCE_BLOCK = 1 << 24


@dataclass
class World:
    """This process's place in the run: ``size`` processes, this one is ``rank``."""

    size: int = 1
    rank: int = 0
    local_rank: int = 0
    backend: Optional[str] = None
    device: Optional[torch.device] = None  # where collectives' tensors live
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1


def setup(device: str = "auto") -> tuple[World, str]:
    """Join the torchrun job described by the environment, if any; return (world, device to use).

    One process (no ``WORLD_SIZE``, or 1): nothing is initialised and ``device`` is unchanged.
    Under torchrun with P > 1: ``--device auto|cuda`` becomes ``cuda:LOCAL_RANK`` (NCCL) when CUDA
    is available, ``cpu`` otherwise (gloo); ``--device cpu`` forces gloo.
    """
    size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if size <= 1:
        return World(), device

    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    dev = str(device).lower()
    if dev.startswith("cuda:"):
        raise UserError(f"--device {device} under torchrun: each process uses cuda:LOCAL_RANK; pass --device cuda "
                        f"(or auto) and choose the GPUs with CUDA_VISIBLE_DEVICES.")
    use_cuda = dev in ("auto", "cuda") and torch.cuda.is_available()
    if dev == "cuda" and not use_cuda:
        raise UserError("--device cuda under torchrun, but CUDA is not available here; pass --device cpu.")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        comm, backend, run_device = torch.device("cuda", local_rank), "nccl", f"cuda:{local_rank}"
    else:
        comm, backend, run_device = torch.device("cpu"), "gloo", "cpu"
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
        owns = True
    return World(size, rank, local_rank, backend, comm, owns), run_device


@contextlib.contextmanager
def joined(device: str = "auto", *, join: bool = True) -> Iterator[tuple[World, str]]:
    """``with joined(device) as (world, run_device):`` a command's run inside the torchrun job:
    :func:`setup` on entry, :func:`shutdown` on leaving — after the closing barrier when the
    block ended normally (a return included), without it when it raised. ``join=False``: one
    process's world whatever the environment (a command that needs no collectives)."""
    world, run_device = setup(device) if join else (World(), device)
    try:
        yield world, run_device
    except BaseException:
        shutdown(world, ended_normally=False)
        raise
    shutdown(world)


def shutdown(world: World, ended_normally: bool = True) -> None:
    """Leave the process group this module created (a no-op for one process).

    After a run that ended normally every process first waits at a barrier for the others
    (rank 0 last, once its results are written), so that no process tears its connections down
    while a peer still holds them: a gloo worker that left early has died with SIGABRT at exit.
    After a failure there is no barrier (the others may never reach it); torchrun stops them.
    A collection follows, so that the group's last work objects (tensors the gloo threads may
    still hold) are freed while the interpreter is whole, not during its teardown.
    """
    if world.owns_group:
        if dist.is_initialized():
            if ended_normally:
                dist.barrier()
            dist.destroy_process_group()
            gc.collect()
        world.owns_group = False


def any_true(world: World, flag: bool) -> bool:
    """True on every process when ``flag`` is true on any (e.g. a signal reached one node)."""
    if not world.active:
        return bool(flag)

    t = torch.tensor([1 if flag else 0], dtype=torch.int64, device=world.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def sum_over_processes(world: World) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    """``t ↦ Σ_processes t`` (in-place all-reduce; the same on every process) for the shards of a
    multi-pass SVD (:func:`rankest.linalg.randomized_svd`'s ``reduce``); None for one process."""
    if not world.active:
        return None

    def reduce(t: torch.Tensor) -> torch.Tensor:
        all_sum_(world, [t])
        return t

    return reduce


def broadcast(world: World, obj: Any) -> Any:
    """Rank 0's ``obj`` on every process (pickled; for small things: decisions, messages)."""
    if not world.active:
        return obj

    box = [obj]
    dist.broadcast_object_list(box, src=0, device=world.device)
    return box[0]


def on_main(world: World, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 only and give its result to every process; a UserError raised by it
    is raised on every process (so all exit 2 together instead of the others hanging)."""
    result, message = None, None
    if world.main:
        try:
            result = fn()
        except UserError as e:
            if not world.active:
                raise
            message = str(e)
    result, message = broadcast(world, (result, message))
    if message is not None:
        raise UserError(message)
    return result


def reduce_state(world: World, state: dict[str, np.ndarray], fixed: tuple[str, ...] = ()) -> Optional[dict]:
    """Sum an accumulator state over the processes, onto rank 0 (None on the others).

    Every entry except ``fixed`` is summed (fp64 sums and int64 counts); ``fixed`` entries are
    rank 0's. The arrays are copied, so the caller's live state is not changed. One process:
    the state itself.
    """
    if not world.active:
        return state

    out: dict[str, np.ndarray] = {}
    for key in sorted(state):  # the same order on every process
        value = np.asarray(state[key])
        if key in fixed:
            out[key] = value
            continue
        flat = value.reshape(-1)
        total = np.empty_like(flat) if world.main else None
        # Blocks of ≤ REDUCE_BLOCK values: a 50k² Gram (20 GB) needs one block of scratch, not a copy.
        for lo in range(0, max(flat.size, 1), REDUCE_BLOCK):
            t = torch.tensor(flat[lo:lo + REDUCE_BLOCK]).to(world.device)  # a copy: the live state stays
            dist.reduce(t, dst=0, op=dist.ReduceOp.SUM)
            if world.main:
                total[lo:lo + REDUCE_BLOCK] = t.cpu().numpy()
        if world.main:
            out[key] = total.reshape(value.shape)
    return out if world.main else None


def sum_states(states: list[dict[str, np.ndarray]], fixed: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """What :func:`reduce_state` computes, for states held in one process (shards, tests)."""
    out = {key: np.array(value, copy=True) for key, value in states[0].items()}
    for state in states[1:]:
        for key in out:
            if key not in fixed:
                out[key] = out[key] + np.asarray(state[key])
    return out


def all_sum_(world: World, tensors) -> None:
    """Sum tensors over the processes in place: every process ends with the total (all-reduce).

    For what every process needs after the sum (the heads' gradients, evaluation sums); a tensor
    not on the collectives' device travels through a copy. One process: nothing happens.
    """
    if not world.active:
        return

    for t in tensors:
        if t.device == world.device:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        else:
            tmp = t.to(world.device)
            dist.all_reduce(tmp, op=dist.ReduceOp.SUM)
            t.copy_(tmp)


def all_sum(world: World, array: np.ndarray) -> np.ndarray:
    """:func:`all_sum_` of a small fp64 array (a copy; the input is unchanged)."""
    if not world.active:
        return np.asarray(array, dtype=np.float64)
    t = torch.tensor(np.asarray(array, dtype=np.float64), device=world.device)
    all_sum_(world, [t])
    return t.cpu().numpy()


def broadcast_arrays(world: World, arrays: Optional[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Rank 0's dict of arrays on every process (``arrays`` is ignored elsewhere): the layout
    travels pickled, the data as tensors (no pickle of large states). One process: ``arrays``."""
    if not world.active:
        return arrays

    layout = broadcast(world, None if not world.main else
                       {k: (np.asarray(v).shape, np.asarray(v).dtype.str) for k, v in arrays.items()})
    out = {}
    for key in sorted(layout):
        shape, dtype = layout[key]
        value = np.asarray(arrays[key]) if world.main else np.zeros(shape, dtype=np.dtype(dtype))
        t = torch.from_numpy(np.ascontiguousarray(value).copy()).to(world.device)
        dist.broadcast(t, src=0)
        out[key] = t.cpu().numpy()
    return out
