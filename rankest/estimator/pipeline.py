"""`estimate`: stream a teacher over a corpus into accumulators and finish with a spectrum.

    python -m rankest estimate                                    # embedded teacher + corpus
    python -m rankest estimate --teacher pythia-6.9b --corpus wikitext-103 --tokens 200000

Data flow (ARCHITECTURE.md): corpus → packed windows → sampled rows (seeded, random window
order so every prefix is a uniform subsample) → teacher features (B, L, d) → head logits at the
sampled positions only (n, V) → ``ops.transform_rows`` (target rows + row statistics) →
accumulators → ``finalize`` → :class:`~rankest.spectrum.Spectrum` → run folder.
No N×V' matrix is ever built: memory is that of one chunk plus the accumulators.
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Optional, Union

import torch

from rankest.runtime import distributed
from rankest import ops
from rankest.accumulate.base import Chunk, Factor, Gram, RowStats, gram_nbytes
from rankest.io.checkpoint import check_checkpoint_options
from rankest.sources.corpus import corpus_name
from rankest.errors import UserError
from rankest.ops.reference import GRAM_PRECISIONS, SPACES  # one definition: the ops' contract

ROUTES = ("auto", "factor", "gram", "sketch")


@dataclass
class EstimateConfig:
    """Every option of `estimate` (the CLI flags, under the same names)."""

    teacher: Any = None  # short name, local folder, or a loaded rankest.teachers.Teacher
    revision: Optional[str] = None
    corpus: Union[str, list, None] = None
    tokens: Optional[int] = 16384
    seq_len: int = 256
    space: str = "clr"
    route: str = "auto"
    rank_max: Optional[int] = None
    passes: Union[int, str] = "auto"
    row_cache_dtype: str = "auto"
    keep_row_cache: bool = False
    batch_size: int = 8
    device: str = "auto"
    dtype: str = "auto"
    device_map: Optional[str] = None  # spread the teacher over the visible GPUs (teachers.load_teacher)
    max_memory: Optional[str] = None
    seed: int = 0
    positions: str = "all"
    sample: str = "windows"
    gram_precision: str = "fp64"
    out: Optional[str] = None
    overwrite: bool = False
    quiet: bool = False
    convergence: bool = True
    checkpoint_every: Optional[int] = None
    resume: bool = False
    diagnostics: bool = False  # anisotropy + head spectrum on the same batches (rankest.diagnostics)
    # n-gram targets (--teacher ngram:N), see rankest.ngram
    tokenizer: Optional[str] = None
    smoothing: str = "mle"
    min_count: int = 1
    contexts: Union[int, str, None] = "all"
    weighting: str = "equal"
    corpus_fractions: Union[str, list, None] = None

    def validate(self) -> None:
        if self.space not in SPACES:
            raise UserError(f"--space must be one of {', '.join(SPACES)}, got {self.space!r}.")
        if self.route not in ROUTES:
            raise UserError(f"--route must be one of {', '.join(ROUTES)}, got {self.route!r}.")
        if self.route == "factor" and self.space != "clr":
            raise UserError(f"the factor route is exact only for --space clr (centred log-probs equal centred "
                            f"logits, a linear function of the features); use --route gram or sketch for "
                            f"--space {self.space}.")
        if self.gram_precision not in GRAM_PRECISIONS:
            raise UserError(f"--gram-precision must be fp64 or fast, got {self.gram_precision!r}.")
        for name in ("seq_len", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(self, name)}.")
        if self.tokens is not None and int(self.tokens) < 2:
            raise UserError(f"--tokens must be at least 2 (a spectrum needs rows), got {self.tokens}.")
        if self.sample not in ("windows", "rows"):
            raise UserError(f"--sample must be windows or rows, got {self.sample!r}.")
        if self.rank_max is not None and int(self.rank_max) < 1:
            raise UserError(f"--rank-max must be a positive integer, got {self.rank_max}.")
        if self.max_memory is not None:
            parse_size(self.max_memory)
        check_checkpoint_options(self, unit="chunks")
        if self.passes != "auto" and not (isinstance(self.passes, int) and self.passes >= 1):
            raise UserError(f"--passes must be a positive integer or auto, got {self.passes!r}.")
        from rankest.io.rowcache import CACHE_DTYPES

        if self.row_cache_dtype != "auto" and self.row_cache_dtype not in CACHE_DTYPES:
            raise UserError(f"--row-cache-dtype must be auto or one of {', '.join(CACHE_DTYPES)}, "
                            f"got {self.row_cache_dtype!r}.")


def parse_size(text: str) -> int:
    """'16GB', '512MiB', '1e9' → bytes."""
    t = str(text).strip().upper().replace(" ", "")
    units = {"TIB": 2**40, "GIB": 2**30, "MIB": 2**20, "KIB": 2**10, "TB": 10**12, "GB": 10**9, "MB": 10**6,
             "KB": 10**3, "T": 10**12, "G": 10**9, "M": 10**6, "K": 10**3, "B": 1}
    for u, mult in units.items():
        if t.endswith(u):
            num = t[: -len(u)]
            break
    else:
        num, mult = t, 1
    try:
        value = float(num) * mult
    except ValueError:
        raise UserError(f"--max-memory must be a size such as 16GB or 512MiB, got {text!r}.") from None
    if not value > 0:
        raise UserError(f"--max-memory must be positive, got {text!r}.")
    return int(value)


def available_memory(device: torch.device) -> int:
    """Free memory where the accumulators live: the GPU's free memory, or the host's MemAvailable."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def _fmt_bytes(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def _sketch_available() -> bool:
    try:
        from rankest.accumulate import sketch  # noqa: F401
    except ImportError:
        return False
    return True


def choose_route(cfg: EstimateConfig, *, n_cols: int, linear: Optional[bool], budget: int,
                 device_type: str = "cpu") -> tuple[str, str]:
    """Resolve ``--route auto`` (and check an explicit route); returns (route, reason).

    factor when exact (clr space and a linear head, checked on a sample); gram when the fp64
    V'×V' Gram and the eigensolver's workspace fit the budget; otherwise sketch.
    """
    need = gram_nbytes(n_cols, on_gpu=device_type == "cuda")
    fits = need <= budget
    gram_why = (f"the V'×V' fp64 Gram plus eigensolver workspace needs {_fmt_bytes(need)} for V' = {n_cols:,}, "
                f"{'within' if fits else 'over'} the memory budget of {_fmt_bytes(budget)}")
    if cfg.route == "factor":
        if linear is False:
            raise UserError("the factor route needs logits = head(features) exactly, but this teacher's logits "
                            "differ from its head applied to its features (soft-capping or logit scaling?); "
                            "use --route gram or --route sketch.")
        return "factor", "requested; exact for clr rows of a linear head"
    if cfg.route == "gram":
        if not fits:
            raise UserError(f"the gram route does not fit: {gram_why}. Raise --max-memory, or use --route sketch "
                            f"--rank-max K (or --route factor for --space clr).")
        return "gram", f"requested; {gram_why}"
    if cfg.route == "sketch":
        if not _sketch_available():
            raise UserError("the sketch route is not available in this rankest build.")
        k = sketch_rank(cfg, n_cols)
        if k >= n_cols:
            import warnings

            warnings.warn(f"--rank-max {k} >= V' = {n_cols}: a sketch cannot beat the exact Gram here; "
                          f"using the exact gram route instead", stacklevel=2)
            return "gram", f"sketch requested with k = {k} >= V' = {n_cols}: the exact gram route instead"
        return "sketch", f"requested, k = {k}"
    # auto
    if cfg.space == "clr" and linear:
        return "factor", "auto: clr rows of a linear head (checked on the first batch) — exact, O(N·d²)"
    if fits:
        why = "auto: " + ("logits are not head(features); " if cfg.space == "clr" else "") + gram_why
        return "gram", why
    if _sketch_available():
        return "sketch", (f"auto: {gram_why}; a single-pass Nyström sketch of TᵀT with k = "
                          f"{sketch_rank(cfg, n_cols)} instead")
    raise UserError(f"no exact route fits: {gram_why}. Raise --max-memory, lower the vocabulary, or use "
                    f"--space clr (factor route).")


def resolve_passes(cfg: EstimateConfig, route: str) -> tuple[int, Optional[str]]:
    """Passes of the sketch route over the rows, and a note for ``route_reason`` (None when there
    is nothing to say): ``auto`` is one pass for a neural teacher (each pass would cost a forward
    over the corpus); q ≥ 2 caches the rows on disk once and runs q passes of randomized subspace
    iteration over the cache. Exact routes take one pass whatever is asked (an explicit exact
    route with q ≥ 2 is refused)."""
    q = 1 if cfg.passes == "auto" else int(cfg.passes)
    if q == 1:
        return 1, None
    if route != "sketch":
        if cfg.route in ("factor", "gram"):
            raise UserError(f"--passes {q} applies to the sketch route only; the {cfg.route} route is exact in one "
                            f"pass. Drop --passes, or use --route sketch.")
        return 1, f"--passes {q} ignored: the {route} route is exact in one pass"
    return q, f"--passes {q}: rows cached on disk once, then re-read per pass"


def sketch_rank(cfg: EstimateConfig, n_cols: int) -> int:
    """k of the sketch route: --rank-max, else 1024 (capped below V')."""
    return int(cfg.rank_max) if cfg.rank_max else min(1024, n_cols - 1)


def check_linear_head(teacher, input_ids: torch.Tensor, *, max_windows: int = 2, max_len: int = 128) -> tuple[bool, float]:
    """Are the model's own logits exactly its head applied to its features? (relative max error)

    Models with final-logit soft-capping or scaling are not; their clr matrix is then not
    H·Wcᵀ and the factor route would be wrong. Checked on a prefix of the first windows (a
    causal model's prefix features equal the full window's), so it costs a fraction of a
    batch. Tolerance: a few units of the teacher dtype.
    """
    ids = input_ids[:max_windows, :max_len]
    full = teacher.full_logits(ids).float()
    mine = teacher.logits(teacher.features(ids)).float()
    err = float((full - mine).abs().max() / full.abs().max().clamp_min(1e-30))
    tol = {torch.float64: 1e-10, torch.float32: 1e-4}.get(teacher.dtype, 3e-2)
    return err <= tol, err


def _row_dtype(teacher, gram_precision: str) -> torch.dtype:
    """dtype of the target rows handed to the accumulators.

    fp64 teachers give fp64 rows (the exact-route tests); ``fast`` on a GPU gives bf16 rows, so
    the Gram/sketch products run on tensor cores with fp32 accumulation (an exact product of two
    bf16 numbers) and the fp64 carry; otherwise fp32 rows.
    """
    if teacher.dtype == torch.float64:
        return torch.float64
    if gram_precision == "fast" and teacher.device.type == "cuda":
        return torch.bfloat16
    return torch.float32


def _sketch_precision(gram_precision: str, row_dtype: torch.dtype) -> str:
    """fp64 products for --gram-precision fp64; otherwise fp32 products, or bf16 products when
    the rows already are bf16 (fast on a GPU). bf16 moves the W-error by up to ~3e-3 on steep
    spectra (benchmarks/reports/svd_cpu.md), fp32 by nothing measurable."""
    if gram_precision == "fp64":
        return "fp64"
    return "fast" if row_dtype == torch.bfloat16 else "fp32"


def _milestones(n: int) -> list[int]:
    return sorted({m for m in (n // 8, n // 4, n // 2) if 1 < m < n})


def run_estimate(*, return_summary: bool = False, **kwargs):
    """Estimate the spectrum of a teacher's target matrix (Python API of ``rankest estimate``).

    Keyword arguments are the fields of :class:`EstimateConfig`. Returns the
    :class:`~rankest.spectrum.Spectrum` (with ``meta`` holding teacher, corpus, route, NLL and
    provenance); writes a run folder when ``out`` is given.
    """
    from rankest.sources.corpus import DEFAULT_CORPUS
    from rankest.sources.teachers import DEFAULT_TEACHER

    unknown = set(kwargs) - set(EstimateConfig.__dataclass_fields__)
    if unknown:
        raise TypeError(f"unknown options: {sorted(unknown)}")
    cfg = EstimateConfig(**kwargs)
    if cfg.teacher is None:
        cfg.teacher = DEFAULT_TEACHER
    if cfg.corpus is None:
        cfg.corpus = DEFAULT_CORPUS
    cfg.validate()
    if isinstance(cfg.teacher, str) and cfg.teacher.startswith("ngram:"):
        from rankest.targets.ngram import run_ngram_estimate

        for flag, on in (("--resume", cfg.resume), ("--checkpoint-every", cfg.checkpoint_every is not None),
                         ("--diagnostics", cfg.diagnostics), ("--passes >= 2", cfg.passes not in ("auto", 1))):
            if on:
                raise UserError(f"{flag} does not apply to n-gram targets yet (they run in one pass, without "
                                f"checkpoints); drop it.")
        return run_ngram_estimate(cfg, return_summary=return_summary)
    # Under torchrun (WORLD_SIZE > 1) join the process group; one process: nothing happens.
    world, run_device = distributed.setup(cfg.device)
    try:
        return _estimate(cfg, world, run_device, return_summary=return_summary)
    finally:
        distributed.shutdown(world)


def _estimate(cfg: EstimateConfig, world: "distributed.World", run_device: str, *, return_summary: bool):
    """The body of :func:`run_estimate` for one process of ``world`` (rank 0 alone writes files and
    returns the spectrum; the other ranks return None)."""
    from rankest.io.checkpoint import (CHECKPOINT_NAME, Interrupted, StopOnSignal, check_same_run, open_run_folder,
                             remove_checkpoint, rng_state, set_rng_state, write_checkpoint)
    from rankest.sources.corpus import iter_batches, plan_rows, windows_for
    from rankest.io.results import now_iso, provenance, write_run
    from rankest.sources.teachers import teacher_and_documents

    run_config = _run_config(cfg)
    ckpt = None  # rank 0's checkpoint when resuming (it alone holds the summed states)

    def prepare():
        nonlocal ckpt
        ckpt = open_run_folder(cfg.out, resume=cfg.resume, overwrite=cfg.overwrite, results_file="results.h5",
                               command="estimate", run="run", run_config=run_config)
        return None if ckpt is None else ckpt.position

    # Rank 0 prepares the folder and reads the checkpoint; the others learn the position.
    position = distributed.on_main(world, prepare) if cfg.out else None
    out = Path(cfg.out) if cfg.out and world.main else None
    started = now_iso()
    t0 = time.perf_counter()

    teacher, docs = teacher_and_documents(cfg.teacher, cfg.corpus, revision=cfg.revision, device=run_device,
                                          dtype=cfg.dtype, seq_len=cfg.seq_len, quiet=cfg.quiet,
                                          device_map=cfg.device_map)
    # Tokenise enough of the corpus that the sample is drawn from a pool ≥ 8× its size.
    per_window = cfg.seq_len if cfg.positions == "all" else 1
    max_windows = None if cfg.tokens is None else math.ceil(max(8 * int(cfg.tokens), 2**20) / per_window)
    windows = windows_for(cfg.corpus, docs, teacher.tokenizer, cfg.seq_len, max_windows=max_windows,
                          progress=not cfg.quiet)
    plan = plan_rows(len(windows), cfg.seq_len, positions=cfg.positions, tokens=cfg.tokens, seed=cfg.seed,
                     sample=cfg.sample)
    n_total = plan.n_rows
    # What the data and teacher resolved to: a checkpoint of other rows or another model is refused.
    derived = {"n_cols": teacher.n_cols, "teacher_dtype": str(teacher.dtype).replace("torch.", ""),
               "n_rows": n_total, "rows_sha256": _rows_fingerprint(windows, plan)}
    if position is not None:  # (a collective: rank 0 checks, every rank raises on a difference)
        distributed.on_main(world, lambda: check_same_run(ckpt.derived, derived, ckpt.path, "data or teacher"))

    # A sample of the first batch decides whether the head is linear (factor route) before anything
    # is accumulated.
    batches = iter_batches(windows, plan, cfg.batch_size)
    first = next(batches)
    linear, lin_err = None, None  # only the clr space can use the factor route
    if cfg.space == "clr":
        with torch.inference_mode():
            linear, lin_err = check_linear_head(teacher, first.input_ids.to(teacher.device))
    diag = None
    if cfg.diagnostics:  # every layer's hidden states from the same forward pass: no extra pass
        from rankest.diagnostics.pipeline import EstimateDiagnostics

        diag = EstimateDiagnostics(teacher)
    # The accumulators' budget: --max-memory less what the diagnostics hold (a d×d fp64 Gram per
    # layer: 4.4 GB for Pythia-6.9B), or half of what is free once they are allocated.
    budget = parse_size(cfg.max_memory) if cfg.max_memory else available_memory(teacher.device) // 2
    if diag is not None and cfg.max_memory:
        budget -= diag.acc.nbytes()
        if budget <= 0:
            raise UserError(f"--diagnostics keeps a d×d fp64 Gram per layer ({_fmt_bytes(diag.acc.nbytes())}), "
                            f"more than --max-memory {cfg.max_memory}; raise --max-memory, or drop --diagnostics "
                            "and run `rankest anisotropy --no-pca` separately.")
    if position is not None:  # resuming: the checkpoint's route, whatever memory says today
        route, reason = position["route"], position["route_reason"]
    else:  # rank 0 decides (free memory differs between processes)
        route, reason = distributed.on_main(world, lambda: choose_route(
            cfg, n_cols=teacher.n_cols, linear=linear, budget=budget, device_type=teacher.device.type))

    # The plan's batches: batch j holds windows [j·B, (j+1)·B) of the plan, rows
    # [rows_before[j·B], rows_before[(j+1)·B]) in the plan's order. With P processes, rounds of P
    # consecutive batches, batch j on rank j mod P: the rows never depend on P.
    bsz, n_win = cfg.batch_size, plan.windows.numel()
    rows_before = plan.rows_before()
    n_batches = -(-n_win // bsz)

    def row_at(j: int) -> int:  # first global row of batch j (n_total for j = n_batches)
        return int(rows_before[min(j * bsz, n_win)])

    passes, passes_note = resolve_passes(cfg, route)
    if passes_note:
        reason = f"{reason}; {passes_note}"
    row_dtype = _row_dtype(teacher, cfg.gram_precision)
    stats_acc = RowStats(device=teacher.device)
    cache = None
    if route == "sketch" and passes > 1:
        # The first pass is the teacher's; randomized_svd then re-reads the cached rows q times.
        # Every process caches its own shard of the rows; the passes sum their products.
        from rankest.io.rowcache import cache_nbytes

        def rows_of_rank(r: int, j: int) -> int:  # rows of rank r's batches among the first j
            return sum(row_at(i + 1) - row_at(i) for i in range(r, j, world.size))

        cache = acc = _open_row_cache(cfg, world, position, n_cols=teacher.n_cols,
                                      shard_rows=rows_of_rank(world.rank, n_batches), row_dtype=row_dtype,
                                      rows_of_rank=rows_of_rank)
        reason = f"{reason} ({cache.dtype}, {_fmt_bytes(cache_nbytes(n_total, teacher.n_cols, cache.dtype))})"
    elif route == "factor":
        weight, bias = teacher.head()
        acc = Factor(weight, bias, teacher.n_cols, precision=cfg.gram_precision, device=teacher.device)
    elif route == "gram":
        acc = Gram(teacher.n_cols, space=cfg.space, precision=cfg.gram_precision, device=teacher.device)
    else:
        from rankest.accumulate.sketch import Sketch

        acc = Sketch(teacher.n_cols, sketch_rank(cfg, teacher.n_cols), space=cfg.space, seed=cfg.seed,
                     precision=_sketch_precision(cfg.gram_precision, row_dtype), device=teacher.device)

    milestones = _milestones(n_total) if cfg.convergence and acc.cheap_finalize else []
    convergence: dict[int, dict] = {}
    # The accumulators whose states a checkpoint holds and the processes sum: the row cache is
    # on disk instead (each process reopens its own), the diagnostics' anisotropy sums join.
    summed_accs = (stats_acc,) + (() if cache is not None else (acc,)) + (() if diag is None else (diag.acc,))
    next_batch = 0
    if position is not None:
        next_batch = int(position["next_batch"])
        if world.main:  # rank 0 carries the sum of every shard so far; the others start at zero
            for a in summed_accs:
                if a.name not in ckpt.states:
                    raise UserError(f"the checkpoint {ckpt.path} has no {a.name} state; delete it and start afresh.")
                a.load_state(ckpt.states[a.name])
            convergence.update(ckpt.convergence)
            set_rng_state(ckpt.rng, teacher.device)
    rows_at_start = row_at(next_batch)

    def summed(a):  # this accumulator's state summed over the processes (rank 0), or itself
        if not world.active:
            return a
        state = distributed.reduce_state(world, a.state(), a.fixed_state_keys)
        if not world.main:
            return None
        total = copy.deepcopy(a)
        total.load_state(state)
        return total

    def snapshot(m: int) -> None:
        acc_m, stats_m = summed(acc), summed(stats_acc)
        if world.main:
            convergence[m] = acc_m.finalize(energy=stats_m.energy).metrics()

    def feed(chunk: Optional[Chunk], g0: int, lo: int, hi: int) -> None:
        # One round: the chunk (None when this rank has no batch) starts at global row g0; the
        # round covers global rows [lo, hi). Every rank stops at each milestone m in (lo, hi] with
        # exactly its rows < m fed, so each snapshot covers exactly the first m rows of the plan.
        done = 0
        n = 0 if chunk is None else chunk.n
        for m in (m for m in milestones if lo < m <= hi):
            cut = min(max(m - g0, done), n)
            if cut > done:
                part = chunk.slice(done, cut)
                acc.update(part)
                stats_acc.update(part)
                done = cut
            snapshot(m)
        if n > done:
            part = chunk.slice(done, n)
            acc.update(part)
            stats_acc.update(part)

    def chunk_of(batch) -> Chunk:
        ids = batch.input_ids.to(teacher.device, non_blocking=True)
        h_all = teacher.features(ids) if diag is None else diag.forward(ids, batch.mask.to(teacher.device))
        mask = batch.mask.to(teacher.device)
        h = h_all[mask]
        targets = batch.targets.to(teacher.device)[mask]
        logits = teacher.logits(h)
        rows, stats = ops.transform_rows(logits, targets, teacher.n_cols, cfg.space, route != "factor", row_dtype)
        if not bool(torch.isfinite(stats[:, 0]).all()):
            raise UserError(f"the teacher produced NaN/Inf logits in batch {batch.start // bsz} (windows "
                            f"{batch.windows[:4].tolist()}…); "
                            f"try --dtype fp32 or check the model weights.")
        return Chunk(stats=stats, rows=rows if route != "factor" else None, features=h)

    checkpointed = [position is not None]  # a checkpoint counts this run's row cache: keep it on failure

    def save_checkpoint(j: int) -> None:
        # Collective: the states are summed onto rank 0, which writes; a failed write stops every rank.
        if cache is not None:  # the rows the checkpoint counts must be on disk before it is
            cache.sync()
        states = {a.name: distributed.reduce_state(world, a.state(), a.fixed_state_keys) for a in summed_accs}
        message = None
        if world.main:
            try:
                write_checkpoint(out / CHECKPOINT_NAME, config=run_config, derived=derived, convergence=convergence,
                                 states=states, rng=rng_state(teacher.device),
                                 position={"next_batch": j, "n_batches": n_batches, "rows_done": row_at(j),
                                           "route": route, "route_reason": reason, "world_size": world.size})
            except UserError as e:
                if not world.active:
                    raise
                message = str(e)
        message = distributed.broadcast(world, message)
        if message is not None:
            from rankest.io.checkpoint import CheckpointWriteError

            raise CheckpointWriteError(message)
        checkpointed[0] = True

    from tqdm.auto import tqdm

    bar = tqdm(total=n_total, initial=rows_at_start, unit="tok", unit_scale=True, desc=f"estimate {route}",
               disable=cfg.quiet or not world.main, dynamic_ncols=True)
    every = cfg.checkpoint_every
    t_loop = time.perf_counter()
    # SIGINT/SIGTERM: checkpoint at the end of the round, then stop (only with a run folder).
    try:
        with torch.inference_mode(), StopOnSignal(enabled=bool(cfg.out)) as stop:
            for j0 in range(next_batch, n_batches, world.size):
                j1 = min(j0 + world.size, n_batches)
                mine = j0 + world.rank
                chunk = chunk_of(next(iter_batches(windows, plan, bsz, start=mine * bsz))) if mine < j1 else None
                feed(chunk, row_at(mine), row_at(j0), row_at(j1))
                bar.update(row_at(j1) - row_at(j0))  # global rows of the round: the bar shows global tokens/s
                stopping = bool(cfg.out) and distributed.any_true(world, stop.signum is not None)
                if j1 < n_batches and (stopping or (every and j1 // every > j0 // every)):
                    save_checkpoint(j1)
                if stopping and j1 < n_batches:
                    bar.close()
                    signum = stop.signum or 15
                    raise Interrupted(f"stopped after {row_at(j1):,} of {n_total:,} rows; the checkpoint "
                                      f"{Path(cfg.out) / CHECKPOINT_NAME} holds them: rerun the same command with "
                                      f"--resume to continue", signum)
        if cache is not None and every and next_batch < n_batches:
            save_checkpoint(n_batches)  # the teacher's pass is done: a resume goes straight to the passes
    except BaseException:
        # The cache is a checkpointed run's state; without a checkpoint it is an intermediate file.
        if cache is not None and not checkpointed[0]:
            cache.remove()
        raise
    bar.close()
    _sync(teacher.device)  # GPU work is asynchronous: the stream time must include the last batch
    t_acc = time.perf_counter() - t_loop
    if world.active:  # rank 0 finalises the sum of every shard (in place: no copy); the other ranks are done
        totals = [(a, distributed.reduce_state(world, a.state(), a.fixed_state_keys)) for a in summed_accs]
        if world.main:
            for a, state in totals:
                a.load_state(state)

    t_fin = time.perf_counter()
    if cache is not None:  # every process streams its shard in every pass
        spec = _multipass_spectrum(cache, cfg, passes=passes, n_cols=teacher.n_cols, row_dtype=row_dtype,
                                   device=teacher.device, energy=stats_acc.energy,
                                   reduce=distributed.sum_over_processes(world))
        if not world.main:
            return None
    elif not world.main:
        return None
    else:
        spec = acc.finalize(energy=stats_acc.energy)
    _sync(teacher.device)
    t_fin = time.perf_counter() - t_fin
    if cfg.convergence:
        convergence[acc.n_rows] = spec.metrics()
    spec.convergence = convergence
    row_summary = stats_acc.summary()
    spec.meta.update({
        "teacher": teacher.name, "teacher_source": teacher.source, "revision": cfg.revision,
        "corpus": corpus_name(cfg.corpus),
        "route_reason": reason, "linear_head_check_rel_err": lin_err,
        "nll": row_summary["nll"], "perplexity": row_summary["perplexity"], "entropy": row_summary["entropy"],
        "hidden_size": teacher.hidden_size, "logit_width": teacher.logit_width, "seed": cfg.seed,
        "dtype": str(teacher.dtype).replace("torch.", ""), "device": str(teacher.device),
        "device_map": teacher.provenance()["device_map"],
        "seconds_total": time.perf_counter() - t0, "seconds_stream": t_acc, "seconds_finalize": t_fin,
        "tokens_per_second": (n_total - rows_at_start) / t_acc if t_acc > 0 else None,
        "world_size": world.size, "resumed_at_rows": rows_at_start,
    })
    if route == "factor":
        spec.meta["model_energy"] = acc.model_energy()
    if diag is not None:
        spec.meta.update(diag.summary())
    if out is not None:
        prov = provenance(teacher.device)
        prov.update({"started": started, "finished": now_iso()})
        # fields(), not asdict(): asdict deep-copies, and `teacher` may be a loaded model.
        config = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name not in ("out", "overwrite", "quiet")}
        config["teacher"] = teacher.name
        config["corpus"] = corpus_name(cfg.corpus)
        summary = write_run(out, spec, config=config, prov=prov)
        if diag is not None:
            diag.write(out, config=config, prov=prov)
        # The results now hold everything the checkpoint did: a finished run folder has none.
        remove_checkpoint(out / CHECKPOINT_NAME)
        spec.meta["out"] = str(out)
        if return_summary:
            return spec, summary
    return spec


def _open_row_cache(cfg: EstimateConfig, world, position: Optional[dict], *, n_cols: int, shard_rows: int,
                    row_dtype: torch.dtype, rows_of_rank):
    """This process's row cache for --passes ≥ 2, sized for its ``shard_rows``: ``DIR/rows.h5``
    (``rows.rank{r}.h5`` under torchrun; a temporary folder without --out), created, or reopened
    after the rows of the batches the checkpoint counts (``rows_of_rank(rank, next_batch)``)."""
    import tempfile

    from rankest.io.rowcache import RowCache, resolve_cache_dtype

    dtype = resolve_cache_dtype(cfg.row_cache_dtype, row_dtype)
    where = Path(cfg.out) if cfg.out else Path(tempfile.mkdtemp(prefix="rankest-rows-"))
    name = "rows.h5" if not world.active else f"rows.rank{world.rank}.h5"
    if position is None:
        return RowCache(where / name, n_cols, shard_rows, dtype=dtype)
    if int(position.get("world_size", 1)) != world.size:
        raise UserError(f"--resume: the row cache of --passes is sharded over the {position.get('world_size', 1)} "
                        f"process(es) that wrote it, and this run has {world.size}; resume with "
                        f"{position.get('world_size', 1)}.")
    return RowCache(where / name, n_cols, shard_rows, dtype=dtype,
                    resume_rows=rows_of_rank(world.rank, int(position["next_batch"])))


def _multipass_spectrum(cache, cfg: EstimateConfig, *, passes: int, n_cols: int, row_dtype: torch.dtype,
                        device: torch.device, energy: float, reduce=None):
    """q passes of randomized subspace iteration over the cached rows → a sketch-route Spectrum
    (σ̂ ≤ σ, with the error estimates of :func:`rankest.linalg.randomized_svd`)."""
    from rankest.linalg import product_dtype, randomized_svd
    from rankest.accumulate.sketch import spectrum_from_svd

    precision = _sketch_precision(cfg.gram_precision, row_dtype)
    try:
        result = randomized_svd(cache.stream(device=device, out_dtype=product_dtype(precision, device)),
                                sketch_rank(cfg, n_cols), passes=passes, method="subspace", precision=precision,
                                seed=cfg.seed, device=device, return_vectors=False, reduce=reduce)
    finally:
        if not cfg.keep_row_cache:
            cache.remove()
    spec = spectrum_from_svd(result, space=cfg.space, energy=energy)
    spec.meta["row_cache"] = {"dtype": cache.dtype, "rows": result.info["n_rows"],
                              "path": str(cache.path) if cfg.keep_row_cache else None}
    return spec


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


#: Options that do not change the result (where and how the run executes): a run may resume
#: with other values of these.
NOT_COMPARED = ("out", "overwrite", "quiet", "resume", "checkpoint_every", "device", "device_map", "max_memory")


def _run_config(cfg: EstimateConfig) -> dict:
    """The options a checkpoint must share with the run that resumes it (JSON-able)."""
    from rankest.io.checkpoint import run_config

    return run_config(cfg, skip=NOT_COMPARED)


def _rows_fingerprint(windows: torch.Tensor, plan) -> str:
    """sha256 of the sampled windows' tokens and the plan's row positions: the rows themselves."""
    h = hashlib.sha256()
    h.update(windows[plan.windows].contiguous().numpy().tobytes())
    h.update(plan.positions.contiguous().numpy().tobytes())
    return h.hexdigest()
