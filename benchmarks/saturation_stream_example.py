"""`saturation --teachers … --diagnostics` end to end on tiny local checkpoints, stopped by SIGINT and resumed.

    python benchmarks/saturation_stream_example.py             # ~2 min on 2 shared cores

The checkpoints are random tiny GPT-NeoX models (``build_tiny_neox``) saved as revision folders
``m<d>/step<N>`` for three sizes d = 16, 24, 32 and three steps: a *plumbing* check, not a
measurement of training (random weights have no training curve). The run:

1. an uninterrupted reference run;
2. the same command with ``--checkpoint-every 1``, sent SIGINT once its checkpoint.h5 exists
   (expected exit status 130 and a checkpoint left behind);
3. the same command with ``--resume``, which must finish and give the reference's numbers.

Writes benchmarks/reports/saturation_stream_example.md (+ its PNGs) naming the machine.
"""

from __future__ import annotations

import json
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPORTS = HERE / "reports"
sys.path.insert(0, str(HERE.parent))

from rankest.sources.teachers import build_tiny_neox  # noqa: E402

SIZES, STEPS = (16, 24, 32), ("step10", "step100", "step1000")


def make_suite(root: Path) -> None:
    tok = None
    for i, d in enumerate(SIZES):
        for j, step in enumerate(STEPS):
            _, tok = build_tiny_neox(hidden_size=d, layers=2, heads=2, context_length=64, seed=10 * i + j,
                                     save_dir=root / f"m{d}" / step, tokenizer=tok)


def command(root: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "rankest", "saturation", "--teachers", ",".join(str(root / f"m{d}") for d in SIZES),
            "--revisions", ",".join(STEPS), "--corpus", "lee", "--tokens", "8192", "--seq-len", "32",
            "--batch-size", "4", "--device", "cpu", "--diagnostics", "--fit-on", ",".join(f"m{d}" for d in SIZES), "--out", str(out), "--quiet", *extra]


def main() -> None:
    REPORTS.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "ckpts"
        make_suite(root)
        ref, part = Path(tmp) / "ref", Path(tmp) / "part"
        t0 = time.perf_counter()
        done = subprocess.run(command(root, ref), capture_output=True, text=True, cwd=HERE.parent)
        t_ref = time.perf_counter() - t0
        if done.returncode:
            raise SystemExit(done.stderr)
        proc = subprocess.Popen(command(root, part, "--checkpoint-every", "1"), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, cwd=HERE.parent)
        while not (part / "checkpoint.h5").exists() and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(0.3)  # a few batches into the run
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate()
        stopped = proc.returncode
        left = (part / "checkpoint.h5").exists()
        t0 = time.perf_counter()
        resumed = subprocess.run(command(root, part, "--checkpoint-every", "1", "--resume"), capture_output=True,
                                 text=True, cwd=HERE.parent)
        t_res = time.perf_counter() - t0
        if resumed.returncode:
            raise SystemExit(resumed.stderr)
        a = json.loads((ref / "saturation.json").read_text())["models"]
        b = json.loads((part / "saturation.json").read_text())["models"]
        keys = ("nll", "acc", "last_layer_anisotropy", "head_singular_entropy_kl", "freq_share_top1pct")
        diff = max(float(np.max(np.abs(np.asarray(a[m][k], float) - np.asarray(b[m][k], float))))
                   for m in a for k in keys)
        stem = "saturation_stream_example"
        for png in sorted(ref.glob("*.png")):
            shutil.copyfile(png, REPORTS / f"{stem}_{png.name}")
        md = (ref / "saturation.md").read_text().replace("](saturation_", f"]({stem}_saturation_")
        md = md.replace("# Saturation", "## Saturation")
        shown = " ".join(command(root, ref)[1:]).replace(str(root) + "/", "CKPTS/").replace(str(ref), "OUT")
        lines = ["# saturation: rankest's own streamed evaluation, interrupted and resumed (tiny random checkpoints)",
                 "", "The checkpoints are **random tiny GPT-NeoX models** saved as revision folders (d = 16, 24, 32; "
                 "steps 10, 100, 1000): this checks the path end to end (loading, row plan, NLL / accuracy, head "
                 "spectrum, frequency shares, anisotropy, checkpoint, SIGINT, resume, report); the numbers say "
                 "nothing about training. Machine: "
                 f"{platform.node()} ({platform.processor() or platform.machine()}), 2 CPU cores shared by 8 sessions.",
                 "", "```", f"python {shown}", "```", "",
                 f"* reference run: {t_ref:.1f} s, exit 0;",
                 f"* the same with `--checkpoint-every 1`, SIGINT once checkpoint.h5 existed: exit status {stopped}, "
                 f"checkpoint left: {left}; stderr: `{err.strip().splitlines()[-1] if err.strip() else ''}`;",
                 f"* `--resume`: {t_res:.1f} s (a checkpoint written after every batch), exit 0; largest difference from the reference over "
                 f"{', '.join(keys)}: {diff:.3g}.", "", "Reference run's output:", "", "```", done.stdout.strip(), "```",
                 "", md]
        (REPORTS / f"{stem}.md").write_text("\n".join(lines))
        print(f"wrote {REPORTS / f'{stem}.md'}")


if __name__ == "__main__":
    main()
