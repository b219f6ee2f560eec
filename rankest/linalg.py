"""Randomized SVD of a target matrix seen row chunk by row chunk, with a-posteriori error bars.

T is an N×V' matrix (rows = contexts, columns = vocabulary) that may be far too large to hold:
every algorithm here works on the V'-side, accumulating products Tᵀ(T·X) over row chunks, so
its memory is O(V'·l) whatever N, and a *stream* (a callable that yields the row chunks again
on every pass) is as good as an in-memory matrix.

* one pass — the shifted streaming Nyström approximation of the PSD matrix A = TᵀT
  (Tropp, Yurtsever, Udell & Cevher 2017, Alg. 3): Y = AΩ, Â = Y(ΩᵀY)⁺Yᵀ ≼ A. Its
  eigenvalues are the squared singular values of P_{TΩ}·T (Halko, Martinsson & Tropp 2011,
  §5.5, with no power step), each *below* the truth (λ̂_i ≤ λ_i: Weyl, since A − Â ≽ 0).
* q passes, ``method="subspace"`` — randomized subspace iteration re-orthonormalised by QR
  every pass (Halko, Martinsson & Tropp 2011, Alg. 4.4); q passes over T give the subspace of
  Alg. 4.4 with q − 1 power steps, and the Nyström of the last pass stands for its final
  B = QᵀA, so no extra pass is spent on the projection.
* q passes, ``method="krylov"`` — block Krylov iteration (Musco & Musco 2015, Alg. 2):
  Nyström on span{AΩ, A²Ω, …, A^{q−1}Ω}, each block orthogonalised against the previous
  ones (block Gram–Schmidt twice, then QR). More accurate than subspace iteration at the
  same number of passes on slowly decaying spectra; memory O(V'·(q−1)·l).
* q passes, ``method="krylov-rr"`` — the same Krylov blocks with Musco & Musco's own
  Rayleigh–Ritz extraction: the last pass computes only T·Q_{q−1} (and its l×l Gram), not
  Tᵀ(T·Q_{q−1}): 2q − 1 products of T instead of 2q. Its values are Ritz values, below the
  truth by Cauchy interlacing (λ̂_i ≤ λ_i), so every bound below still holds.
* ``passes="auto"`` (the default) — accuracy-driven: passes of ``method`` (block Krylov by
  default, the fewest passes to a given accuracy, benchmarks/reports/svd_cpu.md) until the
  estimated relative error of σ_1…σ_k (:func:`sigma_error`) is below ``tol`` (1e-3).

Every result carries the unexplained energy E − Σσ̂² (E = ‖T‖_F² streamed in fp64) and a
probe estimate of ‖A − Â‖_F (Tropp, Yurtsever, Udell & Cevher 2019, "Streaming low-rank
matrix approximation with an application to scientific simulation", SISC 41(4), §6), from
which follow bounds on every σ_i and on the W-error curve (see :func:`nystrom_error`).

Precision: products run in fp64, fp32 or bf16 (``"fast"``) per chunk and are carried in fp64;
QR, the Nyström core and the eigensolve are fp64. Working on A = TᵀT squares the condition
number, so the worst case resolves σ_i ≳ √u·σ_1 (u the products' unit round-off: 3e-4·σ_1 for
fp32, 1e-8·σ_1 for fp64); rounding errors are random, not aligned with the small directions, and
in practice fp32 products resolved σ_k = 1e-3·σ_1 to 1e-7 relative (benchmarks/reports/svd_cpu.md).
``fast`` sketches the bf16-rounded T: its floor is that rounding (~5e-5 relative on σ, measured).

Example::

    >>> import torch
    >>> from rankest.linalg import randomized_svd
    >>> T = torch.randn(2000, 300, dtype=torch.float64)
    >>> U, S, Vt, info = randomized_svd(T, 20, passes=3)
    >>> S.shape, Vt.shape, U.shape
    (torch.Size([20]), torch.Size([20, 300]), torch.Size([2000, 20]))
    >>> info = randomized_svd(T, 20).info  # passes="auto": as many as tol = 1e-3 needs
    >>> info["passes"] >= 2 and info["sigma_rel_error"] <= info["tol"]
    True
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Optional, Union

import numpy as np
import torch

from rankest.errors import UserError

PRECISIONS = ("fp64", "fp32", "fast")
METHODS = ("subspace", "krylov", "krylov-rr")

#: Unit round-off of the products, as far as Y = Tᵀ(T·X) is concerned (sets the Nyström shift
#: and the round-off part of the error). ``fast``: T and X are rounded to bf16 consistently (a
#: sketch of T̃ᵀT̃, not an error), only the split Z_lo's rounding (2⁻⁸·2⁻⁹ of |Z|, averaged over
#: the rows) is inconsistent; 2⁻²¹ was the smallest value free of noise amplification on the
#: test spectra (tests/test_linalg.py), 2⁻¹⁷ cost 3× more W-error in one pass.
UNIT_ROUNDOFF = {"fp64": 2.0 ** -53, "fp32": 2.0 ** -24, "fast": 2.0 ** -21}

#: Spectrum.precision (unit round-off of the products) for each product precision.
SPECTRUM_PRECISION = {"fp64": "fp64", "fp32": "fp32", "fast": "bf16"}

#: Counter streams: the test matrix Ω and the error probes Θ are independent.
STREAM_OMEGA, STREAM_PROBES = 0, 1

#: Probe columns for the a-posteriori error estimate (≈ Tropp et al. 2019, §6: "q ≈ 10").
DEFAULT_PROBES = 16

#: Confidence of the error bounds derived from the probes (see :func:`probe_inflation`).
DEFAULT_CONFIDENCE = 0.99

#: The W-error tolerance that defines ``trusted_d``.
TRUST_TOL = 1e-2

#: ``passes="auto"``: the target of the error estimate of σ_1…σ_k (relative), the most passes,
#: and the memory a Krylov basis may take (its blocks and their images, fp64). See randomized_svd.
DEFAULT_TOL = 1e-3
MAX_PASSES = 12
DEFAULT_MAX_MEMORY = 4 << 30

#: The default method: block Krylov needs fewer passes than subspace iteration for the same
#: accuracy on every spectrum measured (benchmarks/reports/svd_cpu.md, "Passes to the tolerance").
DEFAULT_METHOD = "krylov"

#: Rows per product of an in-memory matrix: at most _CHUNK_BYTES of (converted) rows and at most
#: _CHUNK_ROWS rows, so that a product sums at most 16k terms in its own precision before the
#: fp64 carry. Big GEMMs matter on the CPU: 64 MB chunks (1048 rows at V' = 8000) ran 10–25%
#: slower than 16k-row chunks at l = 400 here (min of 3, 2 cores).
_CHUNK_BYTES = 512 << 20
_CHUNK_ROWS = 16384


class InputError(UserError, ValueError):
    """Bad argument or bad rows: a `UserError` (CLI exit 2) that is also a ValueError."""


class SVDResult(NamedTuple):
    """What :func:`randomized_svd` returns.

    U : (N, k) or None — left singular vectors (in-memory input and ``return_vectors`` only).
    S : (k,) float64 — singular values, descending.
    Vt : (k, V') or None — right singular vectors as rows (``return_vectors`` only).
    info : dict — passes, l, precision, energy, the error estimates of :func:`nystrom_error`.
    """

    U: Any
    S: Any
    Vt: Any
    info: dict


# ---------------------------------------------------------------------------------------------
# counter-based test matrices
# ---------------------------------------------------------------------------------------------
def _splitmix64(x: int) -> int:
    """One SplitMix64 step (Steele, Lea & Flood 2014): a bijective 64-bit mixer."""
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def counter_seed(seed: int, stream: int, block: int) -> int:
    """63-bit seed of block ``block`` of counter stream ``stream`` under the user's ``seed``."""
    h = _splitmix64(int(seed) & 0xFFFFFFFFFFFFFFFF)
    h = _splitmix64(h ^ (int(stream) & 0xFFFFFFFF))
    h = _splitmix64(h ^ (int(block) & 0xFFFFFFFFFFFFFFFF))
    return h >> 1


def _lsr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's >> is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _as_int64(v: int) -> int:
    """A 64-bit pattern as the signed int64 torch holds."""
    v &= 0xFFFFFFFFFFFFFFFF
    return v - (1 << 64) if v >= 1 << 63 else v


_GAMMA, _MIX1, _MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _normal_pairs_torch(i: torch.Tensor, pairs: torch.Tensor, base: int):
    """(radius, angle) of the Box–Muller pairs (i, p): torch int64 arithmetic (wraps mod 2⁶⁴)."""
    x = ((i[:, None] << 32) + pairs) * _as_int64(_GAMMA) + _as_int64(base)
    x = (x ^ _lsr(x, 30)) * _as_int64(_MIX1)
    x = (x ^ _lsr(x, 27)) * _as_int64(_MIX2)
    x = _lsr(x ^ _lsr(x, 31), 11)  # the top 53 bits
    u1 = (_lsr(x, 27).to(torch.float64) + 0.5) * 2.0 ** -26  # (0, 1): log never sees 0
    u2 = (x & ((1 << 27) - 1)).to(torch.float64) * 2.0 ** -27
    return torch.sqrt(-2.0 * torch.log(u1)), (2.0 * math.pi) * u2


def _normal_pairs_numpy(i: np.ndarray, pairs: np.ndarray, base: int):
    """The same (radius, angle) as :func:`_normal_pairs_torch` with numpy's native uint64 (the CPU
    path: several times faster than torch's int64 emulation of logical shifts)."""
    u64 = np.uint64
    with np.errstate(over="ignore"):
        x = ((i[:, None] << u64(32)) + pairs) * u64(_GAMMA) + u64(base)
        x ^= x >> u64(30)
        x *= u64(_MIX1)
        x ^= x >> u64(27)
        x *= u64(_MIX2)
        x ^= x >> u64(31)
    x >>= u64(11)
    u1 = ((x >> u64(27)).astype(np.float64) + 0.5) * 2.0 ** -26
    u2 = (x & u64((1 << 27) - 1)).astype(np.float64) * 2.0 ** -27
    return np.sqrt(-2.0 * np.log(u1)), (2.0 * np.pi) * u2


def gaussian_test_matrix(n_cols: int, n_vecs: int, *, seed: int, stream: int = STREAM_OMEGA, start: int = 0,
                stop: Optional[int] = None, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """Rows ``start:stop`` of the Gaussian test matrix Ω (n_cols × n_vecs), regenerated from counters.

    Entries (i, 2p) and (i, 2p+1) are the Box–Muller pair (r·cos θ, r·sin θ) of SplitMix64
    output number i·2³² + p of the sequence started at :func:`counter_seed` (seed, stream, 0)
    (Steele, Lea & Flood 2014: a counter times the golden gamma, then the 64-bit mixer), whose
    top 53 bits give the two uniforms (26 and 27 bits; tails cut at ≈ 5.9σ); fp64, then fp32.
    So an entry depends on (seed, stream, i, j) alone: any row range is rebuilt anywhere without
    storing Ω, Ω for V' rows is a prefix of Ω for more, and its first l columns are those of Ω
    with more columns. The integer hash is computed where the matrix is needed — on the GPU for
    a GPU sketch (milliseconds, where a CPU generator took 6 s at V' = 50k, l = 8k) — with the
    same bits on every device; the fp64 log/sqrt/cos/sin of different libraries may differ in
    their last ulp, which the fp32 rounding hides but for about one entry in 10⁸.

    Returns
    -------
    (stop − start, n_vecs) tensor of ``dtype`` on ``device``.
    """
    stop = n_cols if stop is None else stop
    if not 0 <= start <= stop <= n_cols:
        raise ValueError(f"row range [{start}, {stop}) is outside [0, {n_cols})")
    if n_vecs >= 1 << 32:
        raise ValueError(f"at most 2^32 - 1 test columns, got {n_vecs}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    out = torch.empty(stop - start, n_vecs, dtype=dtype, device=device)
    base = counter_seed(seed, stream, 0)
    n_pairs = (n_vecs + 1) // 2
    rows_per = max(1, (1 << 21) // max(1, n_pairs))  # ~16 MB of 64-bit temporaries at a time
    for lo in range(start, stop, rows_per):
        hi = min(stop, lo + rows_per)
        if device.type == "cpu":
            r, t = _normal_pairs_numpy(np.arange(lo, hi, dtype=np.uint64), np.arange(n_pairs, dtype=np.uint64), base)
            z = np.empty((hi - lo, 2 * n_pairs), dtype=np.float32)
            z[:, 0::2], z[:, 1::2] = r * np.cos(t), r * np.sin(t)
            z = torch.from_numpy(z)
        else:
            r, t = _normal_pairs_torch(torch.arange(lo, hi, dtype=torch.int64, device=device),
                                       torch.arange(n_pairs, dtype=torch.int64, device=device), base)
            z = torch.stack([r * torch.cos(t), r * torch.sin(t)], dim=2).reshape(hi - lo, 2 * n_pairs).float()
        out[lo - start:hi - start] = z[:, :n_vecs]
    return out


# ---------------------------------------------------------------------------------------------
# the product every route shares: Tᵀ(T·X) for one chunk, carried in fp64
# ---------------------------------------------------------------------------------------------
def product_dtype(precision: str, device=None) -> torch.dtype:
    """dtype the test blocks (and streamed rows) are cast to for the products on ``device``:
    fp64 for ``fp64``; fp32 for ``fp32``, and for ``fast`` on the CPU (its GEMMs round fp32
    tensors to bf16 inside); bf16 for ``fast`` on CUDA, whose bf16 tensor-core GEMMs
    (:func:`_gram_apply_bf16`) take bf16 operands — the blocks were rounded to bf16 by
    :func:`round_test`, so this cast is exact and happens once per block, not once per chunk."""
    if precision == "fp64":
        return torch.float64
    if precision == "fast" and device is not None and torch.device(device).type == "cuda" and _HAS_MM_DTYPE:
        return torch.bfloat16
    return torch.float32


def round_test(x: torch.Tensor, precision: str) -> torch.Tensor:
    """The test block the products will actually see: ``fast`` rounds it to bf16 here, so the
    Nyström core can use the very same block (exact in fp32/fp64 afterwards)."""
    return x.to(torch.bfloat16).to(x.dtype) if precision == "fast" else x


@contextlib.contextmanager
def _fast_matmul(device: torch.device):
    """fp32 GEMMs computed with bf16 inputs (CPU, oneDNN: AMX / AVX512-BF16) or TF32 (CUDA),
    fp32 accumulation and fp32 *output* — unlike a bf16 GEMM, whose output is rounded to bf16."""
    if device.type == "cuda":
        knob, value = torch.backends.cuda.matmul, "tf32"
    elif device.type == "cpu" and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        knob, value = torch.backends.mkldnn.matmul, "bf16"
    else:  # no faster arithmetic here: plain fp32 (the results are then those of precision="fp32")
        yield
        return
    old = knob.fp32_precision
    knob.fp32_precision = value
    try:
        yield
    finally:
        knob.fp32_precision = old


def gram_apply(rows: torch.Tensor, x: torch.Tensor, *, precision: str, out: torch.Tensor) -> torch.Tensor:
    """out += Tᵀ(T·X) for one chunk of rows: the product's fp32 (or fp64) result is added to the
    fp64 carry ``out`` in place, converted element by element (no fp64 copy of the product).

    Parameters
    ----------
    rows : (n, V') any float dtype — a chunk of T (cast to ``product_dtype(precision)`` here).
    x : (V', m) in ``product_dtype(precision, device)`` on the rows' device; for ``fast``, already
        rounded by :func:`round_test`.
    precision : {"fp64", "fp32", "fast"}
        ``fp64``: fp64 GEMMs; ``fp32``: fp32 GEMMs; ``fast``: fp32 GEMMs run with bf16 inputs
        (CPU) or TF32 (CUDA), fp32 accumulation and output. T is rounded identically in both
        products and X is pre-rounded, so the sketch stays that of T̃ᵀT̃ (T̃ = T rounded) for the
        test block the core sees; T·X is split as Z_hi + Z_lo (Z_hi = bf16(Z)) for the second
        product, so its own rounding leaves an error ~2⁻¹⁷ instead of 2⁻⁸.

    out : (V', m) float64 — the carry, updated in place.

    Returns
    -------
    z : (n, m) — T·X in the product dtype. Non-finite z means non-finite rows (Ω's entries
        are never 0): callers check it instead of the larger chunk.
    """
    if precision == "fast" and rows.device.type == "cuda" and _HAS_MM_DTYPE:
        return _gram_apply_bf16(rows, x, out)
    r = rows.to(x.dtype)
    if precision != "fast":
        z = r @ x
        _add_t_product(out, r, z)
        return z
    m = x.shape[1]
    with _fast_matmul(r.device):
        z = r @ x
        z_hi = z.to(torch.bfloat16).to(torch.float32)
        y2 = r.T @ torch.cat([z_hi, z - z_hi], dim=1)
    out += y2[:, :m]
    out += y2[:, m:]
    return z


def _add_t_product(out: torch.Tensor, r: torch.Tensor, z: torch.Tensor, *, block: int = 256) -> None:
    """out += rᵀ·z without a V'×m temporary: a GEMM into the carry when the dtypes agree (fp64),
    else column blocks of ``block`` (a block×V' temporary in z's dtype). A block is computed as
    (z_blockᵀ·r)ᵀ: the same sums, and on one core MKL's sgemm ran them 1.4× faster in that
    orientation for a 10000 × 2000 chunk and 120 columns (0.033 s against 0.046 s; 1.1× at 200)."""
    if out.dtype == z.dtype:
        out.addmm_(r.T, z)
        return
    for c0 in range(0, z.shape[1], block):
        out[:, c0:c0 + block] += (z[:, c0:c0 + block].T @ r).T


#: torch.mm(a, b, out_dtype=...) (bf16 inputs, fp32 output) exists from PyTorch 2.9 on.
_HAS_MM_DTYPE = hasattr(torch.ops.aten.mm, "dtype")


def _gram_apply_bf16(rows: torch.Tensor, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``fast`` on CUDA: the same arithmetic as the CPU's (bf16 inputs, fp32 accumulation and
    output, Z split into bf16 hi + lo) as explicit bf16 tensor-core GEMMs with fp32 output —
    instead of TF32, which rounds the inputs to 10 bits rather than bf16's 8 and runs at half
    the rate. Rows whose stride is 16-element aligned (transform_rows's CUDA rows) are used as
    they are."""
    r = rows if rows.dtype == torch.bfloat16 else rows.to(torch.bfloat16)
    xb = x.to(torch.bfloat16)  # a no-op for blocks from product_dtype; exact anyway (round_test)
    z = torch.mm(r, xb, out_dtype=torch.float32)
    z_hi = z.to(torch.bfloat16)
    z_lo = (z - z_hi.float()).to(torch.bfloat16)
    m = x.shape[1]
    y2 = torch.mm(r.T, torch.cat([z_hi, z_lo], dim=1), out_dtype=torch.float32)
    out += y2[:, :m]
    out += y2[:, m:]
    return z


def gram_of_image(rows: torch.Tensor, x: torch.Tensor, *, out: torch.Tensor) -> torch.Tensor:
    """out += ZᵀZ for Z = T·X of one chunk (the Rayleigh–Ritz pass of ``krylov-rr``; fp32 or
    fp64 products): Z as :func:`gram_apply` computes it, its Gram in fp64 (the products of fp32
    values are exact there). Returns Z.

    rows : (n, V'); x : (V', m) float32 or float64; out : (m, m) float64.
    """
    z = rows.to(x.dtype) @ x
    z64 = z.to(torch.float64)
    out += z64.T @ z64
    return z


def row_energy(rows: torch.Tensor) -> torch.Tensor:
    """Σ‖t_i‖² of a chunk as a 0-d fp64 tensor: per-row norms in the rows' precision (fp32 for
    narrower types; torch's vectorised cascade sums), squared and summed in fp64. Measured here:
    1e-9 relative error for fp32 rows at 1/28 of the cost of casting the chunk to fp64."""
    r = rows if rows.dtype in (torch.float32, torch.float64) else rows.float()
    return (torch.linalg.vector_norm(r, dim=1).to(torch.float64) ** 2).sum()


def _check_finite(z: torch.Tensor, rows: torch.Tensor, index: int, start: int) -> None:
    """Raise naming the chunk when T·X (hence the chunk) holds NaN/Inf."""
    # NaN/Inf anywhere make the sum non-finite: one reduction in z's own dtype instead of isfinite's
    # three passes (0.2 ms against 4.5 ms for 10000 × 140 fp32; an fp64 accumulator cost as much as
    # isfinite); a sum that merely overflows falls through to the exact test, which finds nothing.
    if bool(torch.isfinite(z.sum())) or bool(torch.isfinite(z).all()):
        return
    bad = (~torch.isfinite(rows.float() if rows.dtype == torch.bfloat16 else rows)).any(dim=1).nonzero()
    where = (f"row {start + int(bad[0])} (row {int(bad[0])} of the chunk)" if bad.numel()
             else "its product with the test matrix (values too large for the product precision)")
    raise InputError(f"chunk {index} (rows {start}-{start + rows.shape[0] - 1}) is not finite at {where}; "
                     "remove or fix the non-finite rows (or use precision='fp64' if the values overflow)")


# ---------------------------------------------------------------------------------------------
# the Nyström core and the a-posteriori error estimate
# ---------------------------------------------------------------------------------------------
def nystrom_eigh(q: torch.Tensor, y: torch.Tensor, *, precision: str = "fp64", n_vectors: int = 0,
                 overwrite_y: bool = False, qty: Optional[torch.Tensor] = None, y_norm: Optional[float] = None
                 ) -> tuple[torch.Tensor, Optional[torch.Tensor], dict]:
    """Shifted Nyström approximation Â = Y(QᵀY)⁺Yᵀ of a PSD A from Y = A·Q (all fp64).

    Tropp, Yurtsever, Udell & Cevher (2017), Alg. 3: Y_ν = Y + νQ, B = QᵀY_ν = LLᵀ
    (Cholesky), F = Y_ν L⁻ᵀ, then λ̂ = σ(F)² − ν. Here σ(F)² comes from eigh(FᵀF) (a GEMM
    and an l×l eigensolve instead of a tall SVD; A's eigenvalues are already squared, so no
    accuracy is lost beyond the products'). The shift ν starts at Tropp's √V'·eps(‖Y‖) and
    grows ×10 until the Cholesky succeeds: products in fp32/bf16 leave B indefinite at their
    round-off, which only the shift absorbs.

    Parameters
    ----------
    q : (V', L) float64 with orthonormal columns.
    y : (V', L) float64, A·q.
    precision : product precision of ``y`` (for the starting shift).
    n_vectors : eigenvectors of Â to return (0: none).
    overwrite_y : y may be overwritten with Y_ν (no V'×L copy; the caller's own temporary).
    qty : (L, L) float64 or None — QᵀY when the caller has it already (block Krylov assembles it
        block by block as the passes arrive, see :class:`_Iterate`); else computed here.
    y_norm : ‖Y‖₂ (or a value within a few per cent of it) when the caller has it; else estimated
        here (:func:`_norm2`).

    Returns
    -------
    lam : (L,) float64, descending, ≥ 0 — eigenvalues of Â (squared singular values of T).
    vecs : (V', n_vectors) float64 or None — the matching eigenvectors (T's right singular vectors).
    core : dict — ``shift`` ν, plus ``l_chol`` (L) and ``w`` (eigenvectors of FᵀF) to rebuild
        left singular vectors from T·q (see :func:`randomized_svd`).
    """
    n, width = q.shape
    if y_norm is None:
        y_norm = _norm2(y) if width else 0.0
    # Tropp et al. (2017), Alg. 3: ν = √n·eps(‖Y‖₂), for a Y exact to fp64 round-off. Products in
    # fp32/bf16 leave errors ~u·‖A‖ in Y that the core B⁻¹ would amplify in the directions
    # where QᵀAQ is that small (captured energy above the truth): shift by 10·u·‖Y‖₂ at least.
    nu = max(math.sqrt(n) * float(np.spacing(max(y_norm, np.finfo(np.float64).tiny))),
             10.0 * UNIT_ROUNDOFF[precision] * y_norm)
    if qty is None:
        qty = q.T @ y  # B(ν) = QᵀY + ν·I: the core for every trial shift from one GEMM
    for _ in range(40):
        b = qty + nu * torch.eye(width, dtype=qty.dtype, device=qty.device)
        b = 0.5 * (b + b.T)  # symmetrise: Cholesky reads one triangle, round-off differs by triangle
        chol, info = torch.linalg.cholesky_ex(b)
        if int(info) == 0:
            break
        # Indefinite at round-off (fp32/bf16 products, rank-deficient A): raise the shift.
        nu = max(nu * 10.0, float(np.finfo(np.float64).eps) * y_norm)
    else:  # pragma: no cover - only a NaN Y gets here, and callers reject those first
        raise FloatingPointError("the Nyström core could not be factorised (non-finite sketch?)")
    # F = Y_ν L⁻ᵀ, i.e. solve F·Lᵀ = Y_ν (right-hand side as it lies: no transposed copy); with
    # overwrite_y, Y_ν and then F take y's memory (the solve runs in place).
    if overwrite_y:
        f = torch.linalg.solve_triangular(chol.T, y.add_(q, alpha=nu), upper=True, left=False, out=y)
    else:
        f = torch.linalg.solve_triangular(chol.T, y + nu * q, upper=True, left=False)
    mu, w = sym_eigh(gram_t(f))
    lam = (mu - nu).clamp_min(0.0)
    vecs = None
    if n_vectors:
        # Right singular vectors of F: F·w·μ^{-1/2}; re-normalised so round-off in μ does not scale them.
        vecs = f @ w[:, :n_vectors]
        vecs /= torch.linalg.vector_norm(vecs, dim=0).clamp_min(torch.finfo(torch.float64).tiny)
    return lam, vecs, {"shift": nu, "l_chol": chol, "w": w}


# ---- the symmetric eigensolver policy (every eigensolve of rankest goes through here) ----------
# On CPU through numpy's LAPACK, always in fp64: torch 2.13's CPU eigh/svd (MKL syevd) ran 10–200×
# slower on the shared 2-core machine whenever another process held a core (a 576² eigh: 8 s
# instead of 0.04 s; 2000² fp64: 30 s against numpy's 0.9 s); numpy's was unaffected. On a GPU,
# torch.linalg (cuSOLVER).
def eigh_lower(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenpairs (ascending) of the symmetric matrix whose lower triangle ``g`` holds.

    g : (n, n) float64 → (λ (n,), V (n, n)) float64 on g's device, G = V·diag(λ)·Vᵀ.
    """
    if g.device.type == "cpu":
        lam, vec = np.linalg.eigh(g.numpy(), UPLO="L")
        return torch.from_numpy(lam), torch.from_numpy(vec)
    return torch.linalg.eigh(g, UPLO="L")


def eigvalsh_lower(g: torch.Tensor) -> np.ndarray:
    """Eigenvalues (ascending, fp64 numpy) of the symmetric matrix whose lower triangle ``g`` holds."""
    if g.device.type == "cpu":
        return np.linalg.eigvalsh(g.numpy(), UPLO="L")
    return torch.linalg.eigvalsh(g, UPLO="L").cpu().numpy()


def sym_eigh(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenpairs of the symmetric part of ``a``, *descending* (:func:`eigh_lower` of (a + aᵀ)/2)."""
    lam, vec = eigh_lower(0.5 * (a + a.T))
    return lam.flip(0), vec.flip(1)


def psd_sqrt(g: torch.Tensor) -> torch.Tensor:
    """Symmetric square root R = V·diag(sqrt(max(λ, 0)))·Vᵀ of a PSD matrix (fp64), so RᵀR = G.

    Not Cholesky: a LayerNorm's features lie on an affine hyperplane, so [H 1] (and a fresh
    model's H) is rank-deficient and Cholesky fails; eigh tolerates it (docs/design.md, "Factor route").
    """
    lam, vec = eigh_lower(g)
    return (vec * lam.clamp_min(0).sqrt()) @ vec.T


def gram_t(f: torch.Tensor) -> torch.Tensor:
    """FᵀF (fp64, exactly symmetric) of a tall F: on the CPU numpy's matmul, which calls BLAS
    syrk for a product of an array with its own transpose (half the flops of torch's GEMM:
    0.021 s against 0.036 s for a 1500 × 1000 F on one core); on a GPU torch's."""
    if f.device.type == "cpu":
        fn = f.numpy()
        return torch.from_numpy(fn.T @ fn)
    return f.T @ f


def svdvals(a: torch.Tensor) -> np.ndarray:
    """Singular values (descending, fp64 numpy) of ``a``; numpy's LAPACK on CPU, as :func:`eigh_lower`."""
    if a.device.type == "cpu":
        return np.linalg.svd(a.numpy(), compute_uv=False)
    return torch.linalg.svdvals(a).cpu().numpy()


def _norm2(y: torch.Tensor, iters: int = 12) -> float:
    """‖Y‖₂ to a few per cent, for the Nyström shift: power iteration on YᵀY from a fixed start,
    never below the largest column norm (an exact SVD of a V'×l block costs more than the rest of
    the core: 40 s for 4000×2000 here)."""
    col = float(torch.linalg.vector_norm(y, dim=0).max())
    if col == 0.0:
        return 0.0
    x = torch.ones(y.shape[1], dtype=y.dtype, device=y.device)
    est = 0.0
    for _ in range(iters):
        x = y.T @ (y @ x)
        nrm = float(torch.linalg.vector_norm(x))
        if nrm == 0.0:
            break
        est, x = math.sqrt(nrm), x / nrm
    return max(est, col)


def probe_inflation(n_probes: int, confidence: float = DEFAULT_CONFIDENCE) -> float:
    """α with P{‖M‖_F² > α·est} ≤ 1 − confidence for est = (1/s)Σ‖Mθ_j‖², θ_j ~ N(0, I).

    est/‖M‖_F² is a weighted mean of χ²₁ variables; its lower tail is heaviest for rank-one M
    (the moment generating function Π(1 + 2tw_i/s)^{−s/2} ≤ (1 + 2t/s)^{−s/2} when Σw_i = 1),
    where the Chernoff bound gives P{χ²_s/s ≤ x} ≤ (x·e^{1−x})^{s/2}. α = 1/x solves
    (x·e^{1−x})^{s/2} = 1 − confidence (Tropp et al. 2019, §6, for the estimator).
    """
    if n_probes <= 0:
        return float("inf")
    target = math.log1p(-confidence) * 2.0 / n_probes  # log of (x e^{1−x}) we need
    lo, hi = 1e-12, 1.0  # x·e^{1−x} increases on (0, 1]
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if math.log(mid) + 1.0 - mid < target:
            lo = mid
        else:
            hi = mid
    return 1.0 / lo


def nystrom_error(lam: torch.Tensor, vecs: Optional[torch.Tensor], energy: float, k: int, *,
                  probes: Optional[torch.Tensor] = None, probe_images: Optional[torch.Tensor] = None,
                  confidence: float = DEFAULT_CONFIDENCE, tol: float = TRUST_TOL, roundoff: float = 0.0) -> dict:
    """A-posteriori error estimate of a Nyström approximation Â = V·diag(λ̂)·Vᵀ of A = TᵀT.

    With M = A − Â ≽ 0, E = tr A = ‖T‖_F² (streamed, fp64) and Δ(d) = Σ_{i≤d}(λ_i − λ̂_i) ≥ 0
    (the energy the first d values miss; tail_true(d) = tail_est(d) − Δ(d), with
    tail_est(d) = E − Σ_{i≤d}λ̂_i the reported curve's tail, an upper bound):

    * unexplained energy U = E − Σλ̂ = tr M, exact up to round-off (includes the true tail
      beyond the sketch);
    * s Gaussian probes θ_j with known Aθ_j give Mθ_j = Aθ_j − Âθ_j, hence unbiased estimates
      of ‖M‖_F² = E‖Mθ‖² (Tropp et al. 2019, §6) and of ‖M·V_d‖_F² = E‖V_dᵀMθ‖², each
      inflated by α (:func:`probe_inflation`) into a bound that holds with ``confidence``;
    * certified: Δ(d) ≤ Σ_{i≤d}λ_i(M) ≤ min(U, √d·‖M‖_F) (Lidskii, Cauchy–Schwarz) →
      ``trusted_d_certified``;
    * estimate: in the basis (V_d, V_⊥), A = [[Λ̂_d + V_dᵀMV_d, V_dᵀMV_⊥], [·, ·]], so
      Δ(d) ≤ tr(V_dᵀMV_d) + ‖V_⊥ᵀMV_d‖_F²/gap_d ≤ √d·‖MV_d‖_F + O(‖MV_d‖²/gap_d). The
      estimate keeps the first-order term √d·‖MV_d‖_F (and the certified bound where smaller):
      the Ritz residual of the top-d vectors instead of the whole residual, which the unsketched
      tail dominates. This is ``w_error_lower`` and ``trusted_d``;
    * per value: λ_i − λ̂_i ≤ ‖Mv_i‖ to first order (‖M‖₂ certified) → ``sigma_upper``;
    * round-off: the products' errors move captured energy by up to ``roundoff`` (L·ν, ν the
      Nyström shift sized by their unit round-off): added to both lower bounds;
    * ``trusted_d``: the largest d ≤ k with W_est(d') − W_low(d') ≤ ``tol`` for every d' ≤ d.

    Parameters
    ----------
    lam : (L,) float64 descending — eigenvalues of Â.
    vecs : (V', L') float64, L' ≥ k — eigenvectors of Â (the residual is that of the rank-L'
        truncation when L' < L). May be None without probes.
    energy : E = ‖T‖_F².
    k : number of values reported.
    probes, probe_images : (V', s) float64 — Θ and A·Θ, or None (then only U bounds).
    roundoff : energy the products' round-off may add to or remove from Σλ̂.

    Returns
    -------
    dict: ``energy``, ``unexplained_energy``, ``unexplained_fraction``, ``residual_fro``
    (estimate of ‖M‖_F, NaN without probes), ``residual_bound`` (its bound), ``roundoff_energy``,
    ``n_probes``, ``confidence``, ``sigma_upper`` (k,), ``sigma_k_rel_error`` (estimated bound on
    (σ_k − σ̂_k)/σ̂_k), ``w_error_lower`` (k,), ``w_error_width_max`` (over d ≤ trusted_d),
    ``trusted_d``, ``trusted_d_certified``, ``trust_tol``.
    """
    lam = lam.to(torch.float64)
    lam_np = lam.cpu().numpy()
    e = float(energy)
    unexplained = max(e - float(np.sum(lam_np[::-1])), 0.0)
    s = 0 if probes is None else int(probes.shape[1])
    d = np.arange(1, k + 1, dtype=np.float64)
    est = float("nan")
    bound_f = unexplained  # ‖M‖₂ ≤ ‖M‖_F ≤ tr M
    ritz = np.full(k, np.inf)  # bound on ‖M·v_i‖ per value
    ritz_cum = np.full(k, np.inf)  # bound on ‖M·V_d‖_F
    if s:
        alpha = probe_inflation(s, confidence)
        lv = lam[: vecs.shape[1]]
        resid = probe_images - vecs @ (lv[:, None] * (vecs.T @ probes))  # M·Θ
        est = float(torch.linalg.vector_norm(resid) / math.sqrt(s))
        bound_f = min(unexplained, math.sqrt(alpha) * est)
        per = ((vecs[:, :k].T @ resid) ** 2).sum(dim=1).cpu().numpy() / s  # ≈ ‖M v_i‖², i ≤ k
        ritz = np.sqrt(alpha * per)
        ritz_cum = np.sqrt(alpha * np.cumsum(per))
    sig = np.sqrt(lam_np[:k])
    sigma_upper = np.sqrt(lam_np[:k] + np.minimum(bound_f, ritz))
    sk = sig[k - 1] if sig.size >= k else float("nan")
    sigma_k_rel = float((sigma_upper[k - 1] - sk) / sk) if sk > 0 else float("inf")

    prefix = np.cumsum(lam_np)[:k]
    tail_est = np.maximum(e - prefix, 0.0)
    rest = np.sum(lam_np) - prefix  # Σ_{d<i≤L} λ̂_i ≤ Σ_{i>d} λ_i: the true tail is at least this
    certified = np.minimum(unexplained, np.sqrt(d) * bound_f)
    estimated = np.minimum(certified, np.sqrt(d) * ritz_cum)

    def lower_and_trust(loss):
        tail_low = np.maximum(np.maximum(tail_est - loss - roundoff, rest), 0.0)
        w_est, w_low = (np.sqrt(tail_est / e), np.sqrt(tail_low / e)) if e > 0 else (np.zeros(k), np.zeros(k))
        ok = (w_est - w_low) <= tol
        trusted = k if ok.all() else int(np.argmin(ok))
        return w_low, w_est - w_low, trusted

    w_low, width, trusted = lower_and_trust(estimated)
    _, _, trusted_cert = lower_and_trust(certified)
    return {
        "energy": e,
        "unexplained_energy": unexplained,
        "unexplained_fraction": unexplained / e if e > 0 else float("nan"),
        "residual_fro": est,
        "residual_bound": bound_f,
        "roundoff_energy": float(roundoff),
        "n_probes": s,
        "confidence": confidence if s else 1.0,
        "sigma_upper": sigma_upper,
        "sigma_k_rel_error": sigma_k_rel,
        "w_error_lower": w_low,
        "w_error_width_max": float(width[:trusted].max()) if trusted else 0.0,
        "trusted_d": trusted,
        "trusted_d_certified": trusted_cert,
        "trust_tol": tol,
    }


def sign_flip(vt: torch.Tensor, u: Optional[torch.Tensor] = None):
    """Deterministic signs: the largest-|.| entry of each right singular vector is positive.

    scikit-learn's ``svd_flip(U, Vt, u_based_decision=False)``: decided on V because a stream
    has no U. Returns (vt, u) flipped.
    """
    idx = vt.abs().argmax(dim=1)
    signs = torch.sign(vt.gather(1, idx[:, None]))[:, 0]
    signs[signs == 0] = 1
    vt = vt * signs[:, None]
    if u is not None:
        u = u * signs.to(u.dtype)[None, :]
    return vt, u


# ---------------------------------------------------------------------------------------------
# row sources: an in-memory matrix or a re-callable stream
# ---------------------------------------------------------------------------------------------
class _Source:
    """Row chunks of T, pass after pass, each as (chunk index, first row, tensor on ``device``)."""

    def __init__(self, a, *, chunk_rows: Optional[int], device) -> None:
        self.matrix: Optional[torch.Tensor] = None
        self.stream: Optional[Callable[[], Iterable]] = None
        self.once: Optional[Iterable] = None
        if isinstance(a, (torch.Tensor, np.ndarray)):
            t = torch.from_numpy(np.ascontiguousarray(a)) if isinstance(a, np.ndarray) else a
            if t.dim() != 2:
                raise InputError(f"the matrix must be 2-D (N, V'), got shape {tuple(t.shape)}")
            if not t.is_floating_point():
                raise InputError(f"the matrix must hold floating-point values, got {t.dtype}")
            self.matrix = t
            self.n_rows, self.n_cols = int(t.shape[0]), int(t.shape[1])
            self.device = torch.device(device) if device is not None else t.device
            self.numpy = isinstance(a, np.ndarray)
            self.dtype = t.dtype
        elif callable(a):
            self.stream, self.n_rows, self.n_cols, self.numpy, self.dtype = a, None, None, False, None
            self.device = torch.device(device) if device is not None else torch.device("cpu")
        elif isinstance(a, Iterable):
            self.once, self.n_rows, self.n_cols, self.numpy, self.dtype = a, None, None, False, None
            self.device = torch.device(device) if device is not None else torch.device("cpu")
        else:
            raise InputError("A_or_stream must be a 2-D torch tensor or numpy array, or a zero-argument "
                             f"callable returning an iterable of row chunks; got {type(a).__name__}")
        self.chunk_rows = chunk_rows
        self.calls = 0

    @property
    def in_memory(self) -> bool:
        return self.matrix is not None

    def chunks(self) -> Iterator[tuple[int, int, torch.Tensor]]:
        self.calls += 1
        if self.matrix is not None:
            row_bytes = max(1, self.n_cols * max(4, self.matrix.element_size()))
            rows = self.chunk_rows or max(256, min(_CHUNK_ROWS, _CHUNK_BYTES // row_bytes))
            for i, start in enumerate(range(0, self.n_rows, rows)):
                yield i, start, self.matrix[start:start + rows].to(self.device)
            return
        if self.once is not None:
            if self.calls > 1:
                raise InputError("a one-shot iterable of chunks can be read once (passes=1); pass a "
                                 "zero-argument callable returning the chunks to run several passes")
            it = self.once
        else:
            it = self.stream()
        start = 0
        for i, c in enumerate(it):
            t = torch.from_numpy(np.ascontiguousarray(c)) if isinstance(c, np.ndarray) else c
            if not isinstance(t, torch.Tensor) or t.dim() != 2:
                raise InputError(f"chunk {i} of the stream is not a 2-D array of rows (n_i, V')")
            if self.n_cols is None:
                self.n_cols, self.dtype = int(t.shape[1]), t.dtype
            elif t.shape[1] != self.n_cols:
                raise InputError(f"chunk {i} has {t.shape[1]} columns, the first chunk had {self.n_cols}; "
                                 "every chunk must have the same V' columns")
            yield i, start, t.to(self.device)
            start += int(t.shape[0])


def _run_pass(src: _Source, blocks, plan: dict, *, pass_index: int, keep_z: bool = False,
              want_energy: bool = False, reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
              image_gram: bool = False):
    """One pass over the rows: Y_j = Tᵀ(T·X_j) for every test block X_j (fp64 (V', m_j) each).

    Blocks are concatenated into one product (one GEMM per chunk). V' of a stream is known only
    at its first chunk, so ``blocks`` may be a callable V' → list of blocks; it may change
    ``plan["precision"]`` (the exact fallback switches to fp64). Returns (ys, energy, n_rows,
    z) with z = T·X_0 (N × m_0, product dtype) when ``keep_z``, else None. With ``reduce`` (a sum
    over processes that each stream a shard of the rows), Y, the energy and the row count are
    those of all the shards, identical on every process. With ``image_gram`` (one block), the
    pass accumulates (T·X)ᵀ(T·X) (m × m, fp64) instead of Tᵀ(T·X): ``ys`` is [that Gram].
    """
    x = y = None
    widths: list[int] = []
    energy = torch.zeros((), dtype=torch.float64, device=src.device)
    n = 0
    zs: list[torch.Tensor] = []
    z_all = None  # in memory, N is known: T·X_0 goes straight into one (N, m_0) block
    for index, start, rows in src.chunks():
        if x is None:
            bl = blocks(src.n_cols) if callable(blocks) else blocks
            widths = [int(b_.shape[1]) for b_ in bl]
            x = torch.cat(bl, dim=1).to(device=src.device, dtype=product_dtype(plan["precision"], src.device))
            y = torch.zeros(sum(widths) if image_gram else src.n_cols, sum(widths), dtype=torch.float64,
                            device=src.device)
        if rows.shape[0] == 0:
            continue
        if image_gram:
            z = gram_of_image(rows, x, out=y)
        else:
            z = gram_apply(rows, x, precision=plan["precision"], out=y)
        _check_finite(z, rows, index, start)
        if want_energy:
            energy += row_energy(rows)
        if keep_z:
            if src.in_memory:
                if z_all is None:
                    z_all = torch.empty(src.n_rows, widths[0], dtype=z.dtype, device=z.device)
                z_all[start:start + z.shape[0]] = z[:, :widths[0]]
            else:
                zs.append(z[:, :widths[0]])
        n += int(rows.shape[0])
    if reduce is not None:
        if x is None:
            raise InputError(f"this process's shard yielded no chunk on pass {pass_index + 1}; with reduce, every "
                             "process's stream must yield at least one (possibly empty, (0, V')) chunk")
        y, energy = reduce(y), reduce(energy)
        n = int(reduce(torch.tensor(n, dtype=torch.int64, device=src.device)))
    if x is None or n == 0:
        raise InputError(f"the stream returned no rows on pass {pass_index + 1}; it must yield row chunks "
                         "(n_i, V') every time it is called")
    if src.n_rows is None:
        src.n_rows = n
    elif n != src.n_rows:
        raise InputError(f"the stream returned {n} rows on pass {pass_index + 1} but {src.n_rows} before; "
                         "a multi-pass stream must yield the same rows on every call")
    if keep_z and z_all is None:
        z_all = torch.cat(zs, dim=0)
    return list(torch.split(y, widths, dim=1)), float(energy), n, (z_all if keep_z else None)


def _orth(y: torch.Tensor, basis: Optional[torch.Tensor] = None, coef: Optional[torch.Tensor] = None
          ) -> torch.Tensor:
    """Orthonormal basis of range(y), orthogonalised against ``basis`` (block Gram–Schmidt twice).

    Householder QR always returns orthonormal columns, even for a rank-deficient y; when y was
    (nearly) inside ``basis`` (block Krylov on a low-rank T) the QR's columns can lean back
    into it, so they are projected and factorised once more — only then: the check costs one
    small GEMM, the repair a projection and a QR (0.17 s of a 4 s run at V' = 8000, l = 400).
    ``coef`` = basisᵀ·y when the caller has it (block Krylov: the new column of its core)
    saves the first projection's GEMM.
    """
    if basis is None:
        return torch.linalg.qr(y).Q
    for step in range(2):
        y = y - basis @ (coef if (step == 0 and coef is not None) else basis.T @ y)
    q = torch.linalg.qr(y).Q
    lean = basis.T @ q
    if float(lean.abs().max()) <= 64 * torch.finfo(q.dtype).eps:
        return q
    q = q - basis @ lean
    return torch.linalg.qr(q).Q


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------
def _check_int(name: str, value, *, minimum: int, hint: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InputError(f"{name} must be an integer, got {value!r}{hint}")
    if value < minimum:
        raise InputError(f"{name} must be >= {minimum}, got {value}{hint}")
    return int(value)


def default_oversample(k: int, passes, method: str, *, streamed: bool = False) -> int:
    """The default number of extra test columns p (l = k + p).

    One pass (Nyström), subspace iteration and any stream: p = k, i.e. l = 2k — the single-pass
    Nyström needs l ≈ 2k for a near-optimal error (Tropp et al. 2017, §5.4: the bound's factor
    1 + k/(l − k − 1) ≈ 2), and sklearn's 10 extra columns are too few for the slow decays of
    target matrices. Block Krylov on an in-memory matrix: p = max(20, k/5) — its accuracy grows
    with the dimension of the Krylov space more than with the block width (Musco & Musco 2015
    take l = k), so a narrow block reaches the tolerance with fewer products and a smaller
    finish, in a pass or two more: to a true 1e-3 on σ_1…σ_100 it took a basis of 480, 720 and 600
    columns at l = 120 against 600, 1000 and 800 at l = 2k on σ_i = 1/i, make_low_rank_matrix(tail
    0.8) and σ_i = i^-0.5 (benchmarks/reports/svd_oversample_cpu.md). A stream keeps 2k: each of
    its passes reads every row again (a row cache on disk feeding a GPU is bound by the read, not
    by the products), so its passes are the cost to save.
    """
    if passes == 1 or streamed or method == "subspace":
        return k
    return max(20, k // 5)


def _resolve(k, oversample, passes, method, precision, n_probes, seed, tol, max_passes, src: _Source):
    """Check the options and resolve every 'auto' (each with the reason)."""
    k = _check_int("k", k, minimum=1, hint=" (the number of singular values: choose 1 <= k < V')")
    if oversample is None:
        oversample = default_oversample(k, passes, method, streamed=not src.in_memory)
    oversample = _check_int("oversample", oversample, minimum=0)
    auto = passes == "auto"
    if auto:
        # A re-readable input: passes until the error estimate meets tol, at most max_passes
        # (see randomized_svd). A one-shot iterable: the single pass it allows.
        passes = 1 if src.once is not None else _check_int("max_passes", max_passes, minimum=2)
    passes = _check_int("passes", passes, minimum=1)
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol > 0:
        raise InputError(f"tol must be a positive number (a relative error on σ_1…σ_k), got {tol!r}")
    if src.once is not None and passes > 1:
        raise InputError("a one-shot iterable of chunks can be read once (passes=1); pass a zero-argument "
                         "callable returning the chunks to run several passes")
    if method not in METHODS:
        raise InputError(f"method must be one of {METHODS}, got {method!r}")
    if precision in (None, "auto"):
        # Products in the input's precision, as every BLAS-based SVD does: fp64 for fp64 input,
        # fp32 (carried in fp64) for anything narrower. A stream's dtype is unknown before its
        # first chunk: fp32 (precision="fp64" guarantees the smallest values, see the module doc).
        precision = "fp64" if src.dtype == torch.float64 else "fp32"
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if method == "krylov-rr" and precision == "fast":
        # Rayleigh–Ritz takes its subspace from the blocks themselves, which `fast` rounds to bf16:
        # the vectors would keep that rounding (3e-4 measured, against 4e-7 for krylov).
        raise InputError("method='krylov-rr' reads its subspace from the test blocks, which precision='fast' "
                         "rounds to bf16; use method='krylov' (or 'subspace') with 'fast', or precision='fp32'")
    n_probes = _check_int("n_probes", n_probes, minimum=0)
    seed = _check_int("seed", seed, minimum=-(1 << 63))
    return k, oversample, passes, auto, method, precision, n_probes, seed, float(tol)


def randomized_svd(A_or_stream: Union[torch.Tensor, np.ndarray, Callable[[], Iterable], Iterable], k: int, *,
                   oversample: Optional[int] = None, passes: Union[int, str] = "auto",
                   method: str = DEFAULT_METHOD, precision: Optional[str] = None, seed: int = 0, device=None,
                   return_vectors: bool = True, n_probes: int = DEFAULT_PROBES,
                   chunk_rows: Optional[int] = None,
                   reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None, tol: float = DEFAULT_TOL,
                   max_passes: int = MAX_PASSES, max_memory: int = DEFAULT_MAX_MEMORY) -> SVDResult:
    """Top-k singular values (and vectors) of T, in memory or streamed, with error estimates.

    Parameters
    ----------
    A_or_stream : (N, V') torch tensor or numpy array, or a zero-argument callable returning an
        iterable of row chunks (n_i, V') (tensors or arrays) — called once per pass, it must
        yield the same rows every time — or a one-shot iterable of chunks (``passes=1`` only).
    k : int
        Number of singular values, k ≥ 1. k ≥ V' (or k ≥ N in memory) computes the exact
        spectrum instead (fp64 SVD in memory, fp64 Gram of a stream) and warns.
    oversample : int, optional
        Extra test columns: l = k + oversample (capped at V'). Default (:func:`default_oversample`):
        max(20, k/5) for block Krylov in memory; k (l = 2k) for one pass, subspace iteration and
        streams.
    passes : int or "auto"
        Passes over the rows. 1: shifted Nyström (single pass, :func:`streaming_nystrom`).
        q ≥ 2: ``method`` with q passes (q − 1 power steps of Halko et al. 2011). "auto"
        (accuracy-driven): the probes' images are taken in the first pass, and after the passes
        that may have converged the approximation is finished and its estimate
        ``sigma_rel_error`` (:func:`sigma_error`) compared with ``tol``; passes are added until it
        meets ``tol`` or ``max_passes`` (or, for Krylov, ``max_memory``) is reached — then a
        UserWarning names the estimate reached. A one-shot iterable: 1.
    method : {"krylov", "subspace", "krylov-rr"}
        Block Krylov with a Nyström finish (the default), subspace iteration (Halko, Martinsson
        & Tropp 2011, Alg. 4.4), or block Krylov with Musco & Musco's Rayleigh–Ritz finish (2015,
        Alg. 2), whose last pass computes T·Q only: 2·passes − 1 products with T instead of
        2·passes (with ``passes="auto"`` every pass is a full one, the last pass being unknown
        in advance). Krylov memory: (passes − 1)·l columns, twice (blocks and images, fp64).
        All the same for passes = 1. Block Krylov is the default because it reaches a given
        accuracy sooner: at the same l = 200 it took 5 passes to a true error of 1e-3 on σ_1…σ_100
        of scikit-learn's ``make_low_rank_matrix(4000, 1500, effective_rank=150,
        tail_strength=0.8)`` against subspace iteration's 8, 4 against 5 on σ_i = i^-0.5, 3 and 3
        on σ_i = 1/i; each at its default block (l = 120 and 200), with the passes tuned by an
        oracle, 0.28 s against 0.38, 0.53 against 0.67 and 0.38 against 0.38
        (benchmarks/reports/svd_cpu.md). Its memory is bounded by ``max_memory``. krylov-rr needs
        one product fewer at a fixed number of passes, which ``passes="auto"`` cannot know in advance.
    precision : {"fp64", "fp32", "fast"}, optional
        Arithmetic of the products (always carried in fp64), see :func:`gram_apply`.
        Default: fp64 for fp64 input, fp32 otherwise.
    seed : int
        Seed of the counter-based test matrices (:func:`gaussian_test_matrix`): same seed, same result.
    device : torch device, optional
        Where the products run. Default: the tensor's device; CPU for arrays and streams.
    return_vectors : bool
        Also return Vt (k, V') and, for an in-memory matrix, U (N, k), rebuilt from the last
        pass's T·Q (no extra pass; N·l extra memory). A stream's U is None.
    n_probes : int
        Gaussian probe columns of the a-posteriori error estimate (0: unexplained energy only).
    chunk_rows : int, optional
        Rows per product for an in-memory matrix (default: up to 16384 rows, at most 512 MB).
    reduce : callable, optional
        Distributed use: each process streams its own shard of the rows, and ``reduce(t)``
        returns the sum of tensor ``t`` over the processes (e.g. an in-place
        ``torch.distributed.all_reduce``). Every pass's Tᵀ(T·X), ‖T‖_F² and row count are
        reduced, so every process computes the same subspaces and returns the result for the
        union of the shards. Streams only; every process must call with the same arguments.
    tol : float
        ``passes="auto"``: target of the estimated relative error of σ_1…σ_k (default 1e-3:
        σ to three digits, ten times finer than the W-error tolerance of ``trusted_d``, and the
        accuracy at which randomized SVDs are usually compared — Halko et al. 2011 §7, Musco &
        Musco 2015 §6 measure per-vector errors of 1e-3 to 1e-2). The estimate is the
        first-order bound of :func:`sigma_error` (20 to 120 times the true error at least, per
        spectrum, where the default stopped in benchmarks/reports/svd_estimate.md), sharpened
        from the second check on by its per-pass contraction (:func:`contracted_error`: Ritz
        values converge with sin²θ, the first-order bound with sin θ) — empirical, checked
        against fp64 SVDs (benchmarks/reports/svd_accuracy.md, tests). Values below the
        products' round-off floor (σ_i < √(u/tol)·σ_1, u the unit round-off of the products) are
        refined until they stop improving instead (``below_roundoff`` counts them; fp64 products
        resolve them).
    max_passes : int
        ``passes="auto"``: the most passes (default 12).
    max_memory : int
        ``passes="auto"`` with a Krylov method: the most bytes its blocks and their images may
        take (16·V'·l per pass after the first; default 4 GiB); no further pass once reached.

    Returns
    -------
    SVDResult(U, S, Vt, info)
        U : (N, k) or None; S : (k,) float64, descending; Vt : (k, V') or None — numpy for a
        numpy input, torch otherwise; signs by :func:`sign_flip`.
        info : ``passes`` (the passes run), ``passes_auto``, ``method``, ``l``, ``oversample``,
        ``precision``, ``seed``, ``n_rows``, ``n_cols``, ``exact``, ``shift``, the estimates of
        :func:`nystrom_error` (``energy``, ``unexplained_energy``, ``residual_fro``,
        ``sigma_upper``, ``w_error_lower``, ``trusted_d``, …) and of :func:`sigma_error`
        (``sigma_rel_error``, ``sigma_rel_error_each``, ``below_roundoff``, ``tol``).

    Notes
    -----
    Every value is a lower bound up to the round-off of the products: σ̂_i ≤ σ_i (Â ≼ A).
    Cost: 4·N·V'·l flops per pass (two GEMMs per chunk); memory O(V'·l) (plus N·l for U), Krylov
    O(V'·passes·l) (plus N·passes·l for U); a Krylov finish O(V'·(passes·l)²) (``passes="auto"``
    finishes only on the passes where the estimate's geometric rate predicts convergence, and
    stops on the contracted estimate, one pass before the first-order one would).

    References
    ----------
    Halko, Martinsson & Tropp (2011), "Finding structure with randomness", SIAM Rev. 53(2),
    Alg. 4.4 (subspace iteration), §4.3 (a-posteriori error), §5.5 (Nyström).
    Musco & Musco (2015), "Randomized block Krylov methods for stronger and faster approximate
    singular value decomposition", NeurIPS, Alg. 2.
    Tropp, Yurtsever, Udell & Cevher (2017), "Fixed-rank approximation of a positive-
    semidefinite matrix from streaming data", NeurIPS, Alg. 3 (shifted Nyström).
    Tropp, Yurtsever, Udell & Cevher (2019), SIAM J. Sci. Comput. 41(4), §6 (error probes).
    Saad (2011), "Numerical methods for large eigenvalue problems", 2nd ed., SIAM, §4.3 and §6.6
    (Ritz values: error quadratic in the subspace angle; Krylov convergence rates).
    Li & Li (2005), "A note on eigenvalues of perturbed Hermitian matrices", Linear Algebra Appl.
    395 (quadratic residual bounds).
    """
    src = _Source(A_or_stream, chunk_rows=chunk_rows, device=device)
    if reduce is not None and src.in_memory:
        raise InputError("reduce applies to streamed shards; pass an in-memory matrix without it")
    k, oversample, passes, auto, method, precision, n_probes, seed, tol = _resolve(
        k, oversample, passes, method, precision, n_probes, seed, tol, max_passes, src)
    if src.in_memory and k >= min(src.n_rows, src.n_cols):
        warnings.warn(f"k = {k} >= min(N, V') = {min(src.n_rows, src.n_cols)}: computing the exact SVD (fp64) "
                      "instead of a randomized one", UserWarning, stacklevel=2)
        return _exact_in_memory(src, k, return_vectors=return_vectors, seed=seed)
    plan = {"precision": precision, "exact": False}
    early_probes = passes == 1 or method == "krylov-rr" or auto

    def first_blocks(v: int) -> list[torch.Tensor]:
        if k >= v:
            # The exact fallback in the same pass: Tᵀ(T·I) = TᵀT in fp64, the gram route.
            plan.update(exact=True, precision="fp64")
            return [torch.eye(v, dtype=torch.float64, device=src.device)]
        l_ = min(k + oversample, v)
        out = [round_test(gaussian_test_matrix(v, l_, seed=seed, stream=STREAM_OMEGA, device=src.device), precision)]
        if early_probes and n_probes:
            # krylov-rr's last pass computes no A·X, and "auto" estimates the error after every
            # pass: their probes' images come from this pass.
            out.append(probe_matrix(v, n_probes, seed=seed, precision=precision, device=src.device))
        return out

    # Pass 1: Y = A·Ω = Tᵀ(T·Ω) and E = ‖T‖_F² in fp64.
    keep = return_vectors and src.in_memory
    ys, energy, n_rows, z = _run_pass(src, first_blocks, plan, pass_index=0, want_energy=True,
                                      keep_z=keep and passes == 1, reduce=reduce)
    v = src.n_cols
    if plan["exact"]:
        warnings.warn(f"k = {k} >= V' = {v}: computed the exact spectrum from the fp64 Gram TᵀT instead of a "
                      "randomized SVD", UserWarning, stacklevel=2)
        return _exact_from_gram(src, ys[0], k, energy, return_vectors=return_vectors, seed=seed)
    l = ys[0].shape[1]
    base = {"l": l, "oversample": oversample, "precision": precision, "seed": seed, "n_rows": n_rows,
            "n_cols": v, "exact": False}
    if passes == 1:
        lam, vecs, err, core = nystrom_finalize(ys[0], ys[1] if n_probes else None, n_cols=v, k=k, seed=seed,
                                                energy=energy, precision=precision,
                                                n_vectors=k if return_vectors else 0)
        err.update(sigma_error(lam, err["sigma_upper"], min(k, l), precision=precision, tol=tol))
        info = {"passes": 1, "passes_auto": auto, "method": "nystrom", **base, "shift": core["shift"], **err}
        return _package(src, lam[:k], vecs, core, z, info, return_vectors=return_vectors)

    probes = probe_matrix(v, n_probes, seed=seed, precision=precision, device=src.device) if n_probes else None
    probe_y = ys[1] if (early_probes and n_probes) else None
    krylov = method in ("krylov", "krylov-rr")
    y = ys[0]
    it = _Iterate(method=method, precision=precision, k=k, energy=energy, probes=probes, keep=keep,
                  vectors=return_vectors)
    done = 1
    for j in range(1, passes):
        last = j == passes - 1
        prev = it.span() if krylov else None
        room = v - (0 if prev is None else prev.shape[1])
        if room <= 0:
            break  # the Krylov space spans R^V' already: the Nyström below is exact
        if auto and krylov and it.basis and _krylov_bytes(v, (len(it.basis) + 1) * l) > max_memory:
            it.memory_stop = True
            break
        # re-orthonormalise every pass (QR): no growth or loss of rank
        q = _orth(y[:, :room], prev, None if (prev is None or it.coef is None) else it.coef[:, :room])
        qr_ = round_test(q, precision)
        if method == "krylov-rr" and last and not auto:  # Rayleigh–Ritz: T·Q only
            ys, _, _, z = _run_pass(src, [qr_], plan, pass_index=j, keep_z=keep, reduce=reduce, image_gram=True)
            it.add(q, qr_, None, z, last_gram=ys[0])
            done += 1
            break
        with_probes = probe_y is None and probes is not None and (
            last or room <= y.shape[1] and method == "krylov")
        ys, _, _, z = _run_pass(src, [qr_] + ([probes] if with_probes else []), plan, pass_index=j, keep_z=keep,
                                reduce=reduce)
        done += 1
        y = ys[0]
        if with_probes:
            probe_y = ys[1]
        it.add(q, qr_, y, z)
        if auto and done >= it.next_check and it.check(probe_y, tol=tol, passes=done):
            break
    if it.result is None or not auto or it.checked != done:
        it.finish(probe_y, tol=tol)
    lam, vecs, core, err = it.result
    if auto:
        _warn_unconverged(err, tol=tol, passes=done, memory_stop=it.memory_stop)
    info = {"passes": done, "passes_auto": auto, "method": method, **base, "shift": core["shift"], **err}
    return _package(src, lam[:it.kk], vecs, core, it.zs if keep else None, info, return_vectors=return_vectors)


def _krylov_bytes(n_cols: int, width: int) -> int:
    """Memory of a Krylov basis of ``width`` columns: the blocks and their images, fp64."""
    return 2 * 8 * n_cols * width


def _warn_unconverged(err: dict, *, tol: float, passes: int, memory_stop: bool) -> None:
    if err["sigma_rel_error"] <= tol:
        return
    why = "the Krylov basis would exceed max_memory" if memory_stop else "max_passes was reached"
    warnings.warn(f"randomized_svd: the error estimate of σ_1…σ_k reached {err['sigma_rel_error']:.2e} after "
                  f"{passes} passes, above tol = {tol:g} ({why}); raise max_passes (or max_memory), or accept "
                  "the estimate reported in info['sigma_rel_error']", UserWarning, stacklevel=3)


class _Iterate:
    """The blocks of the passes after the first, and the approximation they give (:meth:`finish`).

    subspace: the current block only; Krylov: every block (Q_1, Q_2, …), its image A·Q_j and, in
    memory, its T·Q_j (for U). krylov-rr with a fixed number of passes: the last block has no
    image, only ``last_gram`` = (T·Q)ᵀ(T·Q).
    """

    def __init__(self, *, method: str, precision: str, k: int, energy: float, probes, keep: bool,
                 vectors: bool) -> None:
        self.method, self.precision, self.k, self.energy, self.probes, self.keep, self.vectors = (
            method, precision, k, energy, probes, keep, vectors)
        self.basis: list[torch.Tensor] = []
        self.used: list[torch.Tensor] = []  # the same blocks as the products saw them (round_test)
        self.images: list[torch.Tensor] = []
        # Krylov: XᵀY of the blocks that have images, one block column per pass (V'·L·l flops
        # then, instead of V'·L² at every finish): the Nyström core, and Rayleigh–Ritz's.
        self.core: Optional[torch.Tensor] = None
        self.coef: Optional[torch.Tensor] = None  # Xᵀ·(newest image): the next block's first projection
        self.y_norm = 0.0  # ‖Y‖₂ for the Nyström shift: max_j ‖Y_j‖₂ (below)
        self._span: Optional[torch.Tensor] = None  # the blocks side by side, grown once per pass
        self.zs: list[torch.Tensor] = []
        self.last_gram = None
        self.result = None
        self.kk = k
        self.memory_stop = False
        self.next_check, self.checked, self.history = 2, 0, []  # passes="auto": when to estimate next

    def check(self, probe_y, *, tol: float, passes: int) -> bool:
        """``passes="auto"``: finish, and say whether the estimate meets ``tol``. Otherwise plan the
        next check from the geometric rate of the last two estimates, one pass before the passes it
        predicts (Krylov converges faster than geometrically, so the prediction tends to be late
        rather than early): a Krylov finish costs V'·(j·l)² — half of a run at N = 2.7·V' when done every pass.

        The estimate compared with ``tol`` is :func:`contracted_error` of the first-order one."""
        prev = self.result[3] if self.result is not None else None
        err = self.finish(probe_y, tol=tol)
        self.checked = passes
        e = err["sigma_rel_error"]
        if self.history:
            contracted_error(err, self.history[-1], passes, floor=CONTRACTION_FLOOR * UNIT_ROUNDOFF[self.precision])
        if _converged(err, prev, tol):
            return True
        self.history.append((passes, e))
        self.next_check = passes + 1
        if len(self.history) >= 2:
            (p0, e0), (p1, e1) = self.history[-2:]
            if 0 < e1 < e0 and math.isfinite(e0):
                rate = (e1 / e0) ** (1.0 / (p1 - p0))
                need = math.log(tol / e1) / math.log(rate)
                # the contracted estimate meets tol about one pass before the first-order one
                self.next_check = passes + max(1, math.ceil(need) - 2)
        return False

    def span(self) -> Optional[torch.Tensor]:
        """The blocks side by side (V' × L; None before the first), as the next block is orthogonalised
        against them: kept from pass to pass (one V'×L copy per pass, shared with :meth:`finish`),
        except for ``fast``, whose products saw rounded blocks (:func:`round_test`)."""
        if not self.basis:
            return None
        return torch.cat(self.basis, dim=1) if self.precision == "fast" else self._span

    def add(self, q, qr_, y, z, *, last_gram=None) -> None:
        if self.method == "subspace":
            self.basis, self.used, self.images, self.zs = [q], [qr_], [y], ([z] if self.keep else [])
            self._span, self.y_norm = qr_, _norm2(y)
            return
        widths = [b.shape[1] for b in self.used] + [qr_.shape[1]]
        self._span = qr_ if self._span is None else torch.cat([self._span, qr_], dim=1)
        # the blocks as views of the span: one copy of the basis is kept, not two
        self.used = list(torch.split(self._span, widths, dim=1))
        self.basis = self.used if self.precision != "fast" else self.basis + [q]
        if y is not None:
            self.images.append(y)
            # ‖Y‖₂ ≥ max_j ‖Y_j‖₂ ≥ ‖Y‖₂/√m, and in practice = ‖Y‖₂ to round-off: X_1 = orth(A·Ω)
            # holds A's top direction, so ‖Y_1‖₂ = ‖A·X_1‖₂ ≈ ‖A‖₂ ≥ ‖Y‖₂. One V'×l estimate per
            # block instead of one of V'×L at every finish.
            self.y_norm = max(self.y_norm, _norm2(y))
            # (not for `fast`: Nyström re-orthonormalises its rounded blocks, a core of another basis)
            if len(self.images) == len(self.used) and self.precision != "fast":
                self._grow_core(y)
        if self.keep:
            self.zs.append(z)
        self.last_gram = last_gram

    def _grow_core(self, y: torch.Tensor) -> None:
        """Append the new block's column to the core B = XᵀY: c = Xᵀy_new, and by the symmetry
        of A the new row is the old part of c transposed (x_newᵀ·A·X_old = (X_oldᵀ·A·x_new)ᵀ)."""
        c = self.coef = self._span.T @ y
        old = 0 if self.core is None else self.core.shape[0]
        if old == 0:
            self.core = c
            return
        self.core = torch.cat([torch.cat([self.core, c[:old]], dim=1), torch.cat([c[:old].T, c[old:]], dim=1)])

    def finish(self, probe_y, *, tol: float) -> dict:
        """Eigenpairs of the approximation from the blocks so far and its error estimate."""
        xk = self._span
        self.kk = kk = min(self.k, xk.shape[1])
        n_vec = kk if (self.vectors or self.probes is not None) else 0
        if self.method == "krylov-rr" or self.last_gram is not None:
            lam, vecs, core = rayleigh_ritz(self.used, self.images, self.last_gram, precision=self.precision,
                                            n_vectors=n_vec, xty=self.core)
            roundoff = core["roundoff"]
        else:
            # The blocks are orthonormal unless `fast` rounded them (then nystrom() re-orthonormalises).
            # (a fresh concatenation of the images, which the core may overwrite)
            lam, vecs, core = nystrom(xk, torch.cat(self.images, dim=1), precision=self.precision,
                                      orthonormal=self.precision != "fast", n_vectors=n_vec, qty=self.core,
                                      overwrite_y=True, y_norm=self.y_norm if self.precision != "fast" else None)
            roundoff = core["shift"] * xk.shape[1]
        err = nystrom_error(lam, vecs, self.energy, kk, probes=self.probes, probe_images=probe_y, roundoff=roundoff)
        err.update(sigma_error(lam, err["sigma_upper"], kk, precision=self.precision, tol=tol))
        self.result = (lam, vecs, core, err)
        return err


CONTRACTION_MAX = 0.5  # the per-pass contraction below which the first-order estimate is contracted
# (a ρ measured over a check planned passes ahead includes the slow early passes: 0.32 over passes 3→7 on
# make_low_rank_matrix(tail 0.8) at l = 120, where the first-order 1.7e-3 stood for a true 6.4e-6)
CONTRACTION_START = 1e-2  # ... once the first-order estimate itself is this small (sin θ small)
CONTRACTION_FLOOR = 100.0  # ... but never below 100 unit round-offs of the products (the products' noise)


def contracted_error(err: dict, previous: tuple[int, float], passes: int, *, floor: float = 0.0) -> dict:
    """Sharpen the first-order ``sigma_rel_error`` e_q of pass q by the contraction it shows.

    The first-order estimate e ~ ‖M·v_i‖/λ̂_i falls with sin θ_q (θ_q the angle between the top
    singular subspace and the Krylov space), while the error of a Ritz value falls with sin² θ_q
    (Saad 2011, "Numerical methods for large eigenvalue problems", §4.3; Li & Li 2005: the
    residual enters squared): the error is about e_q times sin θ_q. On Krylov's superlinear
    convergence (Musco & Musco 2015, §4; Saad 2011, §6.6) each pass contracts θ by at least as much
    as the passes before, so ρ = (e_q / e_p)^{1/(q−p)} (p an earlier check) bounds the next
    contraction, and e_q·ρ stands for the error once the asymptotic regime is reached: ρ ≤
    CONTRACTION_MAX and e_q ≤ CONTRACTION_START (sin θ small: on earlier passes, e.g. pass 3 on
    σ_i = i^-0.3 at tol = 1e-2, the contracted estimate fell below the truth in trials);
    otherwise e_q is kept. Never below e_q^{3/2} (on fast decays ρ falls to ~1e-2, and e_q·ρ fell
    below the truth in trials: the next contraction is not the last one there) nor below ``floor``. Not a bound: an empirical estimate, checked against the
    fp64 SVD on fresh matrices (tests/test_linalg.py: test_contracted_estimate_is_conservative;
    benchmarks/reports/svd_estimate.md: above the truth in every run, by 3× at least, over
    7 spectra × 4 tolerances; svd_accuracy.md). It
    replaces ``sigma_rel_error`` in place; the first-order one is kept as
    ``sigma_rel_error_first_order`` and the contraction as ``contraction``.
    """
    p0, e0 = previous
    e1 = err["sigma_rel_error"]
    err["sigma_rel_error_first_order"] = e1
    rate = (e1 / e0) ** (1.0 / (passes - p0)) if (0 < e1 and math.isfinite(e0) and e0 > 0 and passes > p0) else 1.0
    err["contraction"] = float(rate)
    if rate <= CONTRACTION_MAX and e1 <= CONTRACTION_START:
        err["sigma_rel_error"] = float(min(e1, max(e1 * max(rate, math.sqrt(e1)), floor)))
    return err


def _converged(err: dict, prev: Optional[dict], tol: float) -> bool:
    """The estimate meets ``tol`` on the values it resolves (``sigma_rel_error``), and each value
    below the products' round-off is within ``tol`` or no longer improving (at most halved since
    the previous estimate): more passes cannot refine what the round-off hides."""
    if not err["sigma_rel_error"] <= tol:
        return False
    if not err["below_roundoff"]:
        return True
    if prev is None:
        return False
    now, before = err["sigma_rel_error_each"], prev["sigma_rel_error_each"]
    m = min(now.size, before.size)
    hidden = np.arange(now.size) >= now.size - err["below_roundoff"]
    ok = (now <= tol) | ~hidden
    ok[:m] |= now[:m] > 0.5 * before[:m]
    return bool(ok.all())


def sigma_error(lam: torch.Tensor, sigma_upper: np.ndarray, k: int, *, precision: str, tol: float) -> dict:
    """The estimate ``passes="auto"`` drives down: max over i ≤ k of (σ_i^up − σ̂_i)/σ̂_i.

    σ_i^up is :func:`nystrom_error`'s ``sigma_upper`` (λ_i − λ̂_i ≤ ‖M v_i‖, first order: an
    overestimate: 20 to 120 times the true error at least, per spectrum, where the default stopped
    in benchmarks/reports/svd_estimate.md). Values the
    products' round-off can hide are left out: the probe images A·Θ carry errors ~u·λ_1, which
    move the estimate of σ_i by ~u·λ_1/(2λ_i) relative, so only σ̂_i with u·λ̂_1/λ̂_i ≤ tol
    (σ̂_i ≥ √(u/tol)·σ̂_1: 7.7e-3·σ̂_1 for fp32 products at tol = 1e-3, 3e-7·σ̂_1 for fp64) can be
    certified to ``tol``; the others are counted in ``below_roundoff`` (fp64 products resolve them).

    Returns
    -------
    dict: ``sigma_rel_error`` (float; inf without probes), ``sigma_rel_error_each`` (k,),
    ``below_roundoff`` (int), ``tol``.
    """
    lam_np = lam[:k].cpu().numpy()
    sig = np.sqrt(np.maximum(lam_np, 0.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(sig > 0, (np.asarray(sigma_upper)[:k] - sig) / sig, np.inf)
        resolvable = UNIT_ROUNDOFF[precision] * float(lam_np[0]) / lam_np <= tol if lam_np.size else np.zeros(0, bool)
    resolvable[:1] = True  # σ_1 is always resolved
    worst = float(rel[resolvable].max()) if resolvable.any() else float("inf")
    return {"sigma_rel_error": worst, "sigma_rel_error_each": rel, "below_roundoff": int((~resolvable).sum()),
            "tol": float(tol)}


def rayleigh_ritz(used: list[torch.Tensor], images: list[torch.Tensor], last_gram: Optional[torch.Tensor], *,
                  precision: str, n_vectors: int = 0, xty: Optional[torch.Tensor] = None):
    """Ritz pairs of A = TᵀT on span of the Krylov blocks X = [X_1 … X_m] (Musco & Musco 2015,
    Alg. 2, steps 5–7), without A·X_m.

    The core G = XᵀAX is assembled from what the passes computed: XᵀA·X_{<m} from the images
    Y_j = A·X_j (j < m), and X_mᵀAX_m = (T·X_m)ᵀ(T·X_m) = ``last_gram`` (None when the blocks
    already spanned R^V' and every image exists). X is orthonormal (fp32/fp64 products use the
    blocks as they are); G = WΛWᵀ gives the Ritz values Λ and vectors XW. Â = XWΛWᵀXᵀ = PAP
    (P the projection on span X): λ̂_i ≤ λ_i by Cauchy interlacing, E − Σλ̂ ≥ Σ_i(λ_i − λ̂_i).

    Parameters
    ----------
    used : m blocks (V', l_j) float64, as the products saw them; images : the m − 1 (or m) A·X_j.
    last_gram : (l_m, l_m) float64 or None.
    xty : XᵀAX of the blocks with images, when the caller assembled it already (:class:`_Iterate`).

    Returns
    -------
    (lam (L,) descending ≥ 0, vecs (V', n_vectors) or None, core) — core as :func:`nystrom_eigh`'s
    for rebuilding U from T·X (``w``; no ``l_chol`` or ``r``), ``shift`` = 0 and
    ``roundoff``: the energy the products' round-off may move, L·10·u·λ̂_1.
    """
    x = torch.cat(used, dim=1)
    if last_gram is None:
        g = x.T @ torch.cat(images, dim=1) if xty is None else xty
    elif len(used) == 1:
        g = last_gram
    else:
        ay = torch.cat(images, dim=1)  # A·X_{<m}
        core = torch.cat(used[:-1], dim=1).T @ ay if xty is None else xty  # X_{<m}ᵀ A X_{<m}
        cross = ay.T @ used[-1]  # X_{<m}ᵀ A X_m
        g = torch.cat([torch.cat([core, cross], dim=1), torch.cat([cross.T, last_gram], dim=1)], dim=0)
    mu, w = sym_eigh(g)
    lam = mu.clamp_min(0.0)
    vecs = None
    if n_vectors:
        vecs = x @ w[:, :n_vectors]
    width = g.shape[0]
    roundoff = width * 10.0 * UNIT_ROUNDOFF[precision] * float(lam[0]) if width else 0.0
    return lam, vecs, {"shift": 0.0, "roundoff": roundoff, "w": w}


def streaming_nystrom(A_or_stream, k: int, *, oversample: Optional[int] = None, precision: Optional[str] = None,
                      seed: int = 0, n_probes: int = DEFAULT_PROBES, device=None, return_vectors: bool = True,
                      chunk_rows: Optional[int] = None) -> SVDResult:
    """Single-pass streaming Nyström SVD of T: one read of every row, memory O(V'·l).

    Y = TᵀT·Ω is accumulated chunk by chunk (Ω regenerated from counters, :func:`gaussian_test_matrix`),
    then the shifted Nyström core (:func:`nystrom_eigh`) runs on the orthonormalised test matrix
    (:func:`nystrom_finalize`). It is :class:`rankest.accumulate.sketch.Sketch` without the accumulator
    interface: both give the same values for the same seed. Parameters and result as
    :func:`randomized_svd` with ``passes=1`` (works on a one-shot iterable too).
    """
    return randomized_svd(A_or_stream, k, oversample=oversample, passes=1, precision=precision, seed=seed,
                          device=device, return_vectors=return_vectors, n_probes=n_probes, chunk_rows=chunk_rows)


def nystrom_finalize(y: torch.Tensor, probe_y: Optional[torch.Tensor], *, n_cols: int, k: int, seed: int,
                     energy: float, precision: str, n_vectors: int = 0, confidence: float = DEFAULT_CONFIDENCE):
    """From a single-pass sketch Y = A·Ω (and A·Θ) to eigenvalues, vectors and error estimates.

    Shared by :func:`streaming_nystrom` and :class:`rankest.accumulate.sketch.Sketch` (one formula). Ω and
    Θ are regenerated from ``seed``. Ω = Q·R is orthonormalised first (Tropp et al. 2017 use an
    orthonormal test matrix): A·Q = Y·R⁻¹ gives the same approximation with a better-conditioned
    core.

    Returns
    -------
    lam : (l,) float64 descending; vecs : (V', min(max(n_vectors, k), l)) float64 or None;
    err : dict of :func:`nystrom_error`; core : dict of :func:`nystrom_eigh` plus ``r``.
    """
    dev = y.device
    l = y.shape[1]
    n_probes = 0 if probe_y is None else probe_y.shape[1]
    nv = min(max(n_vectors, k if n_probes else 0), l)
    # Ω is handed over, not kept: nystrom frees it once it is orthonormalised (V'·l·8 bytes).
    lam, vecs, core = nystrom(
        round_test(gaussian_test_matrix(n_cols, l, seed=seed, stream=STREAM_OMEGA, device=dev), precision), y,
        precision=precision, orthonormal=False, n_vectors=nv)
    probes = probe_matrix(n_cols, n_probes, seed=seed, precision=precision, device=dev) if n_probes else None
    err = nystrom_error(lam, vecs, energy, min(k, l), probes=probes, probe_images=probe_y, confidence=confidence,
                        roundoff=core["shift"] * l)
    return lam, vecs, err, core


def probe_matrix(n_cols: int, n_probes: int, *, seed: int, precision: str, device=None) -> torch.Tensor:
    """The error probes Θ (V' × s, fp64) as the products see them: counter stream 1, rounded for ``fast``."""
    return round_test(gaussian_test_matrix(n_cols, n_probes, seed=seed, stream=STREAM_PROBES, device=device), precision)


def nystrom(x: torch.Tensor, y: torch.Tensor, *, precision: str, orthonormal: bool, n_vectors: int = 0,
            qty: Optional[torch.Tensor] = None, overwrite_y: bool = False, y_norm: Optional[float] = None):
    """Shifted Nyström from any full-rank test block X (V' × L) and Y = A·X, all fp64.

    A non-orthonormal X (a Gaussian Ω, or blocks rounded by ``fast``) is orthonormalised first:
    X = Q·R and A·Q = Y·R⁻¹ — the same approximation (same span) with the well-conditioned core
    of Tropp et al. (2017), who orthonormalise their test matrix. Returns
    :func:`nystrom_eigh`'s (lam, vecs, core) with ``core["r"]`` (None when X was orthonormal).
    ``qty`` = XᵀY and ``y_norm`` = ‖Y‖₂ may be given for an orthonormal X, and ``overwrite_y``
    lets the core take y's memory (a temporary of the caller's).
    """
    r, own = None, overwrite_y
    if not orthonormal:
        x, r = torch.linalg.qr(x)
        y, own, qty, y_norm = torch.linalg.solve_triangular(r, y, upper=True, left=False), True, None, None
    lam, vecs, core = nystrom_eigh(x, y, precision=precision, n_vectors=n_vectors, overwrite_y=own, qty=qty,
                                   y_norm=y_norm)
    core["r"] = r
    return lam, vecs, core


def _package(src: _Source, lam: torch.Tensor, vecs: Optional[torch.Tensor], core: dict, z: Optional[torch.Tensor],
             info: dict, *, return_vectors: bool) -> SVDResult:
    """Singular values/vectors in the caller's types, signs fixed, U rebuilt from Z = T·Q when kept."""
    k = lam.shape[0]
    s = lam.clamp_min(0).sqrt()
    u = vt = None
    if return_vectors and vecs is not None:
        vt = vecs[:, :k].T.contiguous()
        if z is not None:
            # Left vectors with no extra pass: T·Q = Z = Q_Z·Lᵀ (B = QᵀAQ = ZᵀZ = LLᵀ), so
            # P_Z·T = Q_Z·Fᵀ; with F = V_F·Σ·Wᵀ, U = Q_Z·W = Z·L⁻ᵀ·W (see nystrom_eigh).
            # T·Q = T·X·R⁻¹ when X was orthonormalised in nystrom(). The small factor
            # M = R⁻¹·L⁻ᵀ·W_k (L × k, fp64) is formed first, then one GEMM in Z's dtype: U = Z·M.
            # (Rayleigh–Ritz has no L: Z·W_k, normalised, is U.)
            m = core["w"][:, :k]
            if core.get("l_chol") is not None:
                m = torch.linalg.solve_triangular(core["l_chol"].T, m, upper=True)
            if core.get("r") is not None:
                m = torch.linalg.solve_triangular(core["r"], m, upper=True)
            zs, off, u = (z if isinstance(z, list) else [z]), 0, None
            for zj in zs:  # U = Σ_j Z_j·M_j over the blocks' rows of M: no concatenated copy of Z,
                mj = m[off:off + zj.shape[1]].to(zj.dtype)  # summed in Z's dtype (its own precision)
                u = zj @ mj if u is None else u.addmm_(zj, mj)
                off += zj.shape[1]
            u = u.to(torch.float64)
            u /= torch.linalg.vector_norm(u, dim=0).clamp_min(torch.finfo(torch.float64).tiny)
        vt, u = sign_flip(vt, u)
    return _convert(src, u, s, vt, info)


def _convert(src: _Source, u, s, vt, info) -> SVDResult:
    if src.numpy:
        tonp = lambda t: t.cpu().numpy() if isinstance(t, torch.Tensor) else t  # noqa: E731
        return SVDResult(tonp(u), tonp(s), tonp(vt), {key: tonp(val) for key, val in info.items()})
    info = {key: (val.cpu().numpy() if isinstance(val, torch.Tensor) else val) for key, val in info.items()}
    return SVDResult(u, s, vt, info)


def _exact_info(s: torch.Tensor, energy: float, src: _Source, seed: int, passes: int) -> dict:
    return {"passes": passes, "method": "exact", "l": int(s.shape[0]), "oversample": 0, "precision": "fp64",
            "seed": seed, "n_rows": src.n_rows, "n_cols": src.n_cols, "exact": True, "energy": energy,
            "unexplained_energy": max(energy - float((s.double() ** 2).sum()), 0.0), "trusted_d": int(s.shape[0])}


def _exact_in_memory(src: _Source, k: int, *, return_vectors: bool, seed: int) -> SVDResult:
    """The exact fp64 SVD of an in-memory matrix (k ≥ min(N, V'))."""
    a = src.matrix.to(device=src.device, dtype=torch.float64)
    if not bool(torch.isfinite(a).all()):
        _check_finite(a, a, 0, 0)
    energy = float(torch.linalg.vector_norm(a) ** 2)
    if return_vectors:
        u, s, vt = torch.linalg.svd(a, full_matrices=False)
        vt, u = sign_flip(vt[:k], u[:, :k])
        s = s[:k]
    else:
        s, u, vt = torch.linalg.svdvals(a)[:k], None, None
    return _convert(src, u, s, vt, _exact_info(s, energy, src, seed, 0))


def _exact_from_gram(src: _Source, gram: torch.Tensor, k: int, energy: float, *, return_vectors: bool,
                     seed: int) -> SVDResult:
    """The exact spectrum of a stream from its fp64 Gram TᵀT (k ≥ V')."""
    lam, vecs = sym_eigh(gram)
    lam, vecs = lam[:k].clamp_min(0), vecs[:, :k]
    s = lam.sqrt()
    vt = sign_flip(vecs.T.contiguous())[0] if return_vectors else None
    return _convert(src, None, s, vt, _exact_info(s, energy, src, seed, 1))
