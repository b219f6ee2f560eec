"""``--passes q ≥ 2`` (or ``auto`` for stored rows): the rows cached on disk once, then the passes
of :func:`rankest.linalg.randomized_svd` over them — q, or as many as its error estimate needs.

The first pass over the rows is the target's (a teacher's forward over the corpus); every
later pass re-reads this process's row cache (``DIR/rows.h5``, ``rows.rank{r}.h5`` under
torchrun), and :func:`rankest.linalg.randomized_svd` all-reduces each pass's products. The cache
is part of a checkpointed run's state: it is fsynced before each checkpoint and reopened on
``--resume`` after the rows the checkpoint counts.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional, Union

import torch

from rankest.accumulate.base import INPUT_PRECISIONS, InputPrecision
from rankest.accumulate.sketch import spectrum_from_svd
from rankest.errors import UserError
from rankest.estimator.config import EstimateConfig
from rankest.estimator.routes import multipass_method, sketch_precision, sketch_rank
from rankest.io.rowcache import RowCache, resolve_cache_dtype
from rankest.linalg import product_dtype, randomized_svd


def open_row_cache(cfg: EstimateConfig, world, position: Optional[dict], *, n_cols: int, shard_rows: int,
                    row_dtype: torch.dtype, rows_of_rank):
    """This process's row cache for --passes ≥ 2, sized for its ``shard_rows``: ``DIR/rows.h5``
    (``rows.rank{r}.h5`` under torchrun; a temporary folder without --out), created, or reopened
    after the rows of the batches the checkpoint counts (``rows_of_rank(rank, next_batch)``)."""
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


def multipass_spectrum(cache, cfg: EstimateConfig, *, passes: Union[int, str], n_cols: int, row_dtype: torch.dtype,
                        device: torch.device, energy: float, budget: int, reduce=None):
    """``passes`` (q, or "auto": until the estimate of σ_1…σ_k meets the default tolerance) of
    randomized_svd over the cached rows → a sketch-route Spectrum (σ̂ ≤ σ, with its error
    estimates; ``meta["passes"]`` the passes run). Block Krylov when its basis fits ``budget``
    bytes (:func:`rankest.estimator.routes.multipass_method`), else subspace iteration."""
    precision = sketch_precision(cfg.gram_precision, row_dtype)
    k = sketch_rank(cfg, n_cols)
    method = multipass_method(n_cols, k, passes, budget=budget)
    try:
        result = randomized_svd(cache.stream(device=device, out_dtype=product_dtype(precision, device)), k,
                                passes=passes, method=method, precision=precision, seed=cfg.seed, device=device,
                                return_vectors=False, reduce=reduce, max_memory=max(int(budget), 1))
    finally:
        if not cfg.keep_row_cache:
            cache.remove()
    spec = spectrum_from_svd(result, space=cfg.space, energy=energy)
    rows = InputPrecision()  # the rows as the passes read them: the teacher's dtype, then the cache's
    rows.saw(torch.empty(0, dtype=row_dtype))
    rows.join(cache.dtype if cache.dtype in INPUT_PRECISIONS else None)
    spec.row_precision = rows.name
    spec.meta["row_cache"] = {"dtype": cache.dtype, "rows": result.info["n_rows"],
                              "path": str(cache.path) if cfg.keep_row_cache else None}
    return spec
