"""Human reports: report.md with PNG plots of the spectrum, W-error curve and convergence.

`write_report` is called at the end of every `estimate`; `python -m rankest report DIR`
re-renders a run folder's report (several folders: :mod:`rankest.report.compare`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from rankest.io.files import write_text_atomic
from rankest.report.ngram import render_ngram_section
from rankest.report.plots import estimate_plots
from rankest.report.text import fmt
from rankest.spectrum import REPORTED_EPS, Spectrum


def render_markdown(spec: Spectrum, *, config: dict, prov: dict, plots: dict[str, str]) -> str:
    m = spec.metrics()
    meta = spec.meta
    lines = [
        f"# rankest estimate — {meta.get('teacher', '?')} on {meta.get('corpus', '?')}",
        "",
        f"Space `{spec.space}`, route `{spec.route}` ({meta.get('route_reason', '')}), "
        f"N = {spec.n_rows:,} rows × V' = {spec.n_cols:,} columns, accumulated in {spec.precision}.",
        "",
        "## Summary",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    for eps in REPORTED_EPS:
        v = m["rank_at"][str(eps)]
        lines.append(f"| rank_at({eps}) — least d with W-error ≤ {eps} | {fmt(v) if v is not None else 'beyond the sketch'} |")
    lines += [
        f"| numerical rank (largest gap σ_i/σ_(i+1) above 1e-6·σ_1) | {m['numerical_rank']} |",
        f"| threshold rank (σ_i > σ_1·max(N,V')·eps) | {m['threshold_rank']} |",
        f"| effective rank (Roy & Vetterli) | {fmt(m['effective_rank'])} |",
        f"| stable rank ‖T‖_F²/σ_1² | {fmt(m['stable_rank'])} |",
        f"| energy ‖T‖_F² (streamed, fp64) | {fmt(spec.energy, 8)} |",
        f"| off-model energy 1 − Σσ²/‖T‖_F² | {fmt(m['off_model_energy'])} |",
        f"| teacher NLL on the rows (nats) | {fmt(meta.get('nll'))} |",
        f"| teacher perplexity | {fmt(meta.get('perplexity'))} |",
    ]
    if not spec.exact:
        lines += ["", f"This is a **sketch**: σ̂ ≤ σ and the tails are upper bounds. The curve is trusted up to "
                      f"d = {meta.get('trusted_d')}; estimated errors: `{meta.get('sketch_error')}`."]
    lines += ["", "## Plots", ""]
    for name, fname in plots.items():
        lines.append(f"![{name}]({fname})")
        lines.append("")
    if spec.convergence:
        lines += ["## Convergence with the number of rows", "",
                  "A rank estimate grows with N until it saturates: if the last rows still move it, "
                  "the corpus sample was too small for the number reported.", "",
                  "| N | rank_at(0.5) | rank_at(0.1) | rank_at(0.01) | numerical rank | effective rank |",
                  "|---|---|---|---|---|---|"]
        for n in sorted(spec.convergence):
            c = spec.convergence[n]
            r = c["rank_at"]
            lines.append(f"| {n:,} | {fmt(r.get('0.5'))} | {fmt(r.get('0.1'))} | {fmt(r.get('0.01'))} | "
                         f"{c['numerical_rank']} | {fmt(c['effective_rank'])} |")
        lines.append("")
    lines += ["## How to read this", "",
              "* **W-error(d)** = sqrt(Σ_{i>d} σ_i² / Σ σ_i²): the relative Frobenius error of the best rank-d "
              "approximation of the target matrix (Eckart–Young). A head of rank d cannot produce targets closer "
              "than this (in this space).",
              "* **rank_at(ε)**: the rank needed for W-error ≤ ε.",
              "* **numerical rank**: where the spectrum falls off a cliff; for `clr` rows of a linear-head teacher "
              "it recovers the hidden size (Finlayson et al. 2024; Carlini et al. 2024).",
              "* **off-model energy**: the share of the rows' energy the spectrum leaves unexplained — ≈ 0 for exact "
              "routes, the bf16 noise of the real logits for `factor`, the tail beyond k for a sketch.", "",
              "## Configuration and provenance", "", "```"]
    for k, v in sorted(config.items()):
        lines.append(f"{k}: {v}")
    lines.append("")
    for k, v in sorted(prov.items()):
        lines.append(f"{k}: {v}")
    lines += ["```", ""]
    return "\n".join(lines)


def write_report(out: Path, spec: Spectrum, *, config: dict, prov: dict, sweep: Optional[dict] = None) -> Path:
    """Write the PNGs and report.md into the run folder ``out`` (an n-gram target's facts and
    corpus-size ``sweep`` {fraction: (Spectrum, facts)} as a section of their own)."""
    out = Path(out)
    plots = estimate_plots(spec, out)
    path = out / "report.md"
    text = render_markdown(spec, config=config, prov=prov, plots=plots)
    if "contexts" in spec.meta:  # an n-gram target
        text += render_ngram_section(spec, sweep or {}, out)
    write_text_atomic(path, text)
    return path


