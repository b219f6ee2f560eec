"""``rankest report DIR DIR…``: several runs' W-error curves in one plot and one table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from rankest.io.files import write_text_atomic
from rankest.io.results import read_spectrum_h5
from rankest.report.ngram import draw_paper_fig7, ngram_compare_lines, ngram_label
from rankest.report.plots import plot_w_error, short_name
from rankest.report.text import fmt_metric
from rankest.spectrum import REPORTED_EPS


def compare_runs(folders: Sequence[Path], out: Path) -> Path:
    """One W-error plot and one rank_at table for several run folders."""
    specs = []
    for folder in folders:
        spec = read_spectrum_h5(Path(folder) / "results.h5")
        ng = ngram_label(spec.meta)
        specs.append((f"{short_name(spec.meta.get('teacher', Path(folder).name))}{ng} {spec.space}/{spec.route}", spec))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fig7 = any(str(s.meta.get("teacher", "")).startswith("ngram:") and s.space == "prob" for _, s in specs)
    corpora = sorted({short_name(s.meta.get("corpus")) for _, s in specs})
    plot_w_error(specs, out / "compare_w_error.png",
                 f"W-error curves of {len(specs)} runs\ncorpus: {', '.join(corpora)}; N = "
                 + ", ".join(f"{s.n_rows:,}" for _, s in specs) + " rows",
                 decorate=draw_paper_fig7 if fig7 else None)
    lines = ["# rankest comparison", "", "![W-error curves](compare_w_error.png)", "",
             "| run | N | V' | rank_at(0.5) | rank_at(0.1) | rank_at(0.01) | numerical rank |", "|---|---|---|---|---|---|---|"]
    for (label, spec), folder in zip(specs, folders):
        r = {str(e): fmt_metric(spec.metric("rank_at", e)) for e in REPORTED_EPS}
        lines.append(f"| {label} (`{folder}`) | {spec.n_rows:,} | {spec.n_cols:,} | {r['0.5']} | {r['0.1']} | "
                     f"{r['0.01']} | {fmt_metric(spec.metric('numerical_rank'))} |")
    lines += ngram_compare_lines(specs, folders)
    path = out / "compare.md"
    write_text_atomic(path, "\n".join(lines) + "\n")
    write_text_atomic(out / "compare.json", json.dumps({label: spec.summary() for label, spec in specs}, indent=2))
    return path
