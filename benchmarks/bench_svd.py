"""Randomized SVD on CPU: rankest.linalg against sklearn, torch.svd_lowrank, fbpca and scipy svds.

    python benchmarks/bench_svd.py                 # full run (≈ 15 min on 2 cores), writes the report
    python benchmarks/bench_svd.py --quick         # small smoke run (≈ 1 min), same report layout

Writes ``benchmarks/reports/svd_cpu.md`` (+ ``svd_cpu_*.png``, ``svd_cpu.json``).

Test matrices have an exactly known spectrum σ_i = 1/i (the slow decay of target matrices):
T = D·C_N·P·[diag(σ)·C_V·S; 0] with C the orthonormal DCT-II, P a random row placement and D, S
random signs — exactly orthogonal factors, applied in O(N·V'·log N), stored in fp32 (the fp32
rounding moves σ by ≤ ‖T₃₂ − T₆₄‖_F, reported). The methods depend on the left singular vectors
only through round-off, and on the right ones not at all (Gaussian test matrices).

Matched accuracy: for each method, the fewest iterations (passes, n_iter, niter, ARPACK tol)
whose worst relative error over σ_1…σ_k is ≤ ``--target`` (default 1e-3), found by a sweep at
N = 2·10⁴ (accuracy depends on the spectrum and l, not on N), then timed at every N and the
error re-measured. Every randomized method uses l = 2k test vectors and returns its vectors.

The streamed run feeds rows generated on the fly from a seeded low-rank + decay model
(t_i = g_iᵀ·diag(s)·Wᵀ, g_i ~ N(0, I_r), W orthonormal V'×r, V' = 8192) through the
single-pass `Sketch`; N is chosen so that the dense fp32 N×V' matrix would exceed the machine's
memory. Its exact spectrum follows from the r×r Gram of the same g_i (accumulated in fp64):
TᵀT = W·S·GᵀG·S·Wᵀ, the very matrix the `gram` route would accumulate (checked on a chunk).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import scipy
import scipy.fft
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rankest.accumulate.base import Chunk  # noqa: E402
from rankest.linalg import randomized_svd  # noqa: E402
from rankest.accumulate.sketch import Sketch  # noqa: E402

REPORTS = Path(__file__).resolve().parent / "reports"


# ---------------------------------------------------------------------------------------------
# memory and environment
# ---------------------------------------------------------------------------------------------
def _status(field: str) -> int:
    """A /proc/self/status field in bytes (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak() -> int:
    """Reset the peak RSS (VmHWM) to the current RSS (Linux ≥ 4.0) and return the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return _status("VmRSS")


def environment() -> dict:
    import sklearn

    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    flags = open("/proc/cpuinfo").read()
    try:
        import fbpca  # noqa: F401
        fbpca_v = "1.0 (pip fbpca)"
    except ImportError:
        fbpca_v = None
    try:
        from threadpoolctl import threadpool_info
        blas = sorted({f"{i['internal_api']} {i.get('version')}" for i in threadpool_info()})
    except ImportError:
        blas = []
    mem = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal"):
                mem = int(line.split()[1]) * 1024
    return {
        "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "bf16_matmul": "amx_bf16" in flags or "avx512_bf16" in flags, "mem_total": mem,
        "python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
        "scipy": scipy.__version__, "sklearn": sklearn.__version__, "fbpca": fbpca_v, "blas": blas,
        "load_avg_start": os.getloadavg(),
    }


# ---------------------------------------------------------------------------------------------
# matrices of known spectrum
# ---------------------------------------------------------------------------------------------
def make_matrix(n: int, v: int, *, seed: int = 0, block: int = 512):
    """fp32 N×V' matrix with singular values exactly 1/i (in exact arithmetic), and σ (fp64)."""
    rng = np.random.default_rng(seed)
    sigma = 1.0 / np.arange(1, v + 1, dtype=np.float64)
    # M0 = diag(σ)·C_V·S: rows of an orthonormal DCT of random signs, scaled.
    m0 = scipy.fft.dct(np.diag(rng.choice([-1.0, 1.0], v)), axis=0, norm="ortho") * sigma[:, None]
    pos = rng.choice(n, v, replace=False)
    signs = rng.choice([-1.0, 1.0], n)[:, None]
    a = np.empty((n, v), dtype=np.float32)
    err2 = 0.0
    for c in range(0, v, block):
        blk = np.zeros((n, min(block, v - c)))
        blk[pos] = m0[:, c:c + block]
        blk = scipy.fft.dct(blk * signs, axis=0, norm="ortho")
        a[:, c:c + block] = blk
        err2 += float(np.sum((a[:, c:c + block] - blk) ** 2))
    return a, sigma, math.sqrt(err2)


# ---------------------------------------------------------------------------------------------
# methods: each (a_np, a_torch, k, it) -> descending σ (fp64); `it` is its iteration knob
# ---------------------------------------------------------------------------------------------
def _rankest(method: str, precision: str):
    def run(a, at, k, it):
        return randomized_svd(at, k, passes=it + 1, method=method, precision=precision, seed=0).S.numpy()
    return run


def _sklearn(a, at, k, it):
    from sklearn.utils.extmath import randomized_svd as sk
    return sk(a, k, n_oversamples=k, n_iter=it, random_state=0)[1].astype(np.float64)


def _torch(a, at, k, it):
    torch.manual_seed(0)
    return torch.svd_lowrank(at, q=2 * k, niter=it)[1].double().numpy()


def _fbpca(a, at, k, it):
    import fbpca
    return fbpca.pca(a, k, raw=True, n_iter=it, l=2 * k)[1].astype(np.float64)


SVDS_TOLS = [1e-2, 1e-4, 0.0]


def _svds(a, at, k, it):
    from scipy.sparse.linalg import svds
    s = svds(a, k, tol=SVDS_TOLS[it], random_state=0)[1]
    return np.sort(s.astype(np.float64))[::-1]


METHODS = {
    # name: (function, knob label, knob → passes over the matrix, label for plots)
    "rankest subspace fp32": (_rankest("subspace", "fp32"), "passes", lambda it: it + 1),
    "rankest krylov fp32": (_rankest("krylov", "fp32"), "passes", lambda it: it + 1),
    "rankest krylov-rr fp32": (_rankest("krylov-rr", "fp32"), "passes", lambda it: it + 1),
    "rankest krylov fast": (_rankest("krylov", "fast"), "passes", lambda it: it + 1),
    "rankest krylov fp64": (_rankest("krylov", "fp64"), "passes", lambda it: it + 1),
    "sklearn randomized_svd": (_sklearn, "n_iter", lambda it: it + 1),
    "torch.svd_lowrank": (_torch, "niter", lambda it: it + 1),
    "fbpca.pca": (_fbpca, "n_iter", lambda it: it + 1),
    "scipy svds (ARPACK)": (_svds, "tol", None),
}


def knob_value(name: str, it: int):
    if name.startswith("rankest"):
        return it + 1
    if name.startswith("scipy"):
        return SVDS_TOLS[it]
    return it


def measure(name: str, a, at, k: int, it: int, sigma: np.ndarray) -> dict:
    fn = METHODS[name][0]
    base = reset_peak()
    t0 = time.perf_counter()
    s = fn(a, at, k, it)
    dt = time.perf_counter() - t0
    peak = _status("VmHWM") - base
    s = np.asarray(s)[:k]
    rel = np.abs(s - sigma[:k]) / sigma[:k]
    e = float(np.sum(sigma[::-1] ** 2))
    w_true = np.sqrt(np.maximum(e - np.cumsum(sigma[:k] ** 2), 0.0) / e)
    w_hat = np.sqrt(np.maximum(e - np.cumsum(s ** 2), 0.0) / e)
    return {"method": name, "it": it, "knob": knob_value(name, it), "time_s": dt, "peak_extra_bytes": int(peak),
            "max_rel_err": float(rel.max()), "max_rel_err_half": float(rel[: k // 2].max()),
            "w_error_err": float(np.abs(w_hat - w_true).max())}


def timed_round(names_its: dict, a, at, k: int, sigma: np.ndarray, *, repeats: int, log) -> dict:
    """Time every (method → iterations) ``repeats`` times, round-robin (so a burst of load on this
    shared machine hits every method alike), and keep each method's fastest run; a method whose
    run takes longer than 15 s stops after two. Returns method → measure() row of its best run."""
    best: dict = {}
    for rep in range(repeats):
        for name, it in names_its.items():
            if rep >= 2 and best[name]["time_s"] > 15.0:
                continue
            r = measure(name, a, at, k, it, sigma)
            r["runs"] = best.get(name, {}).get("runs", 0) + 1
            if name not in best or r["time_s"] < best[name]["time_s"]:
                best[name] = r
            else:
                best[name]["runs"] = r["runs"]
            log(f"    {name:24s} {METHODS[name][1]}={r['knob']!s:6s} {r['time_s']:7.2f}s "
                f"err {r['max_rel_err']:.2e}  (run {rep + 1})")
    return best


def warmup(methods) -> None:
    """One small call of every method, so that no timing includes a first call's set-up."""
    a, sigma, _ = make_matrix(600, 200, seed=99)
    for name in methods:
        METHODS[name][0](a, torch.from_numpy(a), 10, 1)


def sweep(a, at, k, sigma, methods, target, max_it, full: bool, log, min_it: int = 0) -> dict:
    """Error and time against the iteration knob; stops a method at the target unless ``full``."""
    out = {}
    for name in methods:
        rows = []
        its = range(len(SVDS_TOLS)) if name.startswith("scipy") else range(min_it, max_it + 1)
        for it in its:
            r = measure(name, a, at, k, it, sigma)
            rows.append(r)
            log(f"    {name:24s} {METHODS[name][1]}={r['knob']!s:6s} {r['time_s']:7.2f}s err {r['max_rel_err']:.2e}")
            if r["max_rel_err"] <= target and not full:
                break
        out[name] = rows
    return out


def first_hit(rows: list[dict], target: float):
    for r in rows:
        if r["max_rel_err"] <= target:
            return r
    return None


# ---------------------------------------------------------------------------------------------
# the streamed run
# ---------------------------------------------------------------------------------------------
def streamed_run(*, v: int, r: int, k: int, n_rows: int, chunk: int, seed: int, precision: str, log) -> dict:
    g0 = torch.Generator().manual_seed(seed)
    w = torch.linalg.qr(torch.randn(v, r, generator=g0, dtype=torch.float64)).Q
    w32 = w.float()
    j = torch.arange(1, r + 1, dtype=torch.float64)
    s = torch.where(j <= 16, torch.ones_like(j), 0.5 / (j - 15))  # low rank (16 × 1.0) + 1/j decay
    s32 = s.float()
    n_chunks = (n_rows + chunk - 1) // chunk

    def g_chunk(c: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + c + 1)
        return torch.randn(min(chunk, n_rows - c * chunk), r, generator=gen)

    gtg = torch.zeros(r, r, dtype=torch.float64)
    energy = torch.zeros((), dtype=torch.float64)
    sk = Sketch(v, k, space="prob", precision=precision, seed=seed)
    base = reset_peak()
    t0 = time.perf_counter()
    t_gen = 0.0
    for c in range(n_chunks):
        tg = time.perf_counter()
        g = g_chunk(c)
        rows = (g * s32) @ w32.T  # (n_c, V') fp32, generated on the fly and dropped after use
        t_gen += time.perf_counter() - tg
        g64 = g.double()
        gtg += g64.T @ g64
        energy += torch.linalg.vector_norm(rows, dtype=torch.float64) ** 2
        sk.update(Chunk(stats=torch.zeros(rows.shape[0], 4), rows=rows))
        if c % 50 == 0:
            log(f"    chunk {c}/{n_chunks}  {time.perf_counter() - t0:6.1f}s  RSS {_status('VmRSS') / 2**30:.2f} GiB")
    t_stream = time.perf_counter() - t0
    tf = time.perf_counter()
    sp = sk.finalize(float(energy))
    t_final = time.perf_counter() - tf
    peak_abs, peak_extra = _status("VmHWM"), _status("VmHWM") - base
    # Exact spectrum: σ(T)² = eig(R_G·S·(W32ᵀW32)·S·R_G) with R_G = (GᵀG)^{1/2} (the factor route's identity).
    lam, vec = torch.linalg.eigh(gtg)
    r_g = (vec * lam.clamp_min(0).sqrt()) @ vec.T
    ww = w32.double().T @ w32.double()
    core = r_g @ (s[:, None] * ww * s[None, :]) @ r_g
    exact = torch.linalg.eigvalsh(0.5 * (core + core.T)).flip(0).clamp_min(0).sqrt().numpy()
    e = float(energy)
    model_e = float(np.sum(exact[::-1] ** 2))
    w_true = np.sqrt(np.maximum(e - np.cumsum(exact[:k] ** 2), 0.0) / e)
    w_hat = sp.w_error()
    rel = np.abs(sp.sigma - exact[:k]) / exact[:k]
    # The `gram` route on one chunk: its explicit fp64 Gram equals W·S·GᵀG·S·Wᵀ of that chunk.
    g = g_chunk(0)
    rows = ((g * s32) @ w32.T).double()
    gram = rows.T @ rows
    g64 = (g.double() * s) @ w32.double().T
    fact = g64.T @ g64
    gram_check = float(torch.linalg.matrix_norm(gram - fact) / torch.linalg.matrix_norm(gram))
    del gram, fact, rows
    return {
        "n_rows": n_rows, "n_cols": v, "latent_rank": r, "k": k, "l": sk.l, "n_probes": sk.n_probes,
        "chunk_rows": chunk, "precision": precision, "dense_fp32_bytes": n_rows * v * 4,
        "stream_time_s": t_stream, "row_generation_time_s": t_gen, "finalize_time_s": t_final,
        "peak_rss_bytes": peak_abs, "peak_rss_increase_bytes": peak_extra, "sketch_state_bytes": sk.nbytes(),
        "energy": e, "model_energy_rel_diff": abs(model_e - e) / e,
        "max_rel_err_sigma_k": float(rel.max()), "max_rel_err_sigma_half": float(rel[: k // 2].max()),
        "w_error_max_abs_err_half": float(np.abs(w_hat[: k // 2] - w_true[: k // 2]).max()),
        "w_error_max_abs_err_k": float(np.abs(w_hat - w_true).max()),
        "w_error_min_signed_err_k": float((w_hat - w_true).min()),
        "sigma_above_truth": int(np.sum(sp.sigma > exact[:k] * (1 + 1e-5))),
        "trusted_d": sp.meta["trusted_d"], "trusted_d_certified": sp.meta["sketch_error"]["trusted_d_certified"],
        "unexplained_fraction": sp.meta["sketch_error"]["unexplained_fraction"],
        "w_error_at": {str(d): [float(w_hat[d - 1]), float(w_true[d - 1])] for d in (1, 16, 32, k // 2, k)},
        "gram_route_check_rel": gram_check,
    }


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------
def fmt_bytes(b: float) -> str:
    return f"{b / 2**20:.0f} MiB" if b < 2**30 else f"{b / 2**30:.2f} GiB"


def plots(results: dict, out: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    # error vs passes (the sweep of the first configuration, every knob)
    cfg = results["configs"][0]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, rows in cfg["sweep"].items():
        if name.startswith("scipy"):
            best = min(r["max_rel_err"] for r in rows)
            ax.axhline(best, ls=":", color="grey", label=f"{name} (tol=0)")
            continue
        ax.semilogy([METHODS[name][2](r["it"]) for r in rows], [max(r["max_rel_err"], 1e-16) for r in rows], "o-",
                    label=name)
    ax.axhline(results["target"], color="k", lw=0.8)
    ax.set_xlabel("passes over T (rankest: passes; others: n_iter + 1)")
    ax.set_ylabel("max relative error of σ_1…σ_k")
    ax.set_title(f"N={cfg['n']}, V'={cfg['v']}, k={cfg['k']}, l=2k, σ_i = 1/i")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "svd_cpu_error_vs_passes.png", dpi=110)
    names.append("svd_cpu_error_vs_passes.png")
    plt.close(fig)
    # time vs N at matched accuracy, one panel per (V', k) series
    series = {}
    for c in results["configs"]:
        for name, r in c["matched"].items():
            if r is not None:
                series.setdefault((c["v"], c["k"]), {}).setdefault(name, []).append((c["n"], r["time_s"]))
    keys = [key for key in series if len({n for pts in series[key].values() for n, _ in pts}) > 1]
    if keys:
        fig, axes = plt.subplots(1, len(keys), figsize=(6.0 * len(keys), 4.2), squeeze=False)
        for ax, key in zip(axes[0], keys):
            for name, pts in sorted(series[key].items()):
                pts.sort()
                ax.loglog([p[0] for p in pts], [p[1] for p in pts], "o-", label=name)
            ax.set_xlabel("N (rows)")
            ax.set_ylabel(f"seconds at max rel. error ≤ {results['target']:g}")
            ax.set_title(f"V'={key[0]}, k={key[1]}")
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "svd_cpu_time_vs_n.png", dpi=110)
        names.append("svd_cpu_time_vs_n.png")
        plt.close(fig)
    return names


def write_report(results: dict, out: Path, command: str, pngs: list[str]) -> None:
    env = results["env"]
    tgt = results["target"]
    lines = [
        "# Randomized SVD on CPU: rankest vs sklearn, torch, fbpca, scipy",
        "",
        "```",
        command,
        "```",
        "",
        f"One run, {time.strftime('%Y-%m-%d %H:%M', time.localtime(results['start']))}, "
        f"{results['wall_s'] / 60:.1f} min. CPU: **{env['cpu']}**, {env['cores']} cores "
        f"(torch threads {env['torch_threads']}, bf16 matmul units: {'yes' if env['bf16_matmul'] else 'no'}), "
        f"{fmt_bytes(env['mem_total'])} RAM. Load average at start/end: "
        f"{', '.join(f'{x:.1f}' for x in env['load_avg_start'])} / "
        f"{', '.join(f'{x:.1f}' for x in results['load_avg_end'])} (the machine is shared: other jobs ran "
        "beside this one, so times carry that noise).",
        "",
        f"Versions: Python {env['python']}, torch {env['torch']}, numpy {env['numpy']}, scipy {env['scipy']}, "
        f"scikit-learn {env['sklearn']}, fbpca {env['fbpca'] or 'not installed'}; BLAS: {'; '.join(env['blas'])}.",
        "",
        "## Setup",
        "",
        "* Matrices: fp32, singular values exactly σ_i = 1/i (orthonormal DCT factors, see the script's "
        "docstring); every method reads the same array (numpy for sklearn / fbpca / scipy, a zero-copy torch "
        "view for torch and rankest) and returns its singular vectors.",
        f"* **Matched accuracy**: worst relative error over σ_1…σ_k ≤ {tgt:g}. For each method the fewest "
        "iterations reaching it were found by a sweep at N = 2·10⁴ (passes for rankest; `n_iter` for sklearn "
        "(its default normaliser) and fbpca; `niter` for torch; ARPACK `tol` for svds), then timed at each N "
        "and the error re-measured (column *err*). l = 2k test vectors for every randomized method.",
        f"* **Times**: each matched setting is run {results['repeats']} times, the methods taking turns (so that "
        "load from other jobs on this shared machine falls on all of them alike); the table gives each "
        "method's fastest run (runs longer than 15 s: two runs).",
        "* rankest variants: `subspace` / `krylov` / `krylov-rr` method; `fp32` products (the default for fp32 input), `fast` "
        "(bf16-input GEMMs with fp32 accumulation and output, fp64 carry), `fp64` products.",
        "* Peak memory: rise of the process's peak RSS (VmHWM, reset before each call) above the RSS with the "
        "matrix loaded.",
        "",
        "## Matched accuracy: time and peak memory",
        "",
        "| N | V' | k | method | setting | time (s) | peak extra memory | err (max rel σ_1…σ_k) | W-error err |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in results["configs"]:
        rows = [(name, r) for name, r in c["matched"].items() if r is not None]
        rows.sort(key=lambda x: x[1]["time_s"])
        for name, r in rows:
            lines.append(f"| {c['n']} | {c['v']} | {c['k']} | {name} | {METHODS[name][1]}={r['knob']} | "
                         f"{r['time_s']:.2f} | {fmt_bytes(r['peak_extra_bytes'])} | {r['max_rel_err']:.1e} | "
                         f"{r['w_error_err']:.1e} |")
        missing = [name for name, r in c["matched"].items() if r is None]
        if missing:
            lines.append(f"| {c['n']} | {c['v']} | {c['k']} | {', '.join(missing)} | did not reach {tgt:g} "
                         "within the sweep (or not run at this size) | | | | |")
    lines += ["", f"Speed-up of the fastest rankest setting over each other library at matched accuracy "
              f"({tgt:g}; the k = 100 sweeps also at {results['target2']:g}), fastest runs:", ""]
    for c in results["configs"]:
        if c.get("matched2"):
            ours2 = [(r["time_s"], name) for name, r in c["matched2"].items() if r is not None
                     and name.startswith("rankest")]
            if ours2:
                t2, n2 = min(ours2)
                parts = [f"{name}: {r['time_s'] / t2:.2f}×" if r is not None else f"{name}: not reached"
                         for name, r in c["matched2"].items() if not name.startswith("rankest")]
                lines.append(f"* at {results['target2']:g}, N={c['n']}, V'={c['v']}, k={c['k']} ({n2}, "
                             f"{t2:.2f} s): " + "; ".join(parts))
        ours = [(r["time_s"], name) for name, r in c["matched"].items() if r is not None and name.startswith("rankest")]
        if not ours:
            continue
        t_ours, n_ours = min(ours)
        parts = [f"{name}: {r['time_s'] / t_ours:.2f}×" for name, r in c["matched"].items()
                 if r is not None and not name.startswith("rankest")]
        lines.append(f"* N={c['n']}, V'={c['v']}, k={c['k']} ({n_ours}, {t_ours:.2f} s): " + "; ".join(parts))
    lines += ["", "## Error against passes", ""]
    if "svd_cpu_error_vs_passes.png" in pngs:
        lines.append("![error vs passes](svd_cpu_error_vs_passes.png)")
    c0 = results["configs"][0]
    lines += ["", f"N={c0['n']}, V'={c0['v']}, k={c0['k']}: worst relative error of σ_1…σ_k (time in s).", "",
              "| method | " + " | ".join(f"{i + 1}" for i in range(results["max_it"] + 1)) + " |",
              "|---|" + "---|" * (results["max_it"] + 1)]
    for name, rows in c0["sweep"].items():
        if name.startswith("scipy"):
            continue
        cells = [f"{r['max_rel_err']:.1e} ({r['time_s']:.2f})" for r in rows]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    sv = c0["sweep"].get("scipy svds (ARPACK)")
    if sv:
        lines += ["", "scipy svds (ARPACK) on the same matrix: " + "; ".join(
            f"tol={r['knob']:g}: {r['max_rel_err']:.1e} in {r['time_s']:.2f} s" for r in sv) + "."]
    lines += ["", "## Time against N", ""]
    if "svd_cpu_time_vs_n.png" in pngs:
        lines.append("![time vs N](svd_cpu_time_vs_n.png)")
    st = results.get("stream")
    if st:
        lines += [
            "", "## Streamed run: more rows than fit in memory", "",
            f"N = {st['n_rows']:,} rows × V' = {st['n_cols']} (a dense fp32 matrix would take "
            f"{fmt_bytes(st['dense_fp32_bytes'])}, the machine has {fmt_bytes(env['mem_total'])}), generated on the "
            f"fly in chunks of {st['chunk_rows']} rows from t_i = g_iᵀ·diag(s)·Wᵀ "
            f"(latent rank {st['latent_rank']}, "
            "s = 1 for j ≤ 16 then 0.5/(j − 15)), single pass through `rankest.accumulate.sketch.Sketch` "
            f"(k = {st['k']}, l = {st['l']}, {st['n_probes']} probes, products `{st['precision']}`).",
            "",
            f"* time: {st['stream_time_s']:.0f} s for the pass ({st['row_generation_time_s']:.0f} s of it generating "
            f"rows), {st['finalize_time_s']:.2f} s to finalize;",
            f"* memory: peak RSS {fmt_bytes(st['peak_rss_bytes'])} for the whole process, a rise of "
            f"{fmt_bytes(st['peak_rss_increase_bytes'])} during the pass (the sketch's state: "
            f"{fmt_bytes(st['sketch_state_bytes'])}; the rest is one chunk of rows and its products): O(V'·l), "
            "independent of N;",
            f"* against the exact spectrum of the same stream: worst relative error of σ_1…σ_{st['k'] // 2} "
            f"{st['max_rel_err_sigma_half']:.1e} (of σ_1…σ_{st['k']}: {st['max_rel_err_sigma_k']:.1e}); W-error "
            f"curve within {st['w_error_max_abs_err_half']:.1e} of the truth up to d = {st['k'] // 2} "
            f"({st['w_error_max_abs_err_k']:.1e} up to d = {st['k']}), never below it by more than "
            f"{max(0.0, -st['w_error_min_signed_err_k']):.1e}; values above the truth: {st['sigma_above_truth']};",
            f"* the sketch's own estimate: trusted_d = {st['trusted_d']} (certified at 99%: "
            f"{st['trusted_d_certified']}), unexplained energy {st['unexplained_fraction']:.3e} of E;",
            "* W-error (sketch, exact) at d = " + ", ".join(
                f"{d}: ({a:.4f}, {b:.4f})" for d, (a, b) in st["w_error_at"].items()) + ";",
            "* exact reference: TᵀT = W·S·GᵀG·S·Wᵀ from the r×r Gram of the same g_i (fp64); the `gram` route's "
            f"explicit fp64 Gram of the first chunk matches it to {st['gram_route_check_rel']:.1e} (relative, "
            f"Frobenius; the rows are fp32). ‖T‖_F² streamed vs the model: {st['model_energy_rel_diff']:.1e}.",
        ]
    lines += ["", "## Notes", ""] + [f"* {n}" for n in results["notes"]]
    (out / "svd_cpu.md").write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke test of the script)")
    ap.add_argument("--target", type=float, default=1e-3, help="matched accuracy: max rel. error of σ_1…σ_k")
    ap.add_argument("--target2", type=float, default=1e-5, help="second, tighter target (from the sweeps only)")
    ap.add_argument("--no-stream", action="store_true", help="skip the streamed run")
    ap.add_argument("--repeats", type=int, default=3,
                    help="timed runs of each matched setting, round-robin; the fastest is reported (default 3)")
    ap.add_argument("--out", type=Path, default=REPORTS)
    ap.add_argument("--point", nargs=6, action="append", metavar=("N", "V", "K", "SEED", "METHOD", "IT"),
                    help="only re-measure one method at one point (repeatable; SEED = the config's index in "
                         "the grid, IT = its iteration knob index) and print table rows; no report")
    args = ap.parse_args(argv)
    if args.point:
        warmup([m for m in METHODS if not m.startswith("scipy")])
        print(f"load average {os.getloadavg()}")
        for n, v, k, seed, name, it in args.point:
            a, sigma, _ = make_matrix(int(n), int(v), seed=int(seed))
            r = measure(name, a, torch.from_numpy(a), int(k), int(it), sigma)
            print(f"| {n} | {v} | {k} | {name} | {METHODS[name][1]}={r['knob']} | {r['time_s']:.2f} | "
                  f"{fmt_bytes(r['peak_extra_bytes'])} | {r['max_rel_err']:.1e} |", flush=True)
        print(f"load average {os.getloadavg()}")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/bench_svd.py" + (" --quick" if args.quick else "") + \
        (f" --target {args.target:g}" if args.target != 1e-3 else "") + (" --no-stream" if args.no_stream else "") + \
        (f" --repeats {args.repeats}" if args.repeats != 3 else "")
    t_start = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t_start:7.1f}s] {msg}", flush=True)

    env = environment()
    methods = [m for m in METHODS if env["fbpca"] or m != "fbpca.pca"]
    if args.quick:
        grid = [(2000, 400, 20, [4000])]
        max_it, stream = 4, dict(v=2048, r=128, k=32, n_rows=20_000, chunk=2048)
    else:
        # (N of the sweep, V', k, further N): the sweep fixes each method's iterations for (V', k).
        grid = [(20_000, 2000, 100, [50_000, 100_000]), (20_000, 4000, 100, [100_000]),
                (20_000, 8000, 200, []), (20_000, 4000, 1000, [])]
        # a dense fp32 matrix of the streamed size must not fit in memory
        v = 8192
        n_rows = int(math.ceil(env["mem_total"] * 1.05 / (4 * v) / 4096) * 4096)
        max_it, stream = 5, dict(v=v, r=512, k=128, n_rows=n_rows, chunk=4096)
    results = {"env": env, "target": args.target, "target2": args.target2, "max_it": max_it, "configs": [],
               "repeats": args.repeats,
               "start": t_start, "notes": []}
    log("warm-up")
    warmup(methods)
    for ci, (n0, v, k, more) in enumerate(grid):
        log(f"config N={n0} V'={v} k={k}: building the matrix")
        a, sigma, rounding = make_matrix(n0, v, seed=ci)
        at = torch.from_numpy(a)
        # svds only where ARPACK is affordable here (k ≤ 100, V' ≤ 4000)
        ms = [m for m in methods if not (m.startswith("scipy") and (k > 100 or v > 4000))]
        ms = [m for m in ms if m != "rankest krylov fp64"]  # fp32 products reach the targets here
        # k = 100 sweeps go on to the tighter target; the large ones stop at the first; one pass
        # (it = 0) never reaches 1e-3 on σ = 1/i, so k ≥ 500 starts at it = 1.
        sw = sweep(a, at, k, sigma, ms, args.target2 if k <= 100 else args.target, max_it if k <= 200 else 3,
                   full=(ci == 0), log=log, min_it=0 if k <= 200 else 1)
        matched = {name: first_hit(rows, args.target) for name, rows in sw.items()}
        matched2 = {name: first_hit(rows, args.target2) for name, rows in sw.items()} if k <= 100 else None
        # The sweep's times are single runs: re-time the matched settings (and the tighter target's).
        for table in (matched, matched2 or {}):
            its = {name: hit["it"] for name, hit in table.items() if hit is not None}
            table.update(timed_round(its, a, at, k, sigma, repeats=args.repeats, log=log))
        results["configs"].append({"n": n0, "v": v, "k": k, "fp32_rounding_fro": rounding, "sweep": sw,
                                   "matched": matched, "matched2": matched2})
        del a, at
        for n in more:
            log(f"config N={n} V'={v} k={k}")
            a, sigma, rounding = make_matrix(n, v, seed=ci)
            at = torch.from_numpy(a)
            its = {name: hit["it"] for name, hit in matched.items()
                   if hit is not None and not (name.startswith("scipy") and v > 2000)}
            timed = timed_round(its, a, at, k, sigma, repeats=args.repeats, log=log)
            results["configs"].append({"n": n, "v": v, "k": k, "fp32_rounding_fro": rounding, "matched": timed})
            del a, at
    if not args.no_stream:
        log(f"streamed run: {stream}")
        results["stream"] = streamed_run(seed=0, precision="fp32", log=log, **stream)
        log(f"  done: {results['stream']['stream_time_s']:.0f}s, peak RSS "
            f"{fmt_bytes(results['stream']['peak_rss_bytes'])}")
    results["notes"] += [
        "rankest works on the V'-side (Tᵀ(T·X) per row chunk, fp64 carry, fp64 core): the Gram squares the "
        "condition number, yet its fp32 products reached 1e-8 on σ_k = 1e-2·σ_1 and 1e-7 on σ_k = 1e-3·σ_1 "
        "here (the fp32 rounding is relative to each product's entries); `fast` (bf16 inputs) stalls at "
        "~5e-5, the bf16 rounding of T itself.",
        "At equal passes, rankest `subspace` computes the same subspace as sklearn / torch / fbpca with "
        "n_iter = passes − 1 (same number of GEMMs with T); `krylov` keeps every block (memory (passes − 1)·l "
        "columns) and converges in fewer passes on slowly decaying spectra; `krylov-rr` is the same Krylov space "
        "with Musco & Musco's Rayleigh–Ritz extraction, whose last pass computes T·Q only: 2·passes − 1 GEMMs "
        "with T, one fewer than torch / sklearn / fbpca at n_iter = passes − 1.",
        "rankest's timings include its a-posteriori error estimate (16 probe columns) and U (from the last "
        "pass, no extra pass).",
        f"fp32 rounding of the test matrices moves σ by at most ‖T₃₂ − T₆₄‖_F ≤ "
        f"{max(c['fp32_rounding_fro'] for c in results['configs']):.1e} (absolute; σ_k ≥ 1e-3).",
    ]
    if not env["fbpca"]:
        results["notes"].append("fbpca is not installed: not run.")
    results["load_avg_end"] = os.getloadavg()
    results["wall_s"] = time.time() - t_start
    pngs = plots(results, args.out)
    write_report(results, args.out, command, pngs)
    (args.out / "svd_cpu.json").write_text(json.dumps(results, indent=1, default=float))
    log(f"report: {args.out / 'svd_cpu.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
