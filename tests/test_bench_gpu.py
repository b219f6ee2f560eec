"""benchmarks/bench_gpu.py --tiny end to end on the CPU, so the GPU benchmark cannot rot unnoticed.

The real run needs an H100/H200 (benchmarks/gpu_check.sh); here the same code runs with tiny
shapes in fp32 (~20 s on 2 cores) and must write its report, chart and JSON with finite numbers,
copy them to $OUT, print its summary last, and never import `datasets` or `gguf` (absent on
the GPU machine).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks" / "bench_gpu.py"


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@pytest.mark.slow  # benchmarks/bench_gpu.py in a subprocess
def test_bench_gpu_tiny_end_to_end(tmp_path):
    reports, out = tmp_path / "reports", tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    env.update(OUT=str(out), PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(BENCH), "--tiny", "--full", "--report-dir", str(reports)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    jsons = list(reports.glob("gpu_*.json"))
    assert len(jsons) == 1, sorted(p.name for p in reports.iterdir())
    stem = jsons[0].stem
    for ext in (".md", ".png", ".json"):
        f = reports / f"{stem}{ext}"
        assert f.is_file() and f.stat().st_size > 0, f
        assert (out / f.name).read_bytes() == f.read_bytes(), f"{f.name} not copied to $OUT"
    assert (reports / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    res = json.loads(jsons[0].read_text())
    assert res["errors"] == {}, res["errors"]
    assert res["forbidden_modules_imported"] == [], "datasets/gguf must never be imported"
    assert res["config"]["tokens"] == 3 * 4 * 64

    phases = res["phases"]
    assert _finite(phases["forward"]["tokens_per_second"]) and phases["forward"]["tokens_per_second"] > 0
    expected = ["factor", "gram_fast", "gram_fp64", "naive"]
    if "skipped" not in phases.get("sketch", {"skipped": True}):
        expected.append("sketch")
    for name in expected:
        ph = phases[name]
        assert _finite(ph["ratio_stream"]) and ph["ratio_stream"] > 0, (name, ph)
        assert _finite(ph["ratio_total"]) and ph["ratio_total"] >= ph["ratio_stream"] - 1e-9, (name, ph)
        if name != "naive":
            assert all(r["n_rows"] == 3 * 4 * 64 for r in ph["runs"]), name
    for name in ("gram_fast", "gram_fp64"):  # trace(TᵀT) = ‖T‖_F²: the accumulation is sane
        assert all(r["gram_trace_rel_err"] < 1e-4 for r in phases[name]["runs"]), name
    # The factor route recovers the tiny teacher's hidden size from its clr rows.
    assert phases["factor"]["runs"][-1]["metrics"]["numerical_rank"] == 64

    assert _finite(res["ceilings"]["copy"]["GBps"])
    for case in ("clr", "prob", "clr_stats_only"):
        tr = res["transform_rows"][case]
        assert _finite(tr["GBps"]) and _finite(tr["fraction_of_copy"]), case
        assert tr["stats_max_rel_err"] < 1e-3, case
        if case != "clr_stats_only":
            assert tr["rows_max_rel_err"] < 1e-5, case
    for mode in ("fp64", "fast"):
        gu = res["gram_update"][mode]
        assert _finite(gu["TFLOPs"]) and gu["TFLOPs"] > 0, mode
        assert gu["block_max_rel_err"] < 1e-4, mode
    eig = res["eigensolve"]
    assert eig["n"] == 500 and _finite(eig["seconds"]), eig

    md = (reports / f"{stem}.md").read_text()
    for needle in ("factor", "gram_fast", "naive", "transform_rows", "gram_update", "eigvalsh"):
        assert needle in md, needle
    # The summary table comes last (the device tool returns only the end of the output).
    tail = proc.stdout.strip().splitlines()[-32:]
    assert any(line.startswith("phase") for line in tail), tail
    assert tail[-1].startswith("report:"), tail[-1]
