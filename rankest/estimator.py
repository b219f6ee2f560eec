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

import math
import os
import time
from dataclasses import dataclass, fields
from typing import Any, Optional, Union

import torch

from . import ops
from .accumulators import Chunk, Factor, Gram, RowStats, gram_nbytes
from .errors import UserError
from .ops.reference import GRAM_PRECISIONS, SPACES  # one definition: the ops' contract

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
    batch_size: int = 8
    device: str = "auto"
    dtype: str = "auto"
    max_memory: Optional[str] = None
    seed: int = 0
    positions: str = "all"
    sample: str = "windows"
    gram_precision: str = "fp64"
    out: Optional[str] = None
    overwrite: bool = False
    quiet: bool = False
    convergence: bool = True
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
        from . import sketch  # noqa: F401
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
    from .corpus import DEFAULT_CORPUS, check_seq_len, iter_batches, load_documents, pack_windows, plan_rows
    from .results import now_iso, prepare_run_folder, provenance, write_run
    from .teachers import DEFAULT_TEACHER, load_teacher

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
        from .ngram import run_ngram_estimate

        return run_ngram_estimate(cfg, return_summary=return_summary)
    out = prepare_run_folder(cfg.out, overwrite=cfg.overwrite) if cfg.out else None
    started = now_iso()
    t0 = time.perf_counter()

    if cfg.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    # Pre-tokenised windows (W, seq_len + 1) may be passed as the corpus (benchmarks, synthetic tokens).
    pretokenised = isinstance(cfg.corpus, torch.Tensor)
    # The corpus first: a typo in --corpus should fail in a second, not after loading a 7B model.
    docs = None if pretokenised else load_documents(cfg.corpus)
    # A loaded Teacher may be passed directly (tests and notebooks reuse one model across runs).
    teacher = cfg.teacher if not isinstance(cfg.teacher, str) else load_teacher(
        cfg.teacher, revision=cfg.revision, device=cfg.device, dtype=cfg.dtype)
    check_seq_len(cfg.seq_len, teacher.context_length)
    # Tokenise enough of the corpus that the sample is drawn from a pool ≥ 8× its size.
    per_window = cfg.seq_len if cfg.positions == "all" else 1
    max_windows = None if cfg.tokens is None else math.ceil(max(8 * int(cfg.tokens), 2**20) / per_window)
    if pretokenised:
        windows = cfg.corpus
        if windows.dim() != 2 or windows.shape[1] != cfg.seq_len + 1:
            raise UserError(f"pre-tokenised windows must have shape (W, seq_len + 1 = {cfg.seq_len + 1}), "
                            f"got {tuple(windows.shape)}.")
    else:
        windows = pack_windows(docs, teacher.tokenizer, cfg.seq_len, max_windows=max_windows, progress=not cfg.quiet)
    plan = plan_rows(len(windows), cfg.seq_len, positions=cfg.positions, tokens=cfg.tokens, seed=cfg.seed,
                     sample=cfg.sample)
    n_total = plan.n_rows

    # A sample of the first batch decides whether the head is linear (factor route) before anything
    # is accumulated.
    batches = iter_batches(windows, plan, cfg.batch_size)
    first = next(batches)
    linear, lin_err = None, None  # only the clr space can use the factor route
    if cfg.space == "clr":
        with torch.inference_mode():
            linear, lin_err = check_linear_head(teacher, first.input_ids.to(teacher.device))
    budget = parse_size(cfg.max_memory) if cfg.max_memory else available_memory(teacher.device) // 2
    route, reason = choose_route(cfg, n_cols=teacher.n_cols, linear=linear,
                                 budget=budget, device_type=teacher.device.type)

    row_dtype = _row_dtype(teacher, cfg.gram_precision)
    stats_acc = RowStats(device=teacher.device)
    if route == "factor":
        weight, bias = teacher.head()
        acc = Factor(weight, bias, teacher.n_cols, precision=cfg.gram_precision, device=teacher.device)
    elif route == "gram":
        acc = Gram(teacher.n_cols, space=cfg.space, precision=cfg.gram_precision, device=teacher.device)
    else:
        from .sketch import Sketch

        acc = Sketch(teacher.n_cols, sketch_rank(cfg, teacher.n_cols), space=cfg.space, seed=cfg.seed,
                     precision=_sketch_precision(cfg.gram_precision, row_dtype), device=teacher.device)

    milestones = _milestones(n_total) if cfg.convergence and acc.cheap_finalize else []
    convergence: dict[int, dict] = {}

    def feed(chunk: Chunk) -> None:
        # Split the chunk at convergence milestones so each snapshot covers exactly its prefix.
        start = 0
        while start < chunk.n:
            nxt = next((m for m in milestones if m > acc.n_rows), None)
            stop = chunk.n if nxt is None else min(chunk.n, start + nxt - acc.n_rows)
            part = chunk.slice(start, stop)
            acc.update(part)
            stats_acc.update(part)
            if nxt is not None and acc.n_rows == nxt:
                convergence[nxt] = acc.finalize(energy=stats_acc.energy).metrics()
            start = stop

    from tqdm.auto import tqdm

    bar = tqdm(total=n_total, unit="tok", unit_scale=True, desc=f"estimate {route}", disable=cfg.quiet,
               dynamic_ncols=True)
    t_loop = time.perf_counter()
    with torch.inference_mode():
        for i, batch in enumerate(_chain(first, batches)):
            ids = batch.input_ids.to(teacher.device, non_blocking=True)
            h_all = teacher.features(ids)
            mask = batch.mask.to(teacher.device)
            h = h_all[mask]
            targets = batch.targets.to(teacher.device)[mask]
            logits = teacher.logits(h)
            rows, stats = ops.transform_rows(logits, targets, teacher.n_cols, cfg.space, route != "factor", row_dtype)
            if not bool(torch.isfinite(stats[:, 0]).all()):
                raise UserError(f"the teacher produced NaN/Inf logits in batch {i} (windows "
                                f"{batch.windows[:4].tolist()}…); "
                                f"try --dtype fp32 or check the model weights.")
            feed(Chunk(stats=stats, rows=rows if route != "factor" else None, features=h))
            bar.update(int(h.shape[0]))
    bar.close()
    _sync(teacher.device)  # GPU work is asynchronous: the stream time must include the last batch
    t_acc = time.perf_counter() - t_loop

    t_fin = time.perf_counter()
    spec = acc.finalize(energy=stats_acc.energy)
    _sync(teacher.device)
    t_fin = time.perf_counter() - t_fin
    if cfg.convergence:
        convergence[acc.n_rows] = spec.metrics()
    spec.convergence = convergence
    row_summary = stats_acc.summary()
    spec.meta.update({
        "teacher": teacher.name, "teacher_source": teacher.source, "revision": cfg.revision,
        "corpus": _corpus_name(cfg.corpus),
        "route_reason": reason, "linear_head_check_rel_err": lin_err,
        "nll": row_summary["nll"], "perplexity": row_summary["perplexity"], "entropy": row_summary["entropy"],
        "hidden_size": teacher.hidden_size, "logit_width": teacher.logit_width, "seed": cfg.seed,
        "dtype": str(teacher.dtype).replace("torch.", ""), "device": str(teacher.device),
        "seconds_total": time.perf_counter() - t0, "seconds_stream": t_acc, "seconds_finalize": t_fin,
        "tokens_per_second": n_total / t_acc if t_acc > 0 else None,
    })
    if route == "factor":
        spec.meta["model_energy"] = acc.model_energy()
    if out is not None:
        prov = provenance(teacher.device)
        prov.update({"started": started, "finished": now_iso()})
        # fields(), not asdict(): asdict deep-copies, and `teacher` may be a loaded model.
        config = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name not in ("out", "overwrite", "quiet")}
        config["teacher"] = teacher.name
        config["corpus"] = _corpus_name(cfg.corpus)
        summary = write_run(out, spec, config=config, prov=prov)
        spec.meta["out"] = str(out)
        if return_summary:
            return spec, summary
    return spec


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _corpus_name(corpus) -> str:
    if isinstance(corpus, torch.Tensor):
        return f"pre-tokenised windows {tuple(corpus.shape)}"
    return corpus if isinstance(corpus, str) else ",".join(map(str, corpus))


def _chain(first, rest):
    yield first
    yield from rest
