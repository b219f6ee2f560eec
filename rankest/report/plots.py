"""The figures of a spectrum: singular values, the W-error curve, convergence with N.

matplotlib is imported when a figure is drawn (a heavy import that runs without a display
through the Agg backend), not when rankest is imported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from rankest.io.files import atomic_path
from rankest.spectrum import REPORTED_EPS, Spectrum, metric_value


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    _plt().close(fig)


def plot_spectrum(spec: Spectrum, path: Path, title: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    s = spec.sigma[spec.sigma > 0]
    if s.size:
        ax.semilogy(np.arange(1, s.size + 1), s / s[0], lw=1.2)
    if spec.numerical_rank is not None:  # a truncated spectrum without a certified cliff has none
        ax.axvline(spec.numerical_rank, color="C3", ls="--", lw=0.8, label=f"numerical rank {spec.numerical_rank}")
    ax.set_xlabel("index i")
    ax.set_ylabel("σ_i / σ_1")
    ax.set_title(title)
    if ax.get_legend_handles_labels()[0]:
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


def _known(v) -> float:
    """A convergence value to draw: NaN for a bound (a truncated spectrum's tail decides it)."""
    v = metric_value(v)
    return np.nan if v is None else v


def plot_convergence(spec: Spectrum, path: Path, title: str) -> None:
    plt = _plt()
    ns = sorted(spec.convergence)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for eps in REPORTED_EPS:
        vals = [spec.convergence[n]["rank_at"].get(str(eps)) for n in ns]
        axes[0].plot(ns, [_known(v) for v in vals], marker="o", label=f"rank_at({eps})")
    axes[0].plot(ns, [_known(spec.convergence[n]["numerical_rank"]) for n in ns], marker="s", ls="--",
                 label="numerical rank")
    axes[0].set_xscale("log")
    axes[0].set_xlabel("rows N")
    axes[0].set_ylabel("rank")
    axes[0].legend(fontsize=8)
    axes[1].plot(ns, [_known(spec.convergence[n]["effective_rank"]) for n in ns], marker="o", label="effective rank")
    axes[1].plot(ns, [spec.convergence[n]["stable_rank"] for n in ns], marker="s", label="stable rank")
    axes[1].set_xscale("log")
    axes[1].set_xlabel("rows N")
    axes[1].legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    _save(fig, path)
