"""The block size of the default randomized SVD: passes="auto" block Krylov at l = k + oversample.

    python benchmarks/svd_oversample.py            # ~1 min on one core

Block Krylov converges on the gap σ_k / σ_{l+1}, and every pass costs two products with l columns
plus a finish on a basis of passes·l columns. A narrower block needs more passes, a wider one
fewer, each dearer. This script runs ``randomized_svd(T, k, oversample=p)`` with every other
default, on the three matrices of ``bench_svd.py`` (the same builders, seeds and sizes), for
p ∈ {20 (the default at k = 100: max(20, k/5)), 35, 50, 100 (l = 2k), 150}. It reports the
passes the estimate chose, the estimate, the true worst relative error of σ̂_1…σ̂_k against the fp64 SVD, and the fastest of
``--repeats`` calls, taken in turns. Writes benchmarks/reports/svd_oversample_cpu.md (+ PNG).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_svd import REPORTS, build, environment, grid_of, label, randomized_svd  # noqa: E402

OVERSAMPLES = (20, 35, 50, 100, 150)


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    grid, _ = grid_of(args.quick)
    out = {"env": environment(), "repeats": args.repeats, "rows": []}
    for cfg in grid:
        a, sigma, _ = build(cfg, cfg["n"])
        at, k = torch.from_numpy(a), cfg["k"]
        randomized_svd(at, k)  # warm-up
        times = {p: [] for p in OVERSAMPLES}
        last = {}
        for _ in range(args.repeats):
            for p in OVERSAMPLES:
                t0 = time.perf_counter()
                r = randomized_svd(at, k, oversample=p, seed=0)
                times[p].append(time.perf_counter() - t0)
                last[p] = r
        for p in OVERSAMPLES:
            r = last[p]
            s = r.S.numpy().astype(np.float64)
            err = float(np.max(np.abs(s - sigma[:k]) / sigma[:k]))
            row = {"matrix": label({key: cfg[key] for key in ("spectrum", "n", "v", "k", "seed")}),
                   "oversample": p, "l": k + p, "passes": int(r.info["passes"]),
                   "estimate": float(r.info["sigma_rel_error"]), "true": err, "time": min(times[p])}
            out["rows"].append(row)
            print(f"{row['matrix']}  p={p:3d}: {row['time']:.3f} s, {row['passes']} passes, "
                  f"est {row['estimate']:.1e}, true {err:.1e}", flush=True)
        del a, at
    return out


def write(out: dict, path: Path, command: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    env = out["env"]
    matrices = list(dict.fromkeys(r["matrix"] for r in out["rows"]))
    fig, axes = plt.subplots(1, len(matrices), figsize=(4.2 * len(matrices), 3.6), squeeze=False)
    for ax, m in zip(axes[0], matrices):
        rows = [r for r in out["rows"] if r["matrix"] == m]
        ax.plot([r["oversample"] for r in rows], [r["time"] for r in rows], "o-")
        for r in rows:
            ax.annotate(f"{r['passes']} passes", (r["oversample"], r["time"]), textcoords="offset points",
                        xytext=(0, 6), ha="center", fontsize=8)
        ax.set_title(m, fontsize=8)
        ax.set_xlabel("oversample p (l = k + p)")
        ax.set_ylabel("time (s), fastest call")
        ax.margins(y=0.15)
        ax.grid(alpha=0.3)
    fig.suptitle("randomized_svd(T, k, oversample=p): passes='auto', tol = 1e-3", fontsize=10)
    fig.tight_layout()
    png = path.with_suffix(".png")
    fig.savefig(png, dpi=110)
    plt.close(fig)

    lines = [
        "# Block size of the default randomized SVD (CPU)", "",
        "```", command, "```", "",
        f"CPU: **{env['cpu']}**, {env['cores']} cores, torch threads {env['torch_threads']}; torch {env['torch']}, "
        f"numpy {env['numpy']}; load average at start {', '.join(f'{x:.1f}' for x in env['load_avg_start'])}. "
        f"Fastest of {out['repeats']} calls per setting, the settings taking turns.", "",
        "`randomized_svd(T, k, oversample=p)` with every other default (passes='auto', block Krylov, tol = 1e-3 on "
        "the estimated worst relative error of σ_1…σ_k); *true*: against the fp64 SVD of the stored fp32 matrix.", "",
        "| matrix | p | l | passes | estimate | true max rel err | time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in out["rows"]:
        lines.append(f"| {r['matrix']} | {r['oversample']} | {r['l']} | {r['passes']} | {r['estimate']:.1e} | "
                     f"{r['true']:.1e} | {r['time']:.3f} |")
    lines += ["", f"![time against oversample]({png.name})", ""]
    path.write_text("\n".join(lines))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke test of the script)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=REPORTS / "svd_oversample_cpu.md")
    args = ap.parse_args(argv)
    out = run(args)
    command = "python benchmarks/svd_oversample.py" + "".join(
        f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write(out, args.out, command)
    print(f"report: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
