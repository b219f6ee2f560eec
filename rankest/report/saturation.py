"""The saturation report: ``saturation.md`` and its figures (Godey et al. 2024, Fig. 1–5 in one place).

* ``saturation_curves.png`` — the metric against the training step (log axis) per model, the
  best checkpoint starred and the saturation onset dashed; beside it the late stretch relative
  to each model's best;
* ``saturation_law.png`` — final (●) and best (▲) values against N (log axis), the fitted law
  and its bootstrap band; the models the law was fitted on filled, the others hollow;
* ``saturation_deviation.png`` — each model's relative distance from the law at its final and
  best checkpoints, beside the paper's ≈ 8% / ≈ 4% for the small Pythias when every model is a
  Pythia;
* ``saturation_diagnostics.png`` — when measured (``--diagnostics``): the metric, the head's
  singular entropy and the last layer's anisotropy against the step, on one step axis, so
  saturation, spectral collapse and anisotropy are seen together;
* ``saturation_head_spectra.png`` — when measured: σ_i/σ_0 of the head per model, one line per
  checkpoint coloured by step (Fig. 4);
* ``saturation_frequency.png`` — when measured: the share of each top singular direction's mass
  on the 1% / 10% most frequent tokens, at each model's last checkpoint, against the share of a
  direction spread evenly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from rankest.io.files import write_text_atomic
from rankest.report.plots import _plt, _save
from rankest.report.text import fmt

__all__ = ["write_saturation_report"]


def _pos(steps) -> np.ndarray:
    """Steps on a log axis: step 0 is drawn at step 1 (stated in the axis label)."""
    return np.maximum(np.asarray(steps, dtype=float), 1.0)


def plot_curves(record: dict, path: Path) -> None:
    """Left: the whole of training (log y when the values span more than a decade). Right: the
    last stretch (steps ≥ 1/20 of the last) relative to each model's best, where saturation shows."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    values = np.concatenate([np.asarray(m["values"], dtype=float) for m in record["models"].values()])
    last = max(max(m["steps"]) for m in record["models"].values())
    for i, (name, m) in enumerate(record["models"].items()):
        c = f"C{i % 10}"
        x, y = _pos(m["steps"]), np.asarray(m["values"], dtype=float)
        late = x >= last / 20
        rel = 100 * (y / m["best"] - 1) if m["best"] else np.full_like(y, np.nan)
        for ax, keep, yy, star in ((axes[0], np.ones_like(late), y, m["best"]), (axes[1], late, rel, 0.0)):
            ax.plot(x[keep], yy[keep], marker="o", ms=2.5, lw=1.1, color=c,
                    label=name + (" (saturates)" if m["saturated"] else ""))
            if keep[list(m["steps"]).index(m["best_step"])]:
                ax.plot(_pos([m["best_step"]]), [star], marker="*", ms=10, color=c, ls="none")
            if m["onset_step"] is not None:
                ax.axvline(_pos([m["onset_step"]])[0], color=c, ls="--", lw=0.8)
    if values.min() > 0 and values.max() / values.min() > 10:
        axes[0].set_yscale("log")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("training step (log; step 0 drawn at 1)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(record["metric"])
    axes[1].set_ylabel("relative to the model's best (%)")
    axes[0].set_title("metric across checkpoints (★ best, -- saturation onset)", fontsize=9)
    axes[1].set_title(f"late training (steps ≥ {last / 20:,.0f})", fontsize=9)
    axes[1].set_xlim(last / 20 / 1.2, last * 1.2)
    axes[0].legend(fontsize=7)
    _save(fig, path)


def plot_law(record: dict, fit, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ns = np.array([m["n_params"] for m in record["models"].values()], dtype=float)
    grid = np.geomspace(ns.min() / 1.5, ns.max() * 1.5, 200)
    lo, hi = fit.predict_interval(grid)
    ax.fill_between(grid, lo, hi, color="0.8", label=f"{fit.confidence:.0%} bootstrap band")
    f = record["fit"]
    ax.plot(grid, fit.predict(grid), color="k", lw=1.2,
            label=f"L(N) = {f['E']:.3g} + {f['A']:.3g}·N^(−{f['alpha']:.3g})")
    for i, (name, m) in enumerate(record["models"].items()):
        c = f"C{i % 10}"
        face = c if m["in_fit"] else "none"
        ax.plot([m["n_params"]], [m["final"]], "o", mfc=face, mec=c, ms=7, label=name)
        ax.plot([m["n_params"]], [m["best"]], "^", mfc=face, mec=c, ms=6)
    ax.set_xscale("log")
    ax.set_xlabel(f"parameters N ({record['param_count'].replace('_', '-')})")
    ax.set_ylabel(record["metric"])
    ax.set_title(f"scaling law fitted on {', '.join(record['fit_on'])} ({record['fit_at']} checkpoints)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    _save(fig, path)


def plot_deviation(record: dict, path: Path) -> None:
    plt = _plt()
    names = list(record["models"])
    fig, ax = plt.subplots(figsize=(max(5, 0.8 * len(names) + 2), 4))
    x = np.arange(len(names))
    for off, key, c in ((-0.2, "final", "C3"), (0.2, "best", "C0")):
        d = np.array([record["models"][n][f"deviation_{key}"] for n in names]) * 100
        iv = np.array([record["models"][n][f"deviation_{key}_interval"] for n in names]) * 100
        ax.bar(x + off, d, width=0.4, color=c, label=f"{key} checkpoint")
        # A percentile interval need not contain the point estimate: clip the bars at it.
        ax.errorbar(x + off, d, yerr=[np.maximum(d - iv[:, 0], 0), np.maximum(iv[:, 1] - d, 0)], fmt="none",
                    ecolor="k", lw=0.8)
    paper = record.get("paper")
    if paper:
        ax.axhline(paper["deviation_final"] * 100, color="C3", ls=":", label="paper, final (≈ 8%)")
        ax.axhline(paper["deviation_best"] * 100, color="C0", ls=":", label="paper, best (≈ 4%)")
    for key, c in (("final", "C3"), ("best", "C0")):
        mean = record.get(f"mean_deviation_{key}_outside_fit")
        if mean is not None:
            ax.axhline(mean * 100, color=c, ls="--", lw=0.9, label=f"ours, {key}: mean outside the fit ({mean:+.1%})")
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("worse than the law by (%)")
    ax.set_title("relative deviation from the scaling law (positive = worse)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    _save(fig, path)


def plot_diagnostics(record: dict, path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(3, 1, figsize=(7, 8), sharex=True)
    for i, (name, m) in enumerate(record["models"].items()):
        if "head_singular_entropy_kl" not in m:
            continue
        c, x = f"C{i % 10}", _pos(m["steps"])
        axes[0].plot(x, m["values"], marker="o", ms=3, color=c, label=name)
        axes[1].plot(x, m["head_singular_entropy_kl"], marker="o", ms=3, color=c)
        axes[1].axhline(m["head_singular_entropy_max"][-1], color=c, ls=":", lw=0.7)
        axes[2].plot(x, m["last_layer_anisotropy"], marker="o", ms=3, color=c)
        for ax in axes:
            if m["onset_step"] is not None:
                ax.axvline(_pos([m["onset_step"]])[0], color=c, ls="--", lw=0.7)
    axes[0].set_ylabel(record["metric"])
    axes[1].set_ylabel("head singular entropy\nKL(σ/Σσ ‖ u) (: log k)")
    axes[2].set_ylabel("last-layer anisotropy")
    axes[2].set_xscale("log")
    axes[2].set_xlabel("training step (log; step 0 drawn at 1)")
    axes[0].legend(fontsize=7)
    for ax in axes:
        ax.grid(alpha=0.3)
    _save(fig, path)


def plot_head_spectra(record: dict, path: Path) -> None:
    """σ_i/σ_0 of the head's top singular values, one panel per model, one line per checkpoint
    (coloured by step): the flat spectrum collapsing into a spike (the paper's Fig. 4)."""
    plt = _plt()
    names = [n for n, m in record["models"].items() if "head_sigma_ratio" in m]
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names) + 1, 3.4), sharey=True, squeeze=False)
    cmap = plt.get_cmap("viridis")
    for ax, name in zip(axes[0], names):
        m = record["models"][name]
        for j, (step, ratio) in enumerate(zip(m["steps"], m["head_sigma_ratio"])):
            r = np.asarray(ratio, dtype=float)
            r = r[r > 0]
            ax.semilogy(np.arange(1, r.size + 1), r, color=cmap(j / max(len(m["steps"]) - 1, 1)), lw=1,
                        label=f"step {step}" if j in (0, len(m["steps"]) - 1) else None)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("singular value index i")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    axes[0][0].set_ylabel("σ_i / σ_0 of the head")
    _save(fig, path)


def plot_frequency(record: dict, path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for i, (name, m) in enumerate(record["models"].items()):
        if "freq_share_top1pct" not in m:
            continue
        for ax, key, frac in ((axes[0], "freq_share_top1pct", 0.01), (axes[1], "freq_share_top10pct", 0.10)):
            share = np.asarray(m[key][-1])
            ax.plot(np.arange(1, share.size + 1), share, marker="o", ms=3, color=f"C{i % 10}",
                    label=f"{name} @ step {m['steps'][-1]}")
            ax.axhline(frac, color="0.5", ls=":", lw=0.8)
            ax.set_title(f"mass on the {frac:.0%} most frequent tokens (: spread evenly)", fontsize=9)
            ax.set_xlabel("singular direction j of the head")
    axes[0].set_ylabel("Σ_{v ∈ frequent} u_jv²")
    axes[0].legend(fontsize=7)
    _save(fig, path)


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:+.1f}%"


def saturation_markdown(record: dict, figures: list[str]) -> str:
    f = record["fit"]
    iv = f["intervals"]
    better = "lower" if record["lower_is_better"] else "higher"
    lines = [f"# Saturation: {record['metric']} ({better} is better)", "",
             f"Scaling law L(N) = E + A·N^(−α), N = {record['param_count'].replace('_', '-')} parameters, fitted by "
             f"{'weighted (1/stderr²)' if f['weighted'] else 'unweighted'} least squares on the {record['fit_at']} "
             f"checkpoints of {', '.join(record['fit_on'])}"
             f"{' (the models that do not saturate)' if record['fit_on_default'] else ''}; "
             f"{f['confidence']:.0%} {f['bootstrap']} bootstrap intervals ({f['n_boot']} resamples):", "",
             "| parameter | value | interval |", "|---|---|---|"]
    for k, name in (("E", "E"), ("A", "A"), ("alpha", "α")):
        lines.append(f"| {name} | {fmt(f[k])} | [{fmt(iv[k][0])}, {fmt(iv[k][1])}] |")
    if f["alpha_at_bound"]:
        lines += ["", f"α lies at the edge of the searched range {f['alpha_range']}: the law is poorly determined."]
    lines += ["", "| model | N total | N non-emb. | final (step) | best (step) | onset | saturated | deviation final "
              "| deviation best | in fit |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in record["models"].items():
        lines.append(f"| {name} | {m['params_total']:,} | {m['params_non_embedding']:,} | {fmt(m['final'])} "
                     f"({m['final_step']}) | {fmt(m['best'])} ({m['best_step']}) | "
                     f"{'—' if m['onset_step'] is None else m['onset_step']} | {'yes' if m['saturated'] else 'no'} | "
                     f"{_pct(m['deviation_final'])} | {_pct(m['deviation_best'])} | {'yes' if m['in_fit'] else ''} |")
    lines += ["", "Deviation = (value − L(N))/|L(N)|, signed so that positive is worse than the law. Onset: the first "
              "checkpoint after the best from which every later one is worse than the best by more than "
              "onset-sigma standard errors (the files' own, or the curve's scatter when they state none).", ""]
    if record["saturated"]:
        lines.append(f"Saturating: {', '.join(record['saturated'])}.")
    else:
        lines.append("No model saturates.")
    lines.append(f"Mean deviation of the models outside the fit: final {_pct(record['mean_deviation_final_outside_fit'])}"
                 f", best {_pct(record['mean_deviation_best_outside_fit'])}.")
    if record.get("paper"):
        p = record["paper"]
        lines.append(f"The paper ({p['source']}) reports ≈ {p['deviation_final']:.0%} at the final and ≈ "
                     f"{p['deviation_best']:.0%} at the best checkpoints of the small Pythias (averaged over tasks).")
    lines.append("")
    lines += [f"![{Path(g).stem}]({g})" for g in figures]
    return "\n".join(lines) + "\n"


def write_saturation_report(folder: Path, record: dict[str, Any], fit) -> Path:
    """Draw the figures into ``folder`` and write ``saturation.md``; returns its path."""
    folder = Path(folder)
    figures = ["saturation_curves.png", "saturation_law.png", "saturation_deviation.png"]
    plot_curves(record, folder / figures[0])
    plot_law(record, fit, folder / figures[1])
    plot_deviation(record, folder / figures[2])
    if any("head_singular_entropy_kl" in m for m in record["models"].values()):
        figures += ["saturation_diagnostics.png", "saturation_head_spectra.png", "saturation_frequency.png"]
        plot_diagnostics(record, folder / figures[3])
        plot_head_spectra(record, folder / figures[4])
        plot_frequency(record, folder / figures[5])
    path = folder / "saturation.md"
    write_text_atomic(path, saturation_markdown(record, figures))
    return path
