"""`Sketch`: the single-pass streaming Nyström sketch of TᵀT — the `sketch` route.

For targets whose V'×V' Gram does not fit (the ``prob`` space of a 50k–256k vocabulary,
ensembles, n-gram targets), one pass over the rows accumulates Y = TᵀT·Ω (V' × l, fp64 carry)
for a Gaussian test matrix Ω of l = 2k columns, plus Y_Θ = TᵀT·Θ for s error probes:

    chunk T_c (n_c × V')  →  Z = T_c·[Ω Θ]  (n_c × (l+s))  →  Y += T_cᵀ·Z

Memory O(V'·(l+s)) whatever N; cost 4·n_c·V'·(l+s) flops per chunk. The state is a sum over
rows, so shards merge by addition. ``finalize`` runs the shifted Nyström core of Tropp,
Yurtsever, Udell & Cevher (2017, Alg. 3) and the a-posteriori error estimate of
:func:`rankest.linalg.nystrom_error` (shared with :func:`rankest.linalg.streaming_nystrom`:
one formula).

The result is one-sided: σ̂_i ≤ σ_i and the W-error tail E − Σ_{i≤d}σ̂_i² ≥ the true tail, up
to the round-off of the products. ``meta["trusted_d"]`` is the largest d whose W-error is
estimated to be within 1e-2 of the truth (first-order estimate from 16 probes, see
:func:`rankest.linalg.nystrom_error`); ``meta["sketch_error"]["trusted_d_certified"]`` is the
same from a bound that holds with 99% probability (more conservative). Reports grey the curve
out beyond ``trusted_d``.

Test matrix: Ω and Θ are never stored in the state. Entry (i, j) is a counter-based hash of
(seed, stream, i, j) turned into a normal (:func:`rankest.linalg.gaussian_test_matrix`),
computed on the sketch's device, so a resumed or merged sketch — on any device — regenerates
the same Ω. By default the regenerated [Ω Θ] is cached on the
device for the life of the object (V'·(l+s) values in the product dtype: half the state's size
for fp32 products); ``cache_test_matrix=False`` regenerates it for every chunk instead (no
extra memory, ~V'·(l+s) Gaussian draws per chunk).
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from rankest.accumulate.base import Accumulator, Chunk, InputPrecision
from rankest.errors import UserError
from rankest.linalg import (
    DEFAULT_PROBES,
    PRECISIONS,
    SPECTRUM_PRECISION,
    STREAM_OMEGA,
    InputError,
    _check_finite,
    _check_int,
    gaussian_test_matrix,
    gram_apply,
    nystrom_finalize,
    probe_matrix,
    product_dtype,
    round_test,
    row_energy,
)
from rankest.spectrum import Spectrum

#: Version of the state layout written by :meth:`Sketch.state` (2: the counter-hash test matrix;
#: a version-1 state was built with another Ω and cannot be continued).
STATE_VERSION = 2

#: Convergence snapshots finalise the sketch at N/8, N/4 and N/2; they are taken while one
#: finalize (a V'×l GEMM and SVD: ~V'·l² flops) costs no more than the Gram route's eigvalsh of
#: a 4096² matrix. Above it they are skipped, and results say so.
SNAPSHOT_MAX_FLOPS = 4096 ** 3


class Sketch(Accumulator):
    """Single-pass streaming Nyström sketch of TᵀT (fp64 carry, O(V'·l) memory).

    Parameters
    ----------
    n_cols : int
        V', the number of columns of T.
    k : int
        Singular values reported (``--rank-max``), 1 ≤ k < V'. (k ≥ V': use the exact ``gram``
        route, whose memory V'² is then no more than this sketch's.)
    space : str
        Target space of the rows (recorded in the Spectrum).
    l : int, optional
        Test-matrix columns, k ≤ l ≤ V'. Default 2k (capped at V'): the Nyström error bound's
        factor 1 + k/(l − k − 1) is then ≈ 2 (Tropp et al. 2017, §5.4).
    seed : int
        Seed of the counter-based test matrices.
    precision : {"fp64", "fp32", "fast"}
        Products per chunk: fp64; fp32; or bf16 inputs with fp32 accumulation and output
        (:func:`rankest.linalg.gram_apply`). Always carried in fp64.
    device : torch device of the state and the products.
    n_probes : int
        Gaussian probe columns for the a-posteriori error estimate (0: unexplained energy only).
    cache_test_matrix : bool
        Keep the regenerated [Ω Θ] on the device (default) or regenerate it for every chunk.
    """

    name = "sketch"
    fixed_state_keys = ("seed", "shape", "precision", "version", "row_precision")

    def __init__(self, n_cols: int, k: int, *, space: str, l: Optional[int] = None, seed: int = 0,
                 precision: str = "fp64", device="cpu", n_probes: int = DEFAULT_PROBES,
                 cache_test_matrix: bool = True) -> None:
        super().__init__()
        n_cols = _check_int("n_cols", n_cols, minimum=1)
        k = _check_int("k", k, minimum=1, hint=" (the number of singular values: choose 1 <= k < V')")
        if k >= n_cols:
            raise InputError(f"k = {k} >= V' = {n_cols}: the sketch cannot beat the exact gram route here; "
                             "use --route gram (or auto), or a --rank-max below V'")
        # l = 2k by default (Tropp et al. 2017, §5.4), never more than V' (Ω would be square).
        l = min(2 * k, n_cols) if l is None else _check_int("l", l, minimum=k)
        if l > n_cols:
            raise InputError(f"l = {l} test columns exceed V' = {n_cols}; choose l <= V'")
        if precision not in PRECISIONS:
            raise InputError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.n_cols, self.k, self.l, self.space = n_cols, k, l, space
        self.seed = _check_int("seed", seed, minimum=-(1 << 63))
        self.precision = precision
        self.n_probes = _check_int("n_probes", n_probes, minimum=0)
        self.device = torch.device(device)
        self.cache_test_matrix = bool(cache_test_matrix)
        self.y = torch.zeros(n_cols, l + self.n_probes, dtype=torch.float64, device=self.device)
        self.row_energy = torch.zeros((), dtype=torch.float64, device=self.device)
        self.n_chunks = 0
        self._x: Optional[torch.Tensor] = None
        # finalize costs ~V'·l² (a GEMM) + l³: affordable at every convergence milestone while it
        # stays below the Gram route's eigvalsh of a 4096² matrix.
        self.cheap_finalize = n_cols * l * l <= SNAPSHOT_MAX_FLOPS
        self.inputs = InputPrecision()

    def finalize_cost(self) -> str:
        """What one finalize costs, in words (why convergence snapshots were skipped)."""
        return (f"a Nyström finalize of V'·l² = {self.n_cols:,}·{self.l:,}² ≈ {self.n_cols * self.l ** 2:.1e} flops "
                f"(snapshots are taken up to {SNAPSHOT_MAX_FLOPS:.1e}: a smaller --rank-max brings them back)")

    # ---- memory --------------------------------------------------------------------------------
    @staticmethod
    def memory(n_cols: int, k: int, *, precision: str, device="cpu", n_probes: int = DEFAULT_PROBES,
               l: Optional[int] = None, chunk_rows: int = 0) -> dict[str, int]:
        """Bytes of each component of a sketch of ``n_cols`` columns and ``k`` values (``--max-memory``'s
        accounting; ``l`` = 2k capped at V' by default), with m = l + s columns:

        * ``state`` — Y = TᵀT·[Ω Θ], V'·m fp64 (checkpoints hold it too);
        * ``test_block`` — the cached [Ω Θ], V'·m in the product dtype (dropped before finalize
          when finalize is not run at the convergence milestones);
        * ``chunk`` — a chunk of ``chunk_rows`` rows in the product dtype, T·X, and the V'×256 block of
          Tᵀ·(T·X) added to Y (fp32 products; fp64 products add straight into Y);
        * ``finalize`` — Ω and its orthonormal Q (while the QR runs), Y·R⁻¹, shifted and solved in
          place into F = Y_ν·L⁻ᵀ: three V'·l fp64 arrays at most, and the k eigenvectors for the
          error estimate (V'·k fp64); l×l cores are negligible.

        The peak is state + max(test_block + chunk, finalize).
        """
        l = min(2 * k, n_cols) if l is None else l
        m = l + n_probes
        item = torch.finfo(product_dtype(precision, device)).bits // 8
        block = 0 if item == 8 else n_cols * min(256, m) * item
        return {"state": n_cols * m * 8, "test_block": n_cols * m * item,
                "chunk": chunk_rows * (n_cols + m) * item + block,
                "finalize": 3 * n_cols * l * 8 + n_cols * min(k, l) * 8}

    @staticmethod
    def peak_bytes(parts: dict[str, int]) -> int:
        """The peak of :meth:`memory`'s components: state + max(test block + chunk, finalize)."""
        return parts["state"] + max(parts["test_block"] + parts["chunk"], parts["finalize"])

    # ---- test matrix ---------------------------------------------------------------------------
    def test_block(self) -> torch.Tensor:
        """[Ω Θ] (V' × (l+s)) as the products see it (product dtype, rounded for ``fast``)."""
        if self._x is not None:
            return self._x
        omega = gaussian_test_matrix(self.n_cols, self.l, seed=self.seed, stream=STREAM_OMEGA, device=self.device)
        omega = round_test(omega, self.precision)
        blocks = [omega]
        if self.n_probes:
            blocks.append(probe_matrix(self.n_cols, self.n_probes, seed=self.seed, precision=self.precision,
                                       device=self.device))
        x = torch.cat(blocks, dim=1).to(device=self.device, dtype=product_dtype(self.precision, self.device))
        if self.cache_test_matrix:
            self._x = x
        return x

    # ---- accumulator interface -----------------------------------------------------------------
    def update(self, chunk: Chunk) -> None:
        rows = chunk.rows
        if rows is None:
            raise ValueError("the sketch route needs target rows in every chunk")
        if rows.dim() != 2 or rows.shape[1] != self.n_cols:
            raise ValueError(f"chunk rows must have shape (n, {self.n_cols}), got {tuple(rows.shape)}")
        if rows.shape[0]:
            self.inputs.saw(rows)
            rows = rows.to(self.device)
            z = gram_apply(rows, self.test_block(), precision=self.precision, out=self.y)
            _check_finite(z, rows, self.n_chunks, self.n_rows)
            self.row_energy += row_energy(rows)
        self.n_rows += chunk.n
        self.n_chunks += 1

    def _identity(self) -> dict:
        return {"seed": self.seed, "n_cols": self.n_cols, "l": self.l, "n_probes": self.n_probes,
                "precision": self.precision}

    def _check_same(self, other: dict, what: str) -> None:
        mine = self._identity()
        diff = [key for key in mine if mine[key] != other[key]]
        if diff:
            desc = lambda d: ", ".join(f"{key}={d[key]}" for key in diff)  # noqa: E731
            raise UserError(f"{what} is a sketch with {desc(other)}, this run has {desc(mine)}; a sketch can only "
                            "continue with the same seed, V', test columns (l = 2·--rank-max) and precision: "
                            "rerun with the original --seed/--rank-max, or start afresh (--overwrite)")

    def merge(self, other: "Sketch") -> None:
        self._check_merge(other)
        self._check_same(other._identity(), "the other shard")
        self.y += other.y.to(self.device)
        self.inputs.join(other.inputs.name)
        self.row_energy += other.row_energy.to(self.device)
        self.n_rows += other.n_rows
        self.n_chunks += other.n_chunks

    def state(self) -> dict[str, np.ndarray]:
        return {
            "y": self.y.cpu().numpy(),
            "row_energy": np.asarray(float(self.row_energy)),
            "n_rows": np.asarray(self.n_rows, dtype=np.int64),
            "n_chunks": np.asarray(self.n_chunks, dtype=np.int64),
            "seed": np.asarray(self.seed, dtype=np.int64),
            # V', l, s: the shape of Y and of the test matrix it was built with.
            "shape": np.asarray([self.n_cols, self.l, self.n_probes], dtype=np.int64),
            "precision": np.asarray(PRECISIONS.index(self.precision), dtype=np.int64),
            "version": np.asarray(STATE_VERSION, dtype=np.int64),
            "row_precision": self.inputs.code,
        }

    def load_state(self, state) -> None:
        missing = {"y", "seed", "shape", "precision", "n_rows"} - set(state)
        if missing:
            raise UserError(f"the checkpoint is not a sketch state (missing {sorted(missing)}); start afresh "
                            "(--overwrite)")
        shape = [int(v) for v in np.asarray(state["shape"]).ravel()]
        prec = int(np.asarray(state["precision"]))
        theirs = {"seed": int(np.asarray(state["seed"])), "n_cols": shape[0], "l": shape[1], "n_probes": shape[2],
                  "precision": PRECISIONS[prec] if 0 <= prec < len(PRECISIONS) else f"code {prec}"}
        self._check_same(theirs, "the checkpoint")
        version = int(np.asarray(state.get("version", 1)))
        if version != STATE_VERSION:
            raise UserError(f"the checkpoint's sketch has state version {version}, this rankest writes "
                            f"{STATE_VERSION} (another test matrix); start afresh (--overwrite)")
        y = np.asarray(state["y"])
        if y.shape != tuple(self.y.shape):
            raise UserError(f"the checkpoint's sketch has shape {y.shape}, expected {tuple(self.y.shape)}; "
                            "start afresh (--overwrite)")
        self.y.copy_(torch.as_tensor(y))
        self.row_energy.fill_(float(np.asarray(state.get("row_energy", 0.0))))
        self.n_rows = int(np.asarray(state["n_rows"]))
        self.n_chunks = int(np.asarray(state.get("n_chunks", 0)))
        if "row_precision" in state:
            self.inputs.load(state["row_precision"])

    def finalize(self, energy: float = float("nan")) -> Spectrum:
        """Shifted Nyström of the sketch → Spectrum(route="sketch", exact=False) with error estimates.

        ``energy`` is E = ‖T‖_F² streamed by RowStats (fp64); when NaN, the sketch's own sum of
        the squared rows it saw is used. Tails are E − Σ_{i≤d}σ̂_i², subtracted in fp64.
        The state is not changed.
        """
        e = float(energy)
        e_source = "streamed"
        if not (math.isfinite(e) and e > 0):
            e, e_source = float(self.row_energy), "sketch_rows"
        if self.n_rows == 0:
            raise ValueError("the sketch has seen no rows; update it with at least one chunk before finalize")
        if not self.cheap_finalize:
            # Finalized once, at the end: the cached [Ω Θ] (V'·(l+s) values) goes before its workspace.
            self._x = None
        y = self.y[:, : self.l]
        probe_y = self.y[:, self.l:] if self.n_probes else None
        lam, _, err, core = nystrom_finalize(y, probe_y, n_cols=self.n_cols, k=self.k, seed=self.seed, energy=e,
                                             precision=self.precision)
        sigma = lam[: self.k].clamp_min(0).sqrt().cpu().numpy()
        trusted = int(err.pop("trusted_d"))
        sketch_error = {key: (v.tolist() if isinstance(v, np.ndarray) else v) for key, v in err.items()}
        sketch_error.update(energy_source=e_source, row_energy=float(self.row_energy), shift=core["shift"])
        meta = _sketch_meta(sketch_error, trusted, passes=1, method="nystrom", l=self.l, k=self.k, seed=self.seed,
                            precision=self.precision, n_probes=self.n_probes)
        # The products' round-off moves up to `roundoff_energy` (l·ν) of captured energy: a value
        # whose square is below it is not resolved.
        floor = math.sqrt(max(float(sketch_error.get("roundoff_energy", 0.0)), 0.0))
        return Spectrum(sigma=sigma, energy=e, n_rows=self.n_rows, n_cols=self.n_cols, space=self.space,
                        route="sketch", exact=False, precision=SPECTRUM_PRECISION[self.precision], meta=meta,
                        row_precision=self.inputs.name, noise_floor=floor)


def _sketch_meta(sketch_error: dict, trusted: int, *, passes: int, method: str, l: int, k: int, seed: int,
                 precision: str, n_probes: int) -> dict:
    """The ``meta`` every sketch-route Spectrum carries (``sketch_error``, ``trusted_d``; docs/design.md, "Result names")."""
    return {
        "sketch_error": sketch_error,
        "trusted_d": trusted,
        "passes": passes,
        "method": method,
        "l": l,
        "oversample": l - k,
        "seed": seed,
        "sketch_precision": precision,
        "n_probes": n_probes,
        "test_matrix": "gaussian, counter-based: SplitMix64 output i·2^32 + j of the stream (seed, stream) "
                       "+ Box-Muller, generated on the sketch's device",
    }


def sketch_line(meta: dict) -> str:
    """One line on how a sketch was computed: passes, method, and the error estimate of σ_1…σ_k."""
    err = meta.get("sketch_error", {})
    auto = " (auto)" if meta.get("passes_auto") else ""
    line = f"{meta.get('passes')} pass(es){auto}, {meta.get('method')}, l = {meta.get('l')}"
    if err.get("sigma_rel_error") is not None:
        line += f", estimated max relative error of sigma_1..sigma_k = {err['sigma_rel_error']:.1e} (tol {err['tol']:g})"
    return line + f", trusted_d = {meta.get('trusted_d')}"


def spectrum_from_svd(result, *, space: str, energy: float = float("nan")) -> Spectrum:
    """A `sketch`-route Spectrum from :func:`rankest.linalg.randomized_svd` — the multi-pass route
    (``--passes`` ≥ 2 over rows that can be produced again) — with the same ``meta`` as
    :meth:`Sketch.finalize`.

    ``energy``: the streamed E from RowStats; NaN uses the E that randomized_svd summed over the
    rows of its first pass (its error estimates always use the latter). An exact fallback
    (k ≥ V') comes back as an exact ``gram``-route Spectrum.
    """
    info = dict(result.info)
    s = result.S.cpu().numpy() if isinstance(result.S, torch.Tensor) else np.asarray(result.S)
    e = float(energy)
    if not (math.isfinite(e) and e > 0):
        e = float(info["energy"])
    if info.get("exact"):
        return Spectrum(sigma=s, energy=e, n_rows=int(info["n_rows"]), n_cols=int(info["n_cols"]), space=space,
                        route="gram", exact=True, precision="fp64", meta={"route_reason": "k >= V': exact Gram"})
    keys = ("energy", "unexplained_energy", "unexplained_fraction", "residual_fro", "residual_bound",
            "roundoff_energy", "n_probes", "confidence", "sigma_upper", "sigma_k_rel_error", "w_error_lower",
            "w_error_width_max", "trusted_d_certified", "trust_tol", "shift", "sigma_rel_error", "below_roundoff",
            "tol", "sigma_rel_error_first_order", "contraction")
    err = {key: (np.asarray(info[key]).tolist() if isinstance(info[key], (np.ndarray, torch.Tensor)) else info[key])
           for key in keys if key in info}
    err["energy_source"] = "randomized_svd_rows"
    meta = _sketch_meta(err, int(info["trusted_d"]), passes=int(info["passes"]), method=str(info["method"]),
                        l=int(info["l"]), k=len(s), seed=int(info["seed"]), precision=str(info["precision"]),
                        n_probes=int(info.get("n_probes", 0)))
    meta["passes_auto"] = bool(info.get("passes_auto", False))
    return Spectrum(sigma=s, energy=e, n_rows=int(info["n_rows"]), n_cols=int(info["n_cols"]), space=space,
                    route="sketch", exact=False, precision=SPECTRUM_PRECISION[str(info["precision"])], meta=meta)
