"""Pure-PyTorch reference implementations of rankest's compiled ops.

Each function here is the *specification* of the op of the same name in ``csrc/``: same
signature, same outputs. It is used three ways:

* the oracle every compiled kernel is tested against (``tests/test_ops.py``);
* the fallback when the extension cannot be built (``rankest.ops`` warns once);
* the documentation of the contract (shapes, dtypes, accumulation).

All arithmetic here is fp64, whatever the input dtype, so that the reference is at least as
accurate as any kernel; outputs are then cast to the requested dtype.
"""

from __future__ import annotations

import numpy as np
import torch

SPACES = ("clr", "prob", "logprob")

#: Column order of the statistics returned by :func:`transform_rows`.
STAT_NAMES = ("logsumexp", "entropy", "nll", "sq_norm")


#: dtypes the ops accept for logits, rows (out_dtype) and chunks.
FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def stats_dtype(logits_dtype: torch.dtype) -> torch.dtype:
    """Row statistics are fp64 for fp64 logits, fp32 otherwise."""
    return torch.float64 if logits_dtype == torch.float64 else torch.float32


def transform_rows(
    logits: torch.Tensor,
    targets: torch.Tensor,
    n_cols: int,
    space: str,
    write_rows: bool,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits → target-space rows and per-row statistics, in one pass.

    Parameters
    ----------
    logits : (n, V) float64 / float32 / float16 / bfloat16
        Raw logits. Only the first ``n_cols`` columns (the real vocabulary, V' ≤ V) are read;
        the padded columns beyond are ignored, so every row is renormalised over V'.
    targets : (n,) int64 (any integer dtype), on the device of ``logits``
        Index of the true next token per row, or a negative value where there is none
        (its NLL is then NaN). A target ≥ n_cols is an error.
    n_cols : int
        V', the number of real vocabulary columns (1 ≤ n_cols ≤ V).
    space : {"clr", "prob", "logprob"}
        ``clr``: z − mean(z) (centred log-probabilities equal centred logits);
        ``prob``: softmax(z); ``logprob``: z − logsumexp(z). All over the first n_cols.
    write_rows : bool
        When False the rows are not written (an (n, 0) tensor is returned): the routes that
        only need the statistics (``factor``) skip the write.
    out_dtype : torch.float64 / float32 / bfloat16 / float16
        dtype of the rows.

    Returns
    -------
    rows : (n, n_cols) out_dtype, or (n, 0) when ``write_rows`` is False
    stats : (n, 4) float64 for float64 logits, else float32
        Columns ``STAT_NAMES``: logsumexp(z), entropy −Σ p log p (nats), NLL −log p[target]
        (NaN without target), and the squared Euclidean norm of the row in ``space``
        (computed before the cast to out_dtype).
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D (n, V), got shape {tuple(logits.shape)}")
    if logits.dtype not in FLOAT_DTYPES:
        raise ValueError(f"logits must be one of {FLOAT_DTYPES}, got {logits.dtype}")
    if out_dtype not in FLOAT_DTYPES:
        raise ValueError(f"out_dtype must be one of {FLOAT_DTYPES}, got {out_dtype}")
    n, v = logits.shape
    if not 1 <= n_cols <= v:
        raise ValueError(f"n_cols must be in [1, {v}], got {n_cols}")
    if space not in SPACES:
        raise ValueError(f"space must be one of {SPACES}, got {space!r}")
    if targets.shape != (n,):
        raise ValueError(f"targets must have shape ({n},), got {tuple(targets.shape)}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise ValueError(f"targets must be an integer tensor, got {targets.dtype}")
    if targets.device != logits.device:
        raise ValueError(f"logits and targets must be on the same device, got {logits.device} "
                         f"and {targets.device}")
    if bool((targets >= n_cols).any()):
        raise ValueError(f"a target is >= n_cols ({n_cols})")

    z = logits[:, :n_cols].to(torch.float64)
    lse = torch.logsumexp(z, dim=1)
    logp = z - lse[:, None]
    p = logp.exp()
    # −Σ p log p with 0·log 0 = 0: p underflows to 0 (log p finite) or a logit is −inf
    # (log p = −inf, and 0·(−inf) would be NaN).
    entropy = -torch.where(p == 0, torch.zeros_like(p), p * logp).sum(dim=1)
    has_t = targets >= 0
    safe_t = torch.where(has_t, targets, torch.zeros_like(targets))
    nll = torch.where(has_t, -logp.gather(1, safe_t[:, None])[:, 0], torch.full_like(lse, float("nan")))
    if space == "clr":
        t = z - z.mean(dim=1, keepdim=True)
    elif space == "prob":
        t = p
    else:
        t = logp
    sq_norm = (t * t).sum(dim=1)
    stats = torch.stack([lse, entropy, nll, sq_norm], dim=1).to(stats_dtype(logits.dtype))
    rows = t.to(out_dtype) if write_rows else logits.new_empty((n, 0), dtype=out_dtype)
    return rows, stats


GRAM_PRECISIONS = ("fp64", "fast")


def gram_update(gram: torch.Tensor, chunk: torch.Tensor, precision: str) -> None:
    """Accumulate the Gram of a chunk of rows in place: ``gram += chunkᵀ · chunk``.

    Parameters
    ----------
    gram : (V, V) float64, modified in place
        Only the **lower triangle** (including the diagonal) is defined after the update;
        the upper triangle is left untouched. The consumers read the lower triangle only
        (``UPLO="L"`` eigensolvers, :func:`rankest.linalg.eigh_lower`) or symmetrise once at the end, not per chunk.
    chunk : (n, V) float64 / float32 / bfloat16 / float16
        Rows of the target matrix; n may be 0.
    precision : {"fp64", "fast"}
        ``fp64``: products and sums in fp64 (exact to the fp64 round-off of the inputs).
        ``fast``: products of the input dtype with fp32 accumulation over the chunk, added to
        the fp64 carry once per chunk. Per-chunk relative error ≈ sqrt(n)·2⁻²⁴ (fp32 inputs);
        the carry keeps it from growing with the number of chunks.
    """
    if gram.dtype != torch.float64 or gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError("gram must be a square float64 matrix")
    if chunk.dim() != 2 or chunk.shape[1] != gram.shape[0]:
        raise ValueError(f"chunk must be (n, {gram.shape[0]}), got {tuple(chunk.shape)}")
    if chunk.dtype not in FLOAT_DTYPES:
        raise ValueError(f"chunk must be one of {FLOAT_DTYPES}, got {chunk.dtype}")
    if chunk.device != gram.device:
        raise ValueError(f"gram and chunk must be on the same device, got {gram.device} and "
                         f"{chunk.device}")
    if precision not in GRAM_PRECISIONS:
        raise ValueError(f"precision must be one of {GRAM_PRECISIONS}, got {precision!r}")
    if chunk.shape[0] == 0:
        return
    if precision == "fp64":
        c = chunk.to(torch.float64)
        upd = c.T @ c
    else:
        c = chunk.to(torch.float32)
        upd = (c.T @ c).to(torch.float64)
    lower = torch.tril(torch.ones_like(gram, dtype=torch.bool))
    gram[lower] += upd[lower]


def ngram_count(tokens: torch.Tensor, order: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct n-grams of a token stream and their counts (NumPy, vectorised).

    Parameters
    ----------
    tokens : (L,) int64 / int32, CPU
        The token stream; a negative value is a boundary (end of a document): no n-gram
        contains it, so n-grams never span two documents.
    order : int
        n ≥ 1.

    Returns
    -------
    grams : (M, n) int64
        The M distinct windows of n consecutive non-negative tokens, in lexicographic order
        (n-grams sharing a context are consecutive, their next tokens increasing: the CSR
        layout of the count matrix).
    counts : (M,) int64
        Occurrences of each n-gram.

    This reference builds the L×n window matrix (memory L·n·8 bytes) and sorts it; the compiled
    op hashes instead, in memory proportional to M.
    """
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 1 or tokens.dtype not in (torch.int64, torch.int32):
        raise ValueError("tokens must be a 1-D int64 or int32 tensor")
    if tokens.device.type != "cpu":
        raise ValueError(f"tokens must be on the CPU, got {tokens.device}")
    if int(order) < 1:
        raise ValueError(f"order must be >= 1, got {order}")
    n = int(order)
    t = tokens.numpy().astype(np.int64)
    if t.size < n:
        return torch.zeros(0, n, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
    win = np.lib.stride_tricks.sliding_window_view(t, n)
    win = win[(win >= 0).all(axis=1)]
    if win.shape[0] == 0:
        return torch.zeros(0, n, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
    grams, counts = np.unique(win, axis=0, return_counts=True)  # lexicographic rows
    return torch.from_numpy(np.ascontiguousarray(grams)), torch.from_numpy(counts.astype(np.int64))


def sparse_gram_update(gram: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, val: torch.Tensor) -> None:
    """``gram += TᵀT`` (lower triangle) for the rows T given in CSR form.

    Parameters
    ----------
    gram : (V, V) float64, contiguous, CPU, modified in place
        Only the lower triangle (diagonal included) is updated, as by :func:`gram_update`.
    crow : (n + 1,) int64
        Row pointers: row r holds entries crow[r] .. crow[r+1]-1; crow[0] = 0, crow[n] = nnz.
    col : (nnz,) int64
        Column of each entry, in [0, V), strictly increasing within each row.
    val : (nnz,) float64
        The entries.

    The reference densifies the rows (n × V, fp64) and reuses :func:`gram_update`; the
    compiled op never builds them.
    """
    if gram.dtype != torch.float64 or gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError("gram must be a square float64 matrix")
    for name, t, dt in (("crow", crow, torch.int64), ("col", col, torch.int64), ("val", val, torch.float64)):
        if t.dim() != 1 or t.dtype != dt:
            raise ValueError(f"{name} must be a 1-D {dt} tensor")
    if crow.numel() < 1 or int(crow[0]) != 0 or int(crow[-1]) != col.numel() or col.numel() != val.numel():
        raise ValueError("crow must start at 0 and end at nnz = len(col) = len(val)")
    v = gram.shape[0]
    n = crow.numel() - 1
    counts = crow.diff()
    if bool((counts < 0).any()):
        raise ValueError("crow must be non-decreasing")
    if col.numel() and (int(col.min()) < 0 or int(col.max()) >= v):
        raise ValueError(f"col must be in [0, {v})")
    row_of = torch.repeat_interleave(torch.arange(n), counts)
    if col.numel() > 1:
        same_row = row_of[1:] == row_of[:-1]
        if bool((same_row & (col[1:] <= col[:-1])).any()):
            raise ValueError("the columns of a row must be strictly increasing (canonical CSR)")
    dense = torch.zeros(n, v, dtype=torch.float64)
    dense[row_of, col] = val
    gram_update(gram, dense, "fp64")
