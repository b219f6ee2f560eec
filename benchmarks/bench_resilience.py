"""Checkpoint / resume cost of the big accumulator states, and tokens/s of 1 vs 2 gloo processes.

    python benchmarks/bench_resilience.py                  # ~3–5 min on 2 shared cores
    python benchmarks/bench_resilience.py --n-cols 8192 --k 1024 --repeats 3 --tokens 131072
    # on a GPU machine: the 50k Gram (20 GB) and sketch held on the GPU, part 1 only
    python benchmarks/bench_resilience.py --n-cols 50277 --k 4096 --device cuda --repeats 1 --no-processes \
        --name resilience_gpu

Part 1 (in this process): an fp64 V'×V' Gram (the exact `gram` route's state) and a V'×(l+s)
sketch (l = 2k, s = 16 probes: the `sketch` route's state for --rank-max k), filled with random
numbers, on ``--device`` (a GPU-resident state is copied to the host inside ``state()``, so the
copy counts). "checkpoint" = :func:`rankest.io.checkpoint.write_checkpoint` (HDF5 with Fletcher-32
checksums, fsync, rename); "resume" = :func:`rankest.io.checkpoint.read_checkpoint` (checksums
verified) + ``load_state`` into a fresh accumulator. Medians of ``--repeats`` on the run folder's
disk.

Part 2 (subprocesses): the real CLI on a tiny random GPT-NeoX teacher (d = 64, V' = 320, fp32,
prob rows into the exact Gram), once as ``python -m rankest estimate`` and once under
``torchrun --standalone --nproc_per_node=2`` (gloo), alternating ``--repeats`` times. tokens/s is
results.json's ``tokens_per_second`` (rows of the stream over stream time: startup, teacher
loading and finalize excluded).

Writes benchmarks/reports/resilience_cpu.md naming the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

#: 1 process (torch's default threads), 1 process with one thread, 2 torchrun processes (one thread each).
PROCS = ("1", "1t1", "2")
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
REPORTS = HERE / "reports"
sys.path.insert(0, str(ROOT))


def time_state(acc_factory, fill, folder: Path, repeats: int) -> dict:
    """Median seconds to checkpoint and to resume one accumulator's state; file size."""
    from rankest.io.checkpoint import read_checkpoint, write_checkpoint

    acc = acc_factory()
    fill(acc)
    path = folder / "checkpoint.h5"
    w, r = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        write_checkpoint(path, config={}, derived={}, position={"next_batch": 1}, convergence={},
                         states={acc.name: acc.state()})
        w.append(time.perf_counter() - t)
        t = time.perf_counter()
        fresh = acc_factory()
        fresh.load_state(read_checkpoint(path).states[acc.name])
        r.append(time.perf_counter() - t)
    ok = all(np.array_equal(np.asarray(v), np.asarray(fresh.state()[k])) for k, v in acc.state().items())
    size = path.stat().st_size
    path.unlink()
    return {"write_s": statistics.median(w), "read_s": statistics.median(r), "write_all": w, "read_all": r,
            "bytes": size, "state_bytes": acc.nbytes(), "bitwise_equal": ok}


def part1(args) -> dict:
    import torch

    from rankest.accumulate.gram import Gram
    from rankest.accumulate.sketch import Sketch

    v, k = args.n_cols, args.k
    out = {}
    with tempfile.TemporaryDirectory(dir=args.tmp) as d:
        d = Path(d)

        dev = torch.device(args.device)

        def fill_gram(a):
            a.gram.copy_(torch.randn(v, v, dtype=torch.float64, device=dev))
            a.n_rows = 12345

        out["gram"] = time_state(lambda: Gram(v, space="prob", device=dev), fill_gram, d, args.repeats)
        print(f"gram {v}²: {out['gram']['write_s']:.2f} s / {out['gram']['read_s']:.2f} s", flush=True)

        def fill_sketch(a):
            a.y.copy_(torch.randn(*a.y.shape, dtype=torch.float64, device=dev))
            a.n_rows = 12345

        out["sketch"] = time_state(lambda: Sketch(v, k, space="prob", device=dev), fill_sketch, d, args.repeats)
        s = Sketch(v, k, space="prob", device="meta")
        out["sketch"]["shape"] = list(s.y.shape)
        out["sketch"]["l"] = s.l
        print(f"sketch {tuple(s.y.shape)}: {out['sketch']['write_s']:.2f} s / {out['sketch']['read_s']:.2f} s",
              flush=True)
    return out


def part2(args) -> dict:
    from rankest.sources.teachers import build_tiny_neox

    work = Path(tempfile.mkdtemp(dir=args.tmp))
    try:
        teacher = work / "neox"
        build_tiny_neox(hidden_size=64, layers=2, heads=4, context_length=256, seed=0, save_dir=teacher)
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   HF_HUB_OFFLINE="1")
        common = ["estimate", "--teacher", str(teacher), "--tokens", str(args.tokens), "--seq-len", str(args.seq_len),
                  "--batch-size", str(args.batch_size), "--route", "gram", "--space", "prob", "--device", "cpu",
                  "--dtype", "fp32", "--quiet", "--overwrite"]
        res = {p: [] for p in PROCS}
        cmds = {}
        for rep in range(args.repeats):
            for p in PROCS:
                out = work / f"run{p}"
                launcher = ([sys.executable, "-m", "rankest"] if p != "2" else
                            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "rankest"])
                cmd = launcher + common + ["--out", str(out)]
                cmds[p] = ("OMP_NUM_THREADS=1 " if p == "1t1" else "") + " ".join(cmd[1:])
                run_env = dict(env, OMP_NUM_THREADS="1") if p == "1t1" else env
                t = time.perf_counter()
                proc = subprocess.run(cmd, env=run_env, capture_output=True, text=True)
                wall = time.perf_counter() - t
                if proc.returncode:
                    sys.exit(f"run failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
                summary = json.loads((out / "results.json").read_text())
                res[p].append({"tokens_per_second": summary["tokens_per_second"], "wall_s": wall,
                               "stream_s": summary["seconds_stream"], "sigma0": None})
                print(f"P = {p}: {summary['tokens_per_second']:.0f} tok/s (stream {summary['seconds_stream']:.1f} s, "
                      f"wall {wall:.1f} s)", flush=True)
        return {"runs": res, "commands": {p: c.replace(str(work), "$TMP") for p, c in cmds.items()}}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-cols", type=int, default=8192, help="V' of the Gram and the sketch")
    p.add_argument("--k", type=int, default=1024, help="sketch rank (--rank-max); l = 2k")
    p.add_argument("--tokens", type=int, default=131072)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tmp", default=None, help="folder for the checkpoint files (default: the system's temp)")
    p.add_argument("--name", default="resilience_cpu")
    p.add_argument("--device", default="cpu", help="where the part-1 states live: cpu | cuda (default cpu)")
    p.add_argument("--no-processes", action="store_true", help="skip part 2 (1 vs 2 processes)")
    args = p.parse_args()
    load_start = os.getloadavg()
    r1 = part1(args)
    r2 = None if args.no_processes else part2(args)
    load_end = os.getloadavg()
    write_report(args, r1, r2, load_start, load_end)


def write_report(args, r1, r2, load_start, load_end) -> None:
    import torch

    from rankest.io.results import provenance

    prov = provenance(args.device)
    mib = 2**20
    cmd = (f"python benchmarks/bench_resilience.py --n-cols {args.n_cols} --k {args.k} --tokens {args.tokens} "
           f"--seq-len {args.seq_len} --batch-size {args.batch_size} --repeats {args.repeats}"
           + (f" --device {args.device}" if args.device != "cpu" else "")
           + (" --no-processes" if args.no_processes else "") + (f" --name {args.name}" if args.name != "resilience_cpu"
                                                                   else ""))
    g, s = r1["gram"], r1["sketch"]
    where = "CPU" if args.device == "cpu" else f"{args.device} ({prov.get('device_name', 'GPU')})"
    lines = [
        f"# Checkpoint / resume and 1 vs 2 processes — states on {where}",
        "",
        f"Command: `{cmd}`",
        "",
        f"Machine: {prov['cpu']}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads; torch "
        f"{torch.__version__}; rankest {prov['rankest_version']} (git {prov['git_hash']}). The machine is "
        f"**shared with other jobs** (load average at start {', '.join(f'{x:.1f}' for x in load_start)}, at end "
        f"{', '.join(f'{x:.1f}' for x in load_end)} on 2 cores): timings are upper bounds of an idle machine's.",
        "",
        "## Time to checkpoint and to resume (median of "
        f"{args.repeats}; checkpoint = HDF5 with Fletcher-32 checksums + fsync + rename; resume = read with "
        "checksums verified + load_state)",
        "",
        "| state | shape | state size (MiB) | file (MiB) | checkpoint (s) | resume (s) | MiB/s write / read | bitwise equal |",
        "|---|---|---|---|---|---|---|---|",
        f"| fp64 Gram (`gram` route) | {args.n_cols}×{args.n_cols} | {g['state_bytes'] / mib:.0f} | "
        f"{g['bytes'] / mib:.0f} | {g['write_s']:.2f} | {g['read_s']:.2f} | "
        f"{g['state_bytes'] / mib / g['write_s']:.0f} / {g['state_bytes'] / mib / g['read_s']:.0f} | {g['bitwise_equal']} |",
        f"| sketch Y (`sketch` route, k = {args.k}, l = {s['l']}, 16 probes) | {s['shape'][0]}×{s['shape'][1]} | "
        f"{s['state_bytes'] / mib:.0f} | {s['bytes'] / mib:.0f} | {s['write_s']:.2f} | {s['read_s']:.2f} | "
        f"{s['state_bytes'] / mib / s['write_s']:.0f} / {s['state_bytes'] / mib / s['read_s']:.0f} | {s['bitwise_equal']} |",
        "",
        f"All runs (s): Gram write {[round(x, 2) for x in g['write_all']]}, read {[round(x, 2) for x in g['read_all']]}; "
        f"sketch write {[round(x, 2) for x in s['write_all']]}, read {[round(x, 2) for x in s['read_all']]}.",
        ("The V' = 50k Gram (20 GB) needs a machine with that much memory and disk: "
         "`python benchmarks/bench_resilience.py --n-cols 50277 --k 4096 --device cuda --repeats 1 --no-processes "
         "--name resilience_gpu` on a GPU machine." if args.n_cols < 50000 else ""),
        "",
    ]
    if r2 is not None:
        lines += processes_section(r2)
    REPORTS.mkdir(parents=True, exist_ok=True)
    path = REPORTS / f"{args.name}.md"
    path.write_text("\n".join(lines))
    (REPORTS / f"{args.name}.json").write_text(json.dumps({"state": r1, "processes": r2}, indent=2, default=str))
    print(f"wrote {path}")


def processes_section(r2) -> list[str]:
    import torch

    tps = {p: [x["tokens_per_second"] for x in r2["runs"][p]] for p in PROCS}
    med = {p: statistics.median(v) for p, v in tps.items()}
    lines = [
        "## tokens/s, 1 process vs 2 gloo processes (tiny random GPT-NeoX, d = 64, V' = 320, fp32, "
        "`--route gram --space prob`)",
        "",
        "| processes | tokens/s (median) | all runs | stream s | wall s (incl. startup, finalize, report) |",
        "|---|---|---|---|---|",
    ]
    label = {"1": f"1 ({torch.get_num_threads()} threads)", "1t1": "1 (OMP_NUM_THREADS=1)",
             "2": "2 (torchrun, gloo, 1 thread each)"}
    for p in PROCS:
        runs = r2["runs"][p]
        lines.append(f"| {label[p]} | {med[p]:.0f} | {[round(x) for x in tps[p]]} | "
                     f"{[round(x['stream_s'], 1) for x in runs]} | {[round(x['wall_s'], 1) for x in runs]} |")
    lines += [
        "",
        f"2 processes over 1 process: {med['2'] / med['1']:.2f}× (default threads), {med['2'] / med['1t1']:.2f}× "
        "(one thread). Commands (`$TMP` a temporary folder):",
        "",
        f"* 1 process: `python {r2['commands']['1']}`",
        f"* 1 process, one thread: `{r2['commands']['1t1'].replace('OMP_NUM_THREADS=1 ', 'OMP_NUM_THREADS=1 python ')}`",
        f"* 2 processes: `python {r2['commands']['2']}`",
        "",
        "torchrun sets OMP_NUM_THREADS=1 in each of its workers; the single process uses torch's default "
        f"({torch.get_num_threads()} threads here). On 2 cores shared with other jobs neither figure is a scaling "
        "law: 2 processes can at most use the same 2 cores. Distribution pays where each process has its own GPU.",
        "",
    ]
    return lines


if __name__ == "__main__":
    main()
