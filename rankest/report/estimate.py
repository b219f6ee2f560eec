"""Human reports: report.md with PNG plots of the spectrum, W-error curve and convergence.

`write_report` is called at the end of every `estimate`; `python -m rankest report DIR...`
re-renders a run folder's report, and with several folders draws their W-error curves in one
comparison plot.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from rankest.io.results import read_spectrum_h5, write_text_atomic
from rankest.spectrum import REPORTED_EPS, Spectrum


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    from rankest.io.results import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    _plt().close(fig)


def plot_spectrum(spec: Spectrum, path: Path, title: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    s = spec.sigma[spec.sigma > 0]
    if s.size:
        ax.semilogy(np.arange(1, s.size + 1), s / s[0], lw=1.2)
    ax.axvline(spec.numerical_rank, color="C3", ls="--", lw=0.8, label=f"numerical rank {spec.numerical_rank}")
    ax.set_xlabel("index i")
    ax.set_ylabel("σ_i / σ_1")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    _save(fig, path)


def plot_w_error(specs: Sequence[tuple[str, Spectrum]], path: Path, title: str, decorate=None) -> None:
    """``decorate(ax)``, when given, draws reference marks (e.g. the paper's points) before saving."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (label, spec) in enumerate(specs):
        w = spec.w_error()
        d = np.arange(1, w.size + 1)
        trusted = spec.meta.get("trusted_d")
        if trusted is not None and trusted < w.size:  # a sketch's curve is greyed beyond trusted_d
            ax.plot(d[:trusted], w[:trusted], color=f"C{i}", label=label)
            ax.plot(d[trusted - 1:], w[trusted - 1:], color="0.7", ls=":", label=f"{label} (beyond trusted d)")
        else:
            ax.plot(d, w, color=f"C{i}", label=label)
    for eps in REPORTED_EPS:
        ax.axhline(eps, color="0.5", lw=0.5, ls="--")
    ax.set_xscale("log")
    ax.set_xlabel("d (rank kept)")
    ax.set_ylabel("W-error(d)")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    if decorate is not None:
        decorate(ax)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, path)


def plot_convergence(spec: Spectrum, path: Path, title: str) -> None:
    plt = _plt()
    ns = sorted(spec.convergence)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for eps in REPORTED_EPS:
        vals = [spec.convergence[n]["rank_at"].get(str(eps)) for n in ns]
        axes[0].plot(ns, [np.nan if v is None else v for v in vals], marker="o", label=f"rank_at({eps})")
    axes[0].plot(ns, [spec.convergence[n]["numerical_rank"] for n in ns], marker="s", ls="--", label="numerical rank")
    axes[0].set_xscale("log")
    axes[0].set_xlabel("rows N")
    axes[0].set_ylabel("rank")
    axes[0].legend(fontsize=8)
    axes[1].plot(ns, [spec.convergence[n]["effective_rank"] for n in ns], marker="o", label="effective rank")
    axes[1].plot(ns, [spec.convergence[n]["stable_rank"] for n in ns], marker="s", label="stable rank")
    axes[1].set_xscale("log")
    axes[1].set_xlabel("rows N")
    axes[1].legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    _save(fig, path)


def _fmt(x, digits=4) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        if not np.isfinite(x):
            return "—"
        return f"{x:.{digits}g}"
    return str(x)


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
        lines.append(f"| rank_at({eps}) — least d with W-error ≤ {eps} | {_fmt(v) if v is not None else 'beyond the sketch'} |")
    lines += [
        f"| numerical rank (largest gap σ_i/σ_(i+1) above 1e-6·σ_1) | {m['numerical_rank']} |",
        f"| threshold rank (σ_i > σ_1·max(N,V')·eps) | {m['threshold_rank']} |",
        f"| effective rank (Roy & Vetterli) | {_fmt(m['effective_rank'])} |",
        f"| stable rank ‖T‖_F²/σ_1² | {_fmt(m['stable_rank'])} |",
        f"| energy ‖T‖_F² (streamed, fp64) | {_fmt(spec.energy, 8)} |",
        f"| off-model energy 1 − Σσ²/‖T‖_F² | {_fmt(m['off_model_energy'])} |",
        f"| teacher NLL on the rows (nats) | {_fmt(meta.get('nll'))} |",
        f"| teacher perplexity | {_fmt(meta.get('perplexity'))} |",
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
            lines.append(f"| {n:,} | {_fmt(r.get('0.5'))} | {_fmt(r.get('0.1'))} | {_fmt(r.get('0.01'))} | "
                         f"{c['numerical_rank']} | {_fmt(c['effective_rank'])} |")
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


def write_report(out: Path, spec: Spectrum, *, config: dict, prov: dict) -> Path:
    """Write the PNGs and report.md into the run folder ``out``."""
    out = Path(out)
    title = f"{spec.meta.get('teacher', '')} · {spec.space} · {spec.route}"
    plots = {"singular spectrum": "spectrum.png", "W-error curve": "w_error.png"}
    plot_spectrum(spec, out / "spectrum.png", title)
    plot_w_error([(f"{spec.space} ({spec.route})", spec)], out / "w_error.png", title)
    if spec.convergence:
        plot_convergence(spec, out / "convergence.png", title)
        plots["convergence"] = "convergence.png"
    path = out / "report.md"
    write_text_atomic(path, render_markdown(spec, config=config, prov=prov, plots=plots))
    return path


def compare_runs(folders: Sequence[Path], out: Path) -> Path:
    """One W-error plot and one rank_at table for several run folders."""
    import json

    specs = []
    for folder in folders:
        spec = read_spectrum_h5(Path(folder) / "results.h5")
        from rankest.targets.ngram import ngram_label

        ng = ngram_label(spec.meta)
        specs.append((f"{spec.meta.get('teacher', Path(folder).name)}{ng} {spec.space}/{spec.route}", spec))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    from rankest.targets.ngram import draw_paper_fig7, ngram_compare_lines

    fig7 = any(str(s.meta.get("teacher", "")).startswith("ngram:") and s.space == "prob" for _, s in specs)
    plot_w_error(specs, out / "compare_w_error.png", "W-error curves", decorate=draw_paper_fig7 if fig7 else None)
    lines = ["# rankest comparison", "", "![W-error curves](compare_w_error.png)", "",
             "| run | N | V' | rank_at(0.5) | rank_at(0.1) | rank_at(0.01) | numerical rank |", "|---|---|---|---|---|---|---|"]
    for (label, spec), folder in zip(specs, folders):
        r = {str(e): spec.rank_at(e) for e in REPORTED_EPS}
        lines.append(f"| {label} (`{folder}`) | {spec.n_rows:,} | {spec.n_cols:,} | {_fmt(r['0.5'])} | {_fmt(r['0.1'])} | "
                     f"{_fmt(r['0.01'])} | {spec.numerical_rank} |")
    lines += ngram_compare_lines(specs, folders)
    path = out / "compare.md"
    write_text_atomic(path, "\n".join(lines) + "\n")
    (out / "compare.json").write_text(json.dumps({label: spec.summary() for label, spec in specs}, indent=2))
    return path
