"""Peak memory of `estimate --space prob` on the sketch route (k = 1024 by default), one CLI run.

    python benchmarks/bench_sketch_memory.py                         # embedded teacher, 2,048 rows
    python benchmarks/bench_sketch_memory.py --tokens 2048 --rank-max 1024 --name sketch_memory_cpu

Runs ``python -m rankest estimate`` in a child process and reads its peak RSS
(``getrusage(RUSAGE_CHILDREN).ru_maxrss``), its wall time, and the run's own ``route_reason``
(the per-component accounting). ``--source`` points at another checkout to measure a before/after
pair with the same command. Writes benchmarks/reports/<name>.md (appending one row per run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--rank-max", type=int, default=1024)
    p.add_argument("--source", default=str(HERE.parent), help="checkout whose rankest is measured")
    p.add_argument("--label", default="this checkout")
    p.add_argument("--name", default="sketch_memory_cpu")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "rankest", "estimate", "--space", "prob", "--route", "sketch",
               "--tokens", str(args.tokens), "--rank-max", str(args.rank_max), "--quiet", "--out", str(out)]
        env = {**os.environ, "PYTHONPATH": args.source}
        load0, t = os.getloadavg(), time.perf_counter()
        proc = subprocess.run(cmd, cwd=args.source, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t
        if proc.returncode:
            sys.exit(f"estimate failed:\n{proc.stderr[-3000:]}")
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        res = json.loads((out / "results.json").read_text())
    meta = res.get("meta", res)
    reason = meta.get("route_reason") or res.get("route_reason")
    report = HERE / "reports" / f"{args.name}.md"
    if not report.exists():
        report.write_text(
            "# Peak memory of the prob sketch route (CPU)\n\n"
            f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, shared with other "
            "sessions (load average in the table). Command (in the measured checkout): "
            f"`python -m rankest estimate --space prob --route sketch --tokens {args.tokens} --rank-max "
            f"{args.rank_max} --quiet --out RUN`, run by `python benchmarks/bench_sketch_memory.py`.\n\n"
            "| checkout | peak RSS (GiB) | wall (s) | load avg (1 min) | route reason |\n|---|---|---|---|---|\n")
    with report.open("a") as f:
        f.write(f"| {args.label} | {peak / 2**30:.2f} | {wall:.0f} | {load0[0]:.1f} | {reason} |\n")
    print(f"{args.label}: peak RSS {peak / 2**30:.2f} GiB, {wall:.0f} s; {reason}")


if __name__ == "__main__":
    main()
