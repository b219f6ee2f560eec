"""The figures of a spectrum: singular values, the W-error curve, convergence with N; and the
helpers every figure of a report shares (titles that say what was run, axes of row counts).

matplotlib is imported when a figure is drawn (a heavy import that runs without a display
through the Agg backend), not when rankest is imported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from rankest.io.files import atomic_path
from rankest.spectrum import REPORTED_EPS, Spectrum, metric_value

#: Line style of each reported threshold ε on a W-error plot (REPORTED_EPS order).
EPS_STYLES = ("--", "-.", ":")


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    _plt().close(fig)


# ---- titles ------------------------------------------------------------------------------------
def short_name(name) -> str:
    """A teacher or corpus as a title names it: a local path by its last component (a Hub id such
    as ``EleutherAI/pythia-1b`` and a short name stay whole); several corpora joined by ', '."""
    if isinstance(name, (list, tuple)):
        return ", ".join(short_name(n) for n in name)
    text = str(name or "?")
    if text.startswith(("/", "./", "../", "~")) or text.count("/") > 1:
        return Path(text.rstrip("/")).name or text
    return text


def run_title(what: str, meta: dict, detail: str = "") -> str:
    """``"WHAT — TEACHER on CORPUS"`` and, on a second line, ``detail`` (what was measured, how)."""
    head = f"{what} — {short_name(meta.get('teacher'))}"
    if meta.get("corpus"):
        head += f" on {short_name(meta.get('corpus'))}"
    return head + (f"\n{detail}" if detail else "")


def spectrum_detail(spec: Spectrum) -> str:
    """The second title line of an estimate's figures: space, route, N × V' (and the n-gram model)."""
    m = spec.meta
    ngram = f", {m.get('smoothing')} smoothing" if "contexts" in m else ""
    return f"{spec.space} space, {spec.route} route{ngram}, N = {spec.n_rows:,} rows × V' = {spec.n_cols:,}"


def _compact(n: float) -> str:
    """A row count as a tick label: 512, 2,048, 16,384, 131k, 1.05M."""
    n = float(n)
    if n < 100_000:
        return f"{n:,.0f}"
    if n < 1_000_000:
        return f"{n / 1e3:.0f}k"
    return f"{n / 1e6:.3g}M"


def rows_axis(ax, ns: Sequence[int], max_ticks: int = 5) -> None:
    """A log x axis of row counts with ticks only at (at most ``max_ticks`` of) the measured N,
    written in full: no minor-tick labels to run into each other ("3×10⁴×10³")."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter, NullLocator

    ax.set_xscale("log")
    ns = sorted(ns)
    keep = ns if len(ns) <= max_ticks else [ns[int(round(i))] for i in np.linspace(0, len(ns) - 1, max_ticks)]
    ax.xaxis.set_major_locator(FixedLocator(keep))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: _compact(x)))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())
    if len(ns) > 1:
        ax.set_xlim(ns[0] / 1.25, ns[-1] * 1.25)


# ---- an estimate's figures -----------------------------------------------------------------------
def plot_spectrum(spec: Spectrum, path: Path, title: str) -> None:
    """σ_i/σ_1 on a log scale, the numerical rank marked."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    s = spec.sigma[spec.sigma > 0]
    if s.size:
        ax.semilogy(np.arange(1, s.size + 1), s / s[0], lw=1.2, label="σ_i / σ_1")
    if spec.numerical_rank is not None:  # a truncated spectrum without a certified cliff has none
        ax.axvline(spec.numerical_rank, color="C3", ls="--", lw=0.8, label=f"numerical rank {spec.numerical_rank}")
    ax.set_xlabel("index i")
    ax.set_ylabel("σ_i / σ_1 (log scale)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, path)


def plot_w_error(specs: Sequence[tuple[str, Spectrum]], path: Path, title: str, decorate=None) -> None:
    """W-error(d) of each spectrum on a log d axis, the thresholds ε of REPORTED_EPS drawn and
    labelled, and each curve's rank_at(ε) marked (with its value, for a single curve).

    ``decorate(ax)``, when given, draws reference marks (e.g. the paper's points) before saving.
    """
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.8, 4.4))
    single = len(specs) == 1
    for i, (label, spec) in enumerate(specs):
        _w_error_curve(ax, label, spec, f"C{i % 10}", annotate=single)
    for eps, style in zip(REPORTED_EPS, EPS_STYLES):
        text = f"W-error = {eps}"
        if single:
            d = specs[0][1].rank_at(eps)
            text += f": rank_at({eps}) = {d}" if d is not None else f": not reached within d ≤ {specs[0][1].sigma.size}"
        ax.axhline(eps, color="0.35", lw=0.8, ls=style, label=text)
    if not single and specs:
        ax.plot([], [], "o", color="0.3", ms=5, label="rank_at(ε) of each curve")
    ax.set_xscale("log")
    ax.set_xlabel("d (rank kept, log scale)")
    ax.set_ylabel("W-error(d) (relative Frobenius error)")
    ax.set_ylim(0, 1.02)
    ax.set_title(title, fontsize=10)
    if decorate is not None:
        decorate(ax)
    if len(ax.get_legend_handles_labels()[1]) > 7:  # many entries: beside the axes, off the curves and marks
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.legend(fontsize=7, loc="upper right")
    ax.grid(alpha=0.3)
    _save(fig, path)


def _w_error_curve(ax, label: str, spec: Spectrum, colour: str, *, annotate: bool) -> None:
    w = spec.w_error()
    d = np.arange(1, w.size + 1)
    trusted = spec.meta.get("trusted_d")
    if trusted is not None and trusted < w.size:  # a sketch's curve is greyed beyond trusted_d
        ax.plot(d[:trusted], w[:trusted], color=colour, label=label)
        ax.plot(d[trusted - 1:], w[trusted - 1:], color="0.7", ls=":", label=f"{label} (beyond trusted d)")
    else:
        ax.plot(d, w, color=colour, label=label)
    for eps in REPORTED_EPS:
        r = spec.rank_at(eps)
        if r is None or r < 1:
            continue
        ax.plot([r], [w[r - 1]], "o", color=colour, ms=5, zorder=3)
        if annotate:
            ax.vlines(r, 0, w[r - 1], color=colour, lw=0.6, ls=":")
            ax.annotate(f"d = {r}", (r, w[r - 1]), textcoords="offset points", xytext=(4, 4), fontsize=7,
                        color=colour)


def _known(v) -> float:
    """A convergence value to draw: NaN for a bound (a truncated spectrum's tail decides it)."""
    v = metric_value(v)
    return np.nan if v is None else float(v)


def plot_convergence(spec: Spectrum, path: Path, title: str) -> None:
    """rank_at / numerical rank, effective rank and stable rank against N, each on its own axis
    (a stable rank of ≈ 2 beside an effective rank of ≈ 400 would draw as a flat line)."""
    plt = _plt()
    ns = sorted(spec.convergence)
    conv = [spec.convergence[n] for n in ns]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.4))
    ax = axes[0]
    for eps in REPORTED_EPS:
        vals = [c["rank_at"].get(str(eps)) for c in conv]
        ax.plot(ns, [_known(v) for v in vals], marker="o", label=f"rank_at({eps})")
    ax.plot(ns, [_known(c["numerical_rank"]) for c in conv], marker="s", ls="--", label="numerical rank")
    ax.set_ylabel("rank d")
    ax.set_title("ranks of the W-error curve", fontsize=9)
    ax.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.24))  # below: off the curves
    for ax, key, colour, marker, ylabel, name in (
            (axes[1], "effective_rank", "C4", "o", "effective rank (Roy & Vetterli)", "effective rank exp H(σ/Σσ)"),
            (axes[2], "stable_rank", "C5", "s", "stable rank ‖T‖_F² / σ_1²", "stable rank")):
        vals = [_known(c[key]) for c in conv]
        ax.plot(ns, vals, marker=marker, color=colour)
        ax.set_ylim(0, 1.15 * np.nanmax(vals + [1e-12]))  # from 0: a 1% wiggle must not look like a trend
        ax.set_ylabel(ylabel)
        ax.set_title(name + _last_change(vals), fontsize=9)
    for ax in axes:
        rows_axis(ax, ns)
        ax.set_xlabel("rows N (log scale)")
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save(fig, path)


def _last_change(vals: Sequence[float]) -> str:
    """', last step +x%' (the change over the last N of the convergence record), '' for one N."""
    if len(vals) < 2 or not vals[-2] or not np.isfinite(vals[-2:]).all():  # a bound is not a change
        return ""
    return f" — last step {100 * (vals[-1] - vals[-2]) / abs(vals[-2]):+.1f}%"


def estimate_plots(spec: Spectrum, out: Path, *, title: Optional[str] = None) -> dict[str, str]:
    """spectrum.png, w_error.png and (with a convergence record) convergence.png in ``out``;
    returns {caption: file name}."""
    detail = spectrum_detail(spec)
    plot_spectrum(spec, out / "spectrum.png", title or run_title("Singular spectrum", spec.meta, detail))
    plot_w_error([(f"{spec.space} ({spec.route})", spec)], out / "w_error.png",
                 title or run_title("W-error curve", spec.meta, detail))
    plots = {"singular spectrum": "spectrum.png", "W-error curve": "w_error.png"}
    if spec.convergence:
        plot_convergence(spec, out / "convergence.png", title or run_title("Convergence with the number of rows",
                                                                           spec.meta, detail))
        plots["convergence"] = "convergence.png"
    return plots
