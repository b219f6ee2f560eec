"""`estimate`: stream a target's rows into an accumulator and finish with a spectrum.

    python -m rankest estimate                                    # embedded teacher + corpus
    python -m rankest estimate --teacher pythia-6.9b --corpus wikitext-103 --tokens 200000
    python -m rankest estimate --teacher ngram:5 --tokenizer pythia --space prob
    python -m rankest estimate --teacher logits:runs/logits.npy --space clr --tokens all

Every target (a neural teacher, n-gram counts, a file of logits, rows in memory:
:mod:`rankest.targets`) flows through the same named steps (docs/design.md, "The estimate
pipeline"):

    open the run folder  →  plan the target's rows  →  check them against a checkpoint
      →  choose the route (factor / gram / sketch, and its passes)  →  build the accumulators
      →  restore a checkpoint  →  stream the units (checkpoints, signals, convergence snapshots)
      →  finalize (rank 0, the processes' states summed)  →  write results and report

No N×V' matrix is ever built: memory is that of one chunk plus the accumulators. Under
torchrun unit j goes to process j mod P, in rounds of P consecutive units, and every snapshot
covers exactly the first m rows of the plan, whatever P.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from rankest.accumulate.base import Accumulator, Chunk
from rankest.accumulate.factor import Factor
from rankest.accumulate.gram import Gram
from rankest.accumulate.rowstats import RowStats
from rankest.accumulate.sketch import Sketch
from rankest.errors import UserError
from rankest.estimator.config import EstimateConfig
from rankest.estimator.multipass import multipass_spectrum, open_row_cache
from rankest.estimator.routes import choose_route, resolve_passes, sketch_precision, sketch_rank
from rankest.io.files import now_iso
from rankest.io.results import provenance, write_run
from rankest.io.rowcache import cache_nbytes
from rankest.report.estimate import write_report
from rankest.runtime import distributed
from rankest.runtime.memory import _fmt_bytes, available_memory, parse_size
from rankest.runtime.progress import status
from rankest.runtime.run import EXECUTION_OPTIONS, Run, release_run_folder, result_config, run_config
from rankest.sources.corpus import corpus_name
from rankest.spectrum import Spectrum
from rankest.targets.base import Target
from rankest.targets.logits import LogitsTarget, rows_target
from rankest.targets.neural import NeuralTarget
from rankest.targets.ngram import NgramTarget, is_ngram_teacher, parse_fractions


def milestones(n: int) -> list[int]:
    """The convergence snapshots: the metrics at N/8, N/4 and N/2 (and at N, the result)."""
    return sorted({m for m in (n // 8, n // 4, n // 2) if 1 < m < n})


def make_target(cfg: EstimateConfig, *, device: str) -> Target:
    """The target ``cfg`` names: rows in memory (``rows=``), ``logits:PATH``, ``ngram:N``, or a
    neural teacher (a short name, a folder, a loaded Teacher)."""
    if cfg.rows is not None:
        return rows_target(cfg.rows, cfg)
    if isinstance(cfg.teacher, str) and cfg.teacher.startswith("logits:"):
        return LogitsTarget.open(cfg.teacher, cfg)
    if is_ngram_teacher(cfg.teacher):
        return NgramTarget.from_options(cfg)
    return NeuralTarget.from_options(cfg, device=device)


class Estimate:
    """The steps of one estimate of ``target`` on one process of ``run.world`` (module docstring).

    Call the steps in order through :meth:`compute`; rank 0 gets the Spectrum, the others None.
    """

    def __init__(self, cfg: EstimateConfig, target: Target, run: Run) -> None:
        self.cfg, self.target, self.run, self.world = cfg, target, run, run.world
        self.convergence: dict[int, dict] = {}
        self.cache = None  # the row cache of --passes >= 2
        self.seconds: dict[str, float] = {}

    # ---- plan and route ----------------------------------------------------------------------
    def budget(self) -> int:
        """The accumulators' memory: --max-memory less what the target's own accumulators hold
        (the diagnostics' d×d Gram per layer: 4.4 GB for Pythia-6.9B), or half of what is free."""
        cfg, extra = self.cfg, sum(a.nbytes() for a in self.target.extra_accumulators())
        if not cfg.max_memory:
            return available_memory(self.target.device) // 2
        budget = parse_size(cfg.max_memory) - extra
        if budget <= 0:
            raise UserError(f"--diagnostics keeps a d×d fp64 Gram per layer ({_fmt_bytes(extra)}), more than "
                            f"--max-memory {cfg.max_memory}; raise --max-memory, or drop --diagnostics and run "
                            "`rankest anisotropy --no-pca` separately.")
        return budget

    def choose_route(self) -> None:
        """The route (rank 0 decides: free memory differs between processes) and its passes; a
        resumed run keeps its checkpoint's route, whatever memory says today."""
        position = self.run.position
        if position is not None:
            self.route, self.reason = position["route"], position["route_reason"]
            self.passes = resolve_passes(self.cfg, self.route, rows_stored=self.target.rows_stored)[0]
            self.memory = distributed.on_main(self.world, self.budget)  # the SVD's method: the same everywhere
            return
        # Rank 0's budget for every process: it also picks the method of the --passes SVD, which
        # every process must run alike.
        self.memory = budget = distributed.on_main(self.world, self.budget)
        self.route, self.reason = distributed.on_main(self.world, lambda: choose_route(self.cfg, self.target,
                                                                                        budget=budget))
        self.passes, note = resolve_passes(self.cfg, self.route, rows_stored=self.target.rows_stored)
        if self.passes != 1 and not self.target.supports_passes:
            raise UserError(f"--passes {self.passes} needs rows that can be cached; {self.target.name} streams its "
                            f"rows in one pass: drop --passes.")
        if note:
            self.reason = f"{self.reason}; {note}"

    # ---- accumulators ------------------------------------------------------------------------
    def build(self) -> None:
        """The route's accumulator, the row statistics, and the list of states that checkpoints
        hold and the processes sum (the row cache is on disk instead)."""
        cfg, target, route = self.cfg, self.target, self.route
        precision = target.precision or cfg.gram_precision
        self.stats = RowStats(device=target.device)
        if route == "sketch" and self.passes != 1:
            # The first pass is the target's; randomized_svd then re-reads the cached rows q times.
            # Every process caches its own shard of the rows; the passes sum their products.
            self.acc = self.cache = open_row_cache(cfg, self.world, self.run.position, n_cols=target.n_cols,
                                                   shard_rows=self.rows_of_rank(self.world.rank, target.n_units),
                                                   row_dtype=target.row_dtype, rows_of_rank=self.rows_of_rank)
            if self.run.position is None:
                self.reason += f" ({self.cache.dtype}, {_fmt_bytes(cache_nbytes(target.n_rows, target.n_cols, self.cache.dtype))})"
        else:
            self.acc = target.accumulator(route, precision=precision, space=cfg.space) or self.generic(precision)
        self.summed_accs = [self.stats] + ([] if self.cache is not None else [self.acc]) + target.extra_accumulators()
        self.marks, self.snapshots_skipped = self.plan_snapshots()

    def plan_snapshots(self) -> tuple[list[int], Optional[str]]:
        """The convergence milestones, or none and the reason results will state."""
        if not self.cfg.convergence:
            return [], "--no-convergence"
        if self.cache is not None:
            return [], (f"--passes {self.passes} finalises once, after its passes over the cached rows (a snapshot "
                        "would need passes of its own)")
        if not self.acc.cheap_finalize:
            return [], f"each snapshot would cost {self.acc.finalize_cost()}, as much as the final step"
        return milestones(self.target.n_rows), None

    def generic(self, precision: str) -> Accumulator:
        cfg, target = self.cfg, self.target
        if self.route == "factor":
            weight, bias = target.head()
            return Factor(weight, bias, target.n_cols, precision=precision, device=target.device)
        if self.route == "gram":
            return Gram(target.n_cols, space=cfg.space, precision=precision, device=target.device)
        return Sketch(target.n_cols, sketch_rank(cfg, target.n_cols), space=cfg.space, seed=cfg.seed,
                      precision=sketch_precision(precision, target.row_dtype), device=target.device)

    def rows_of_rank(self, rank: int, j: int) -> int:
        """Rows of process ``rank``'s units among the first j."""
        t = self.target
        return sum(t.rows_before(i + 1) - t.rows_before(i) for i in range(rank, j, self.world.size))

    def restore(self) -> int:
        """Rank 0 takes the checkpoint's states (the sum of every shard so far; the other processes
        start at zero), snapshots and RNG states; returns the first unit to stream."""
        position = self.run.position
        if position is None:
            return 0
        states = self.run.saved_states([a.name for a in self.summed_accs])
        distributed.on_main(self.world, lambda: self.check_position(position, states))  # every process raises
        if states is not None:
            for a in self.summed_accs:
                try:
                    a.load_state(states[a.name])
                except (KeyError, ValueError, TypeError, RuntimeError) as e:  # a state of another shape or kind
                    raise UserError(f"the checkpoint {self.run.checkpoint.path} holds a {a.name} state this run cannot "
                                    f"continue ({type(e).__name__}: {' '.join(str(e).split())[:200]}); delete it (or "
                                    f"pass --overwrite instead of --resume) to start afresh.") from e
            self.convergence.update(self.run.checkpoint.convergence)
            self.run.restore_rng(self.target.device)
        return int(position["next_batch"])

    def check_position(self, position: dict, states: dict) -> None:
        """Rank 0: the checkpoint's counts agree — its batch within this plan, its rows done
        = the plan's rows before that batch = every state's row count — and its energy is
        finite, or it is refused."""
        t, path = self.target, self.run.checkpoint.path
        try:
            j, done = int(position["next_batch"]), int(position["rows_done"])
            counts = {name: int(np.asarray(s["n_rows"])) for name, s in states.items() if "n_rows" in s}
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"the checkpoint {path} is damaged (its position lacks {e}); delete it and start "
                            f"afresh.") from e
        plan = t.rows_before(j) if 0 <= j <= t.n_units else None
        streamed = {self.stats.name} | ({self.acc.name} if self.cache is None else set())  # every row, once
        wrong = {name: n for name, n in counts.items() if n != done and name in streamed}
        energy = np.asarray(states.get(self.stats.name, {}).get("sums", np.zeros(1))).ravel()[:1]
        if not np.isfinite(energy).all():
            raise UserError(f"the checkpoint {path} holds a non-finite energy ‖T‖_F² = {float(energy[0]):.3g} in "
                            f"state/{self.stats.name}/sums: the run that wrote it streamed non-finite rows; delete it "
                            f"(or pass --overwrite instead of --resume) to start afresh.")
        if plan != done or int(position.get("n_batches", t.n_units)) != t.n_units or wrong:
            raise UserError(f"the checkpoint {path} is inconsistent (batch {j} of {position.get('n_batches')}, "
                            f"{done:,} rows done, the plan has {t.n_units} batches and {plan} rows before batch {j}, "
                            f"states count {counts}); delete it (or pass --overwrite instead of --resume) to start "
                            f"afresh.")

    # ---- streaming ---------------------------------------------------------------------------
    def summed(self, a: Accumulator) -> Optional[Accumulator]:
        """``a``'s state summed over the processes (rank 0; None elsewhere), or ``a`` itself."""
        if not self.world.active:
            return a
        state = distributed.reduce_state(self.world, a.state(), a.fixed_state_keys)
        if not self.world.main:
            return None
        total = copy.deepcopy(a)
        total.load_state(state)
        return total

    def snapshot(self, m: int) -> None:
        acc, stats = self.summed(self.acc), self.summed(self.stats)
        if self.world.main:
            stats.check_finite(f"in the first {m:,} rows")
            self.convergence[m] = self.target.finish(acc.finalize(energy=stats.energy)).metrics()

    def update(self, part: Chunk) -> None:
        self.acc.update(part)
        self.stats.update(part)

    def feed(self, chunk: Optional[Chunk], g0: int, lo: int, hi: int) -> None:
        """One round: this process's chunk (None when it has no unit) starts at global row g0; the
        round covers global rows [lo, hi). Every process stops at each milestone m in (lo, hi]
        with exactly its rows < m fed, so each snapshot covers exactly the first m rows."""
        done, n = 0, 0 if chunk is None else chunk.n
        for m in (m for m in self.marks if lo < m <= hi):
            cut = min(max(m - g0, done), n)
            if cut > done:
                self.update(chunk.slice(done, cut))
                done = cut
            self.snapshot(m)
        if n > done:
            self.update(chunk.slice(done, n))

    def save(self, j: int) -> None:
        """Checkpoint after unit j (collective: the states are summed onto rank 0, which writes)."""
        if self.cache is not None:  # the rows the checkpoint counts must be on disk before it is
            self.cache.sync()
        t = self.target
        states = {a.name: distributed.reduce_state(self.world, a.state(), a.fixed_state_keys) for a in self.summed_accs}
        self.run.save(states=states, convergence=self.convergence, device=t.device,
                      position={"next_batch": j, "n_batches": t.n_units, "rows_done": t.rows_before(j),
                                "route": self.route, "route_reason": self.reason})

    def stream(self, start: int) -> None:
        """Every unit from ``start`` on, in rounds of P; a checkpoint every K units and on SIGINT /
        SIGTERM (:meth:`rankest.runtime.run.Run.units`)."""
        t, world, run = self.target, self.world, self.run
        n_units, n_total = t.n_units, t.n_rows
        self.rows_at_start = t.rows_before(start)
        bar = tqdm(total=n_total, initial=self.rows_at_start, unit=t.unit, unit_scale=True,
                   desc=f"estimate {self.route}", disable=self.cfg.quiet or not world.main, dynamic_ncols=True)
        t_loop = time.perf_counter()
        try:
            with torch.inference_mode():
                for j0 in run.units(start, n_units, stride=world.size, save=self.save,
                                    stopped=lambda j: f"stopped after {t.rows_before(j):,} of {n_total:,} rows"):
                    j1, mine = min(j0 + world.size, n_units), j0 + world.rank
                    chunk = t.chunk(mine, self.acc.needs) if mine < j1 else None
                    self.feed(chunk, t.rows_before(mine), t.rows_before(j0), t.rows_before(j1))
                    bar.update(t.rows_before(j1) - t.rows_before(j0))  # the global rows: global tokens/s
            if self.cache is not None and run.every and start < n_units:
                self.save(n_units)  # the first pass is done: a resume goes straight to the passes
        except BaseException:
            # The cache is a checkpointed run's state; without a checkpoint it is an intermediate file.
            if self.cache is not None and not run.saved:
                self.cache.remove()
            raise
        finally:
            bar.close()
        _sync(t.device)  # GPU work is asynchronous: the stream time must include the last unit
        self.seconds["stream"] = time.perf_counter() - t_loop

    # ---- the end -----------------------------------------------------------------------------
    def finalize(self) -> Optional[Spectrum]:
        """Rank 0 finalises the sum of every shard (in place: no copy); the other processes are done
        (with --passes every process streams its shard in every pass first)."""
        world, t = self.world, self.target
        if world.active:
            totals = [(a, distributed.reduce_state(world, a.state(), a.fixed_state_keys)) for a in self.summed_accs]
            if world.main:
                for a, state in totals:
                    a.load_state(state)
        t_fin = time.perf_counter()
        if self.cache is not None:
            spec = multipass_spectrum(self.cache, self.cfg, passes=self.passes, n_cols=t.n_cols, row_dtype=t.row_dtype,
                                      device=t.device, energy=self.stats.energy, budget=self.memory,
                                      reduce=distributed.sum_over_processes(world))
        if not world.main:
            return None
        # (a checkpoint of non-finite states is refused when read: rankest.io.checkpoint)
        self.stats.check_finite(f"in the {self.stats.n_rows:,} rows")
        if self.cache is None:  # one LAPACK-bound call, no bar: a status line when it takes a while
            with status(f"finalize of the {self.route} route ({self.acc.n_rows:,} rows)", quiet=self.cfg.quiet):
                spec = self.acc.finalize(energy=self.stats.energy)
        spec = t.finish(spec)
        _sync(t.device)
        self.seconds["finalize"] = time.perf_counter() - t_fin
        if self.cfg.convergence:
            self.convergence[self.acc.n_rows] = spec.metrics()
        spec.convergence = self.convergence
        return spec

    def describe(self, spec: Spectrum, *, seconds_total: float) -> None:
        """The spectrum's ``meta``: route, row statistics, the target's facts, timings."""
        cfg, t, rows = self.cfg, self.target, self.stats.summary()
        stream = self.seconds.get("stream", 0.0)
        spec.meta.update({
            "revision": cfg.revision, "corpus": corpus_name(cfg.corpus) if t.uses_corpus else None,
            "route_reason": self.reason,
            "nll": rows["nll"], "perplexity": rows["perplexity"], "entropy": rows["entropy"], "seed": cfg.seed,
            "seconds_total": seconds_total, "seconds_stream": stream, "seconds_finalize": self.seconds.get("finalize"),
            "tokens_per_second": (t.n_rows - self.rows_at_start) / stream if stream > 0 else None,
            "world_size": self.world.size, "resumed_at_rows": self.rows_at_start,
        })
        spec.meta.update(t.meta())
        if self.route == "factor" and self.cache is None:
            spec.meta["model_energy"] = self.acc.model_energy()
        if self.snapshots_skipped:
            spec.meta["convergence_skipped"] = self.snapshots_skipped

    def compute(self) -> Optional[Spectrum]:
        """plan checked → route → accumulators → restore → stream → finalize → meta."""
        t0 = time.perf_counter()
        self.run.check_derived(self.target.derived())
        self.choose_route()
        self.build()
        self.stream(self.restore())
        spec = self.finalize()
        if spec is not None:
            self.describe(spec, seconds_total=time.perf_counter() - t0)
        return spec


def corpus_sweep(cfg: EstimateConfig, target: Target) -> dict:
    """The n-gram corpus-size sweep (``--corpus-fractions``): the same estimate, in memory, on
    prefixes of the corpus; {fraction: (Spectrum, facts)}, the full corpus included."""
    fractions = parse_fractions(cfg.corpus_fractions) if isinstance(target, NgramTarget) else None
    if not fractions:
        return {}
    sweep = {}
    for f, sub in target.prefixes(cfg, fractions):
        quiet = EstimateConfig(**{**vars(cfg), "convergence": False, "quiet": True, "out": None, "resume": False,
                                  "checkpoint_every": None})
        sweep[f] = (Estimate(quiet, sub, Run.in_memory("estimate")).compute(), sub.facts)
    return sweep


def run_estimate(*, return_summary: bool = False, **kwargs):
    """Estimate the spectrum of a target matrix (Python API of ``rankest estimate``).

    Keyword arguments are the fields of :class:`EstimateConfig`. Returns the
    :class:`~rankest.spectrum.Spectrum` (with ``meta`` holding teacher, corpus, route, NLL and
    provenance); writes a run folder when ``out`` is given. Under torchrun, rank 0 returns the
    spectrum and the other processes None.
    """
    cfg = EstimateConfig.from_kwargs(kwargs)
    # Under torchrun (WORLD_SIZE > 1) join the process group; one process: nothing happens.
    with distributed.joined(cfg.device) as (world, run_device):
        target = None
        try:
            run = Run.open("estimate", out=cfg.out, resume=cfg.resume, overwrite=cfg.overwrite,
                           results_file="results.h5", config=run_config(cfg, skip=EXECUTION_OPTIONS), world=world,
                           every=cfg.checkpoint_every)
            started, t0 = now_iso(), time.perf_counter()
            target = make_target(cfg, device=run_device)
            sweep = corpus_sweep(cfg, target)
            spec = Estimate(cfg, target, run).compute()
            if spec is None:
                return None
            spec.meta["seconds_total"] = time.perf_counter() - t0
            if sweep:
                sweep[1.0] = (spec, target.facts)
                spec.meta["corpus_fractions"] = fraction_summary(sweep)

            def write(out) -> dict:
                prov = {**provenance(target.device), "started": started, "finished": now_iso()}
                config = {**result_config(cfg), "teacher": target.name,
                          "corpus": corpus_name(cfg.corpus) if target.uses_corpus else None}
                if isinstance(target, NgramTarget):
                    config["tokenizer"] = target.tokenizer
                summary = write_run(out, spec, config=config, prov=prov)
                write_report(out, spec, config=config, prov=prov, sweep=sweep)
                target.write(out, config=config, prov=prov)
                return summary

            summary = run.finish(write)
            if run.out is not None:
                spec.meta["out"] = str(run.out)
            if return_summary:
                return spec, summary if summary is not None else spec.summary()
            return spec
        finally:
            if target is not None:
                target.close()
            if cfg.out:
                release_run_folder(Path(cfg.out))  # done or failed, the folder is free again


def fraction_summary(sweep: dict) -> dict[str, Any]:
    """results.json's ``corpus_fractions``: per fraction, sizes, rank_at and W-error at round d."""
    return {str(f): {"n_tokens": fa["n_tokens"], "contexts": fa["contexts"],
                     "singleton_context_share": fa["singleton_context_share"], "rank_at": s.metrics()["rank_at"],
                     "n_rows": s.n_rows,
                     "w_error_at": {str(d): float(s.w_error(d)) for d in (10, 100, 1000, 2000, 10000)
                                    if d <= s.sigma.size}}
            for f, (s, fa) in sorted(sweep.items())}


def ngram_spectrum(rows, *, route: str = "auto", budget: Optional[int] = None, rank_max: Optional[int] = None,
                   seed: int = 0, convergence: bool = True, progress: bool = False) -> tuple[Spectrum, str, dict]:
    """The estimate of prepared n-gram rows (:func:`rankest.targets.ngram.build_rows`) in memory,
    without a run folder: (Spectrum, route reason, {"seconds_stream", "seconds_finalize"})."""
    cfg = EstimateConfig(teacher=f"ngram:{rows.counts.order}", space=rows.space, route=route, rank_max=rank_max,
                         seed=seed, convergence=convergence, quiet=not progress,
                         max_memory=None if budget is None else str(int(budget)))
    est = Estimate(cfg, NgramTarget(rows), Run.in_memory("estimate"))
    spec = est.compute()
    return spec, est.reason, {"seconds_stream": est.seconds["stream"], "seconds_finalize": est.seconds["finalize"]}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
