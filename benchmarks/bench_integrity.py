"""What the integrity checks cost: the SHA-256 digest, a sealed checkpoint write and read, and
the row cache's running digest, against the same work without them (CPU).

    python benchmarks/bench_integrity.py                 # ~1 min on 2 shared cores
    python benchmarks/bench_integrity.py --gram 4096 --rows 8192 --cols 4096

* digest: :func:`rankest.io.h5.digest` of one fp64 array, MB/s.
* checkpoint: ``write_checkpoint`` + ``read_checkpoint`` of a V'×V' fp64 Gram state (the
  largest state a checkpoint holds), against a plain ``h5py`` write + read of the same array
  with Fletcher-32 (what a checkpoint cost before it carried a digest).
* row cache: ``RowCache.append`` of every row + ``sync``, against raw h5py writes of the same rows.

Medians of ``--repeats``. Writes benchmarks/reports/integrity_cpu.md naming the machine.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from rankest.io.checkpoint import read_checkpoint, write_checkpoint
from rankest.io.h5 import digest
from rankest.io.rowcache import RowCache

REPORTS = Path(__file__).resolve().parent / "reports"


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gram", type=int, default=2048, help="V' of the Gram state")
    ap.add_argument("--rows", type=int, default=4096, help="rows appended to the row cache")
    ap.add_argument("--cols", type=int, default=2048, help="V' of the row cache")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    gram = rng.standard_normal((args.gram, args.gram))
    mb = gram.nbytes / 2**20
    tmp = Path(tempfile.mkdtemp(prefix="bench-integrity-"))

    t_digest = median_time(lambda: digest({}, {"g": gram}), args.repeats)

    def sealed():
        write_checkpoint(tmp / "c.h5", config={}, derived={}, position={"next_batch": 1, "rows_done": 1},
                         convergence={}, states={"gram": {"gram": gram, "n_rows": np.asarray(1)}}, rng={})
        read_checkpoint(tmp / "c.h5")

    def plain():
        with h5py.File(tmp / "p.h5", "w") as f:
            f.create_dataset("g", data=gram, fletcher32=True, chunks=True)
        with h5py.File(tmp / "p.h5", "r") as f:
            f["g"][()]

    t_sealed, t_plain = median_time(sealed, args.repeats), median_time(plain, args.repeats)

    rows = torch.from_numpy(rng.standard_normal((args.rows, args.cols)).astype(np.float32))
    block = 256

    def cache():
        c = RowCache(tmp / "rows.h5", args.cols, args.rows)
        for lo in range(0, args.rows, block):
            c.append(rows[lo:lo + block])
        c.sync()
        c.remove()

    def raw():
        with h5py.File(tmp / "raw.h5", "w") as f:
            ds = f.create_dataset("rows", shape=(args.rows, args.cols), dtype="f4")
            for lo in range(0, args.rows, block):
                ds[lo:lo + block] = rows[lo:lo + block].numpy()

    t_cache, t_raw = median_time(cache, args.repeats), median_time(raw, args.repeats)
    cache_mb = rows.numel() * 4 / 2**20
    lines = [
        "# Integrity checks: cost (CPU)", "",
        f"Machine: {platform.node()}, {platform.processor() or platform.machine()}, 2 cores shared with other "
        f"sessions (timings are noisy); torch {torch.__version__}, h5py {h5py.__version__}.", "",
        f"Command: `python benchmarks/bench_integrity.py --gram {args.gram} --rows {args.rows} --cols {args.cols} "
        f"--repeats {args.repeats}` (medians).", "",
        "| what | size | with the checks | without | ratio |", "|---|---|---|---|---|",
        f"| digest (SHA-256) of an fp64 array | {mb:.0f} MiB | {t_digest:.3f} s ({mb / t_digest:.0f} MiB/s) | – | – |",
        f"| checkpoint write + read of a {args.gram}² Gram | {mb:.0f} MiB | {t_sealed:.3f} s | {t_plain:.3f} s "
        f"(h5py + Fletcher-32) | {t_sealed / t_plain:.2f} |",
        f"| row cache: {args.rows} rows × {args.cols} appended + sync | {cache_mb:.0f} MiB | {t_cache:.3f} s | "
        f"{t_raw:.3f} s (raw h5py) | {t_cache / t_raw:.2f} |", "",
        "The sealed checkpoint also fsyncs and renames (atomic write) and checks every state for NaN; "
        "the row cache fsyncs at sync and hashes every appended row.",
    ]
    REPORTS.mkdir(exist_ok=True)
    (REPORTS / "integrity_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
