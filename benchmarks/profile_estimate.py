"""Where the CPU factor route's time goes beyond the bare forward: cProfile of one estimate.

    python benchmarks/profile_estimate.py --tokens 4096        # embedded teacher, ~1 min on 2 cores

One process loads the teacher, runs one warm-up estimate, then profiles one bare forward (corpus
packing + ``model(input_ids).logits``) and one ``rankest.estimate`` on the same rows, and writes
the cumulative seconds of the phases (benchmarks/reports/<name>.md).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
from pathlib import Path

HERE = Path(__file__).resolve().parent

# (label, (file suffix, function name)) — cumulative time of each phase inside one estimate.
PHASES = [
    ("teacher forward to the features (teachers.py: features)", ("teachers.py", "features")),
    ("first batch: forward + head check (features_with_head_check)", ("teachers.py", "features_with_head_check")),
    ("head logits at the sampled rows (teachers.py: logits)", ("teachers.py", "logits")),
    ("row statistics on the full logits (ops.transform_rows)", ("ops/__init__.py", "transform_rows")),
    ("G_H update (ops.gram_update)", ("ops/__init__.py", "gram_update")),
    ("row statistics sums (RowStats.update)", ("rowstats.py", "update")),
    ("convergence snapshots (Estimate.snapshot)", ("pipeline.py", "snapshot")),
    ("Factor.finalize (snapshots and the end)", ("factor.py", "finalize")),
    ("finalize (Estimate.finalize)", ("pipeline.py", "finalize")),
    ("corpus tokenising / packing (corpus.py: pack_windows)", ("corpus.py", "pack_windows")),
    ("head Gram G_W (once per loaded teacher: neural.py head_gram)", ("neural.py", "head_gram")),
]


def cumulative(stats: pstats.Stats, suffix: str, name: str) -> float:
    return sum(v[3] for (f, _, fn), v in stats.stats.items() if f.endswith(suffix) and fn == name)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="smollm2-135m-instruct")
    p.add_argument("--corpus", default="lee")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--name", default="estimate_cpu_profile")
    args = p.parse_args()

    import torch

    from rankest.estimator.pipeline import run_estimate
    from rankest.sources.corpus import iter_batches, load_documents, pack_windows, plan_rows
    from rankest.sources.teachers import load_teacher, quiet_loading

    with quiet_loading():
        teacher = load_teacher(args.teacher, device="cpu", dtype="fp32")

    def bare():
        windows = pack_windows(load_documents(args.corpus), teacher.tokenizer, 128, max_windows=None)
        with torch.inference_mode():
            for b in iter_batches(windows, plan_rows(len(windows), 128, tokens=args.tokens, seed=0), 8):
                teacher.model(b.input_ids).logits

    def estimate():
        run_estimate(teacher=teacher, corpus=args.corpus, tokens=args.tokens, seq_len=128, batch_size=8,
                     route="factor", quiet=True)

    estimate()
    load = os.getloadavg()
    out = {}
    for label, fn in (("bare", bare), ("estimate", estimate)):
        prof = cProfile.Profile()
        prof.enable()
        fn()
        prof.disable()
        out[label] = pstats.Stats(prof)
    total_b = out["bare"].total_tt
    total_e = out["estimate"].total_tt
    lines = [f"# Profile of one factor-route estimate, {args.teacher}, CPU, N = {args.tokens:,}", "",
             f"Command: `python benchmarks/profile_estimate.py --tokens {args.tokens}` (cProfile, one warm-up "
             f"run first; load average {load[0]:.1f} on {os.cpu_count()} cores shared with other sessions).", "",
             f"Bare forward (packing + `model(input_ids).logits`): **{total_b:.2f} s**; estimate: "
             f"**{total_e:.2f} s** (ratio {total_e / total_b:.2f} under the profiler).", "",
             "| phase inside the estimate | cumulative s | share of the estimate |", "|---|---|---|"]
    for label, (suffix, name) in PHASES:
        t = cumulative(out["estimate"], suffix, name)
        lines.append(f"| {label} | {t:.3f} | {100 * t / total_e:.1f}% |")
    (HERE / "reports" / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
