"""Which route an estimate takes, and with which passes and precision (the policy, in one place).

    factor   exact, one pass, O(N·d²): clr rows of a linear-head teacher (checked on a sample)
    gram     exact, one pass, O(V'²) memory: when the target's Gram fits the memory budget
    sketch   single-pass Nyström of TᵀT (k values, O(V'·k) memory), or q ≥ 2 passes of randomized
             subspace iteration over a row cache (``--passes``)

The reasons returned here are written into every result (``route_reason``).
"""

from __future__ import annotations

import warnings
from typing import Optional, Union

import torch

from rankest.accumulate.sketch import Sketch
from rankest.errors import UserError
from rankest.estimator.config import EstimateConfig
from rankest.linalg import DEFAULT_METHOD, DEFAULT_TOL, MAX_PASSES, default_oversample
from rankest.runtime.memory import _fmt_bytes
from rankest.targets.base import Target


def choose_route(cfg: EstimateConfig, target: Target, *, budget: int) -> tuple[str, str]:
    """Resolve ``--route auto`` (and check an explicit route) for ``target``; returns (route, reason).

    factor when exact (clr space and a linear head, checked on a sample); gram when the target's
    exact Gram and the eigensolver's workspace fit the budget; otherwise sketch.
    """
    n_cols = target.n_cols
    need = target.gram_nbytes(on_gpu=target.device.type == "cuda")
    fits = need <= budget
    gram_why = (f"{target.gram_what()} needs {_fmt_bytes(need)}, "
                f"{'within' if fits else 'over'} the memory budget of {_fmt_bytes(budget)}")
    if cfg.route == "factor":
        if target.linear is None:
            raise UserError(f"the factor route needs a neural teacher's linear head (logits = head(features)); "
                            f"{target.name} has none: use --route gram or --route sketch.")
        if target.linear is False:
            raise UserError("the factor route needs logits = head(features) exactly, but this teacher's logits "
                            "differ from its head applied to its features (soft-capping or logit scaling?); "
                            "use --route gram or --route sketch.")
        return "factor", "requested; exact for clr rows of a linear head"
    if cfg.route == "gram":
        if not fits:
            raise UserError(f"the gram route does not fit: {gram_why}. Raise --max-memory, or use --route sketch "
                            f"--rank-max K{' (or --route factor for --space clr)' if target.linear else ''}.")
        return "gram", f"requested; {gram_why}"
    if cfg.route == "sketch":
        k = sketch_rank(cfg, n_cols)
        if k >= n_cols:
            warnings.warn(f"--rank-max {k} >= V' = {n_cols}: a sketch cannot beat the exact Gram here; "
                          f"using the exact gram route instead", stacklevel=2)
            return "gram", f"sketch requested with k = {k} >= V' = {n_cols}: the exact gram route instead"
        return "sketch", f"requested, k = {k}; {sketch_memory_text(cfg, target, k, budget)}"
    # auto
    if cfg.space == "clr" and target.linear:
        return "factor", "auto: clr rows of a linear head (checked on the first batch) — exact, O(N·d²)"
    if fits:
        why = "auto: " + ("logits are not head(features); " if cfg.space == "clr" and target.linear is False
                          else "") + gram_why
        return "gram", why
    k = sketch_rank(cfg, n_cols)
    return "sketch", (f"auto: {gram_why}; a single-pass Nyström sketch of TᵀT with k = {k} instead; "
                      f"{sketch_memory_text(cfg, target, k, budget)}")


def sketch_memory_text(cfg: EstimateConfig, target: Target, k: int, budget: int) -> str:
    """The sketch's memory, component by component (:meth:`Sketch.memory`), against the budget;
    a warning when the peak is over it."""
    precision = sketch_precision(target.precision or cfg.gram_precision, target.row_dtype)
    rows = target.rows_before(1) - target.rows_before(0) if target.n_units else 0
    parts = Sketch.memory(target.n_cols, k, precision=precision, device=target.device, chunk_rows=rows)
    peak = Sketch.peak_bytes(parts)
    text = (f"sketch memory {_fmt_bytes(peak)} at peak ({precision} products): state {_fmt_bytes(parts['state'])}, "
            f"test block {_fmt_bytes(parts['test_block'])}, chunk {_fmt_bytes(parts['chunk'])}, finalize "
            f"{_fmt_bytes(parts['finalize'])}")
    if peak > budget:
        warnings.warn(f"the sketch needs {_fmt_bytes(peak)} at peak, over the memory budget of {_fmt_bytes(budget)}; "
                      f"lower --rank-max (memory grows with V'·k) or raise --max-memory", stacklevel=3)
    return text


def resolve_passes(cfg: EstimateConfig, route: str, *, rows_stored: bool = False) -> tuple[Union[int, str], Optional[str]]:
    """Passes of the sketch route over the rows (an int, or ``"auto"``), and a note for
    ``route_reason`` (None when there is nothing to say). ``auto`` is one pass for a neural
    teacher (each pass would cost a forward over the corpus) and, for rows that are stored (a
    logits file, rows in memory: ``rows_stored``), ``"auto"``: the rows cached on disk once and
    passes of :func:`rankest.linalg.randomized_svd` until its error estimate of σ_1…σ_k meets
    its tolerance (:func:`auto_passes_note`). q ≥ 2 caches the rows and runs q passes. Exact
    routes take one pass whatever is asked (an explicit exact route with q ≥ 2 is refused)."""
    if cfg.passes == "auto":
        if route == "sketch" and rows_stored:
            return "auto", auto_passes_note()
        return 1, None
    q = int(cfg.passes)
    if q == 1:
        return 1, None
    if route != "sketch":
        if cfg.route in ("factor", "gram"):
            raise UserError(f"--passes {q} applies to the sketch route only; the {cfg.route} route is exact in one "
                            f"pass. Drop --passes, or use --route sketch.")
        return 1, f"--passes {q} ignored: the {route} route is exact in one pass"
    return q, f"--passes {q}: rows cached on disk once, then re-read per pass"


def auto_passes_note() -> str:
    """``route_reason``'s note for accuracy-driven passes."""
    return (f"--passes auto: stored rows cached on disk once, then passes until the estimated error of "
            f"sigma_1..sigma_k is below {DEFAULT_TOL:g} (at most {MAX_PASSES})")


def multipass_method(n_cols: int, k: int, passes: Union[int, str], *, budget: int) -> str:
    """Block Krylov (fewer passes to a given accuracy: :data:`rankest.linalg.DEFAULT_METHOD`)
    when its basis of at least 3 blocks of a stream's default l = 2k columns
    (:func:`rankest.linalg.default_oversample`; blocks and images, fp64) fits the memory budget —
    ``passes="auto"`` stops adding blocks at the budget — else subspace iteration (two blocks
    whatever the passes)."""
    blocks = 3 if passes == "auto" else max(1, int(passes) - 1)
    need = 2 * 8 * n_cols * min(k + default_oversample(k, passes, DEFAULT_METHOD, streamed=True), n_cols) * blocks
    return DEFAULT_METHOD if need <= budget else "subspace"


def sketch_rank(cfg: EstimateConfig, n_cols: int) -> int:
    """k of the sketch route: --rank-max, else 1024 (capped below V')."""
    return int(cfg.rank_max) if cfg.rank_max else min(1024, n_cols - 1)


def sketch_precision(gram_precision: str, row_dtype: torch.dtype) -> str:
    """fp64 products for --gram-precision fp64; otherwise fp32 products, or bf16 products when
    the rows already are bf16 (fast on a GPU). bf16 moves the W-error by up to ~3e-3 on steep
    spectra (benchmarks/reports/svd_cpu.md), fp32 by nothing measurable."""
    if gram_precision == "fp64":
        return "fp64"
    return "fast" if row_dtype == torch.bfloat16 else "fp32"
