"""rankest's compiled ops, with the pure-PyTorch reference as the fallback.

    import rankest.ops as ops
    rows, stats = ops.transform_rows(logits, targets, n_cols, "clr", True, torch.float32)
    ops.gram_update(gram, rows, "fp64")
    ops.extension_backend()      # "installed" | "jit" | None

Each op has the signature and contract of its reference in :mod:`rankest.ops.reference`
(the specification, and the oracle of ``tests/test_ops.py``). When the extension loaded
(:func:`rankest._build.load_extension`) the call goes to ``torch.ops.rankest.<op>`` — for a
device the extension has kernels for — otherwise to the reference, with one warning saying why.
Fake (meta) kernels are registered so ``torch.compile`` and ``torch.library.opcheck`` see the ops.
"""

from __future__ import annotations

import warnings

import torch

from .._build import load_extension
from . import reference
from .reference import GRAM_PRECISIONS, SPACES, STAT_NAMES, stats_dtype

__all__ = [
    "GRAM_PRECISIONS",
    "SPACES",
    "STAT_NAMES",
    "extension_backend",
    "extension_detail",
    "gram_update",
    "ngram_count",
    "reference",
    "row_stride",
    "sparse_gram_update",
    "stats_dtype",
    "transform_rows",
    "using_reference",
]

_BACKEND, _DETAIL = load_extension()
_warned: set[str] = set()


def extension_backend() -> str | None:
    """``"installed"``, ``"jit"``, or None when the ops run on the reference."""
    return _BACKEND


def extension_detail() -> str:
    """Where the library was loaded from, or why it could not be."""
    return _DETAIL


def using_reference() -> bool:
    """True when the compiled ops are unavailable and every call runs the reference."""
    return _BACKEND is None


def _kernel_devices(op: str) -> frozenset[str]:
    """Device types the loaded library has a kernel of ``op`` for (fixed at import, so that
    torch.compile traces the dispatch decision as a constant)."""
    if _BACKEND is None:
        return frozenset()
    keys = {"cpu": "CPU", "cuda": "CUDA", "meta": "Meta"}
    try:
        return frozenset(dev for dev, key in keys.items()
                         if torch._C._dispatch_has_kernel_for_dispatch_key(f"rankest::{op}", key))
    except RuntimeError:  # a library built from older sources, without this op: the reference runs
        return frozenset()


def _has_kernel(op: str, device: torch.device) -> bool:
    return device.type in _KERNEL_DEVICES.get(op, ())


def _fallback(op: str, device: torch.device) -> None:
    if op in _warned:
        return
    _warned.add(op)
    if _BACKEND is None and _DETAIL.startswith("RANKEST_NO_EXT"):
        why = "RANKEST_NO_EXT is set; unset it to use the compiled ops"
    elif _BACKEND is None:
        why = (f"the compiled extension is unavailable ({_DETAIL}); install a C++ compiler and "
               "ninja (pip install ninja), then re-import, or build it with "
               "`pip install -e . --no-build-isolation`")
    elif not _KERNEL_DEVICES.get(op):
        why = (f"the extension ({_BACKEND}: {_DETAIL}) was built from older sources without this op; "
               "rebuild it with `pip install -e . --no-build-isolation`")
    else:
        why = (f"the extension ({_BACKEND}) has no {device.type} kernel; rebuild it where "
               f"{device.type} is available (RANKEST_FORCE_CUDA=1 for CUDA)")
    warnings.warn(f"rankest.ops.{op} runs the slower pure-PyTorch reference: {why}.",
                  RuntimeWarning, stacklevel=3)


#: Row alignment of transform_rows's CUDA rows, in elements (kRowAlign in csrc/ops/transform_rows.h).
ROW_ALIGN = 16


def row_stride(n_cols: int, device: torch.device) -> int:
    """Row stride of the rows transform_rows returns on ``device``: n_cols on the CPU; on CUDA
    n_cols rounded up to ROW_ALIGN elements, so every row starts 16-byte aligned."""
    return -(-n_cols // ROW_ALIGN) * ROW_ALIGN if torch.device(device).type == "cuda" else n_cols


def transform_rows(
    logits: torch.Tensor,
    targets: torch.Tensor,
    n_cols: int,
    space: str,
    write_rows: bool,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits → target-space rows + row statistics; see :func:`reference.transform_rows`."""
    if isinstance(logits, torch.Tensor) and _has_kernel("transform_rows", logits.device):
        return torch.ops.rankest.transform_rows.default(
            logits, targets, n_cols, space, write_rows, out_dtype)
    _fallback("transform_rows", getattr(logits, "device", torch.device("cpu")))
    return reference.transform_rows(logits, targets, n_cols, space, write_rows, out_dtype)


def gram_update(gram: torch.Tensor, chunk: torch.Tensor, precision: str) -> None:
    """``gram += chunkᵀ·chunk`` on the lower triangle; see :func:`reference.gram_update`."""
    if isinstance(gram, torch.Tensor) and _has_kernel("gram_update", gram.device):
        torch.ops.rankest.gram_update.default(gram, chunk, precision)
        return
    _fallback("gram_update", getattr(gram, "device", torch.device("cpu")))
    reference.gram_update(gram, chunk, precision)


def ngram_count(tokens: torch.Tensor, order: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct n-grams (lexicographic) and their counts; see :func:`reference.ngram_count`."""
    if isinstance(tokens, torch.Tensor) and _has_kernel("ngram_count", tokens.device):
        return torch.ops.rankest.ngram_count.default(tokens, int(order))
    _fallback("ngram_count", getattr(tokens, "device", torch.device("cpu")))
    return reference.ngram_count(tokens, order)


def sparse_gram_update(gram: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, val: torch.Tensor) -> None:
    """``gram += TᵀT`` (lower triangle) from CSR rows; see :func:`reference.sparse_gram_update`."""
    if isinstance(gram, torch.Tensor) and _has_kernel("sparse_gram_update", gram.device):
        torch.ops.rankest.sparse_gram_update.default(gram, crow, col, val)
        return
    _fallback("sparse_gram_update", getattr(gram, "device", torch.device("cpu")))
    reference.sparse_gram_update(gram, crow, col, val)


if _BACKEND is not None:
    _register_fake = getattr(torch.library, "register_fake", None) or torch.library.impl_abstract

    @_register_fake("rankest::transform_rows")
    def _transform_rows_fake(logits, targets, n_cols, space, write_rows, out_dtype):
        n = logits.shape[0]
        if write_rows:
            # The row stride of the kernels (csrc/ops/transform_rows.h): padded on CUDA.
            ld = row_stride(n_cols, logits.device)
            rows = logits.new_empty((n, ld), dtype=out_dtype)[:, :n_cols]
        else:
            rows = logits.new_empty((n, 0), dtype=out_dtype)
        return rows, logits.new_empty((n, 4), dtype=stats_dtype(logits.dtype))

    @_register_fake("rankest::gram_update")
    def _gram_update_fake(gram, chunk, precision):
        return None

    # ngram_count has no fake kernel: its output size (the number of distinct n-grams) is
    # data-dependent and it runs on concrete CPU token streams only.
    if "cpu" in _kernel_devices("sparse_gram_update"):  # absent from a library built from older sources
        @_register_fake("rankest::sparse_gram_update")
        def _sparse_gram_update_fake(gram, crow, col, val):
            return None


_KERNEL_DEVICES = {op: _kernel_devices(op) for op in ("transform_rows", "gram_update", "ngram_count", "sparse_gram_update")}
