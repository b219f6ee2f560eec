"""Plots and the report.md section of the representation diagnostics (:mod:`rankest.diagnostics`).

* ``anisotropy.png`` — anisotropy against layer depth, one line per checkpoint (Godey et al.
  2024, Fig. 2), beside the share of variance in the first principal direction;
* ``head_sigma_heatmap.png`` — σ_i/σ_0 of the head's top singular values, one row per
  checkpoint (Fig. 4);
* ``head_singular_entropy.png`` — KL(σ̂ ‖ uniform) across checkpoints (Fig. 5), with the
  σ²-normalised variant and the ceiling log k;
* ``head_spectrum.png`` — for a single model, in place of those two (a one-row heat map and a
  one-point line say nothing): σ_i/σ_0 itself and the W-error of the head's own truncation.

The section is written between markers in ``DIR/report.md``, so it is replaced on a rerun and
an `estimate` report in the same folder keeps its own content.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

import numpy as np

from rankest.io.files import write_text_atomic
from rankest.report.plots import _plt, _save, short_name
from rankest.report.text import fmt

__all__ = ["plot_anisotropy", "plot_head_heatmap", "plot_singular_entropy", "plot_head_spectrum", "anisotropy_markdown",
           "head_spectrum_markdown", "write_section", "write_diagnostics_report"]


def _short(label: str, width: int = 28) -> str:
    label = short_name(label)
    return label if len(label) <= width else "…" + label[-(width - 1):]


def plot_anisotropy(results: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    """Anisotropy (left) and first-principal-direction variance share (right) vs layer depth."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, (label, r) in enumerate(results.items()):
        depth = np.asarray(r["depth"])
        axes[0].plot(depth, np.asarray(r["anisotropy"]), marker="o", ms=3, color=f"C{i % 10}", label=_short(label))
        share = np.asarray(r.get("pc1_variance_share", np.full(depth.shape, np.nan)), dtype=float)
        if np.isfinite(share).any():
            axes[1].plot(depth, share, marker="o", ms=3, color=f"C{i % 10}", label=_short(label))
    if not any(line for line in axes[1].get_lines()):
        axes[1].text(0.5, 0.5, "not computed (run without the PCA)", ha="center", va="center",
                     transform=axes[1].transAxes, color="0.4")
    axes[0].set_ylabel("anisotropy (mean pairwise cosine)")
    axes[1].set_ylabel("variance share of PC1")
    for ax in axes:
        ax.set_xlabel("layer depth (0 = embeddings, 1 = last)")
        ax.set_xlim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    axes[0].set_title("mean pairwise cosine (Fig. 2)", fontsize=9)
    axes[1].set_title("share of variance in the 1st principal direction", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save(fig, path)


def plot_head_heatmap(results: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    """Heat map of σ_i/σ_0 (log colour scale), rows = checkpoints, columns = i."""
    from matplotlib.colors import LogNorm

    plt = _plt()
    labels = list(results)
    width = max(len(np.asarray(r["head_sigma_ratio"])) for r in results.values())
    grid = np.full((len(labels), width), np.nan)
    for row, r in enumerate(results.values()):
        ratio = np.asarray(r["head_sigma_ratio"], dtype=float)
        grid[row, : ratio.size] = ratio
    positive = grid[np.isfinite(grid) & (grid > 0)]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(labels) + 1.8))
    im = ax.imshow(np.where(grid > 0, grid, np.nan), aspect="auto", interpolation="nearest", cmap="viridis",
                   norm=LogNorm(vmin=max(float(positive.min()), 1e-6), vmax=1.0) if positive.size else None)
    ax.set_yticks(range(len(labels)), [_short(s) for s in labels], fontsize=7)
    ax.set_xlabel("singular value index i")
    ax.set_ylabel("checkpoint / model")
    fig.colorbar(im, ax=ax, label="σ_i / σ_0")
    ax.set_title(title, fontsize=10)
    _save(fig, path)


def plot_singular_entropy(results: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    """KL(σ̂‖u) with σ̂ = σ/Σσ (the paper's singular entropy) and with σ²/Σσ², per checkpoint."""
    plt = _plt()
    labels = list(results)
    x = np.arange(len(labels))
    kl = [r["head_singular_entropy_kl"] for r in results.values()]
    kl_sq = [r["head_singular_entropy_kl_sq"] for r in results.values()]
    ceiling = [r["head_singular_entropy_max"] for r in results.values()]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.6 * len(labels) + 3), 3.8))
    ax.plot(x, kl, marker="o", label="KL(σ/Σσ ‖ uniform) — paper's Fig. 5")
    ax.plot(x, kl_sq, marker="s", ls="--", label="KL(σ²/Σσ² ‖ uniform)")
    top = 1.2 * max(kl + kl_sq + [1e-12])
    if max(ceiling) <= top:  # the ceiling only where it does not flatten the curves
        ax.plot(x, ceiling, color="0.5", ls="none", marker="_", ms=14, label="log k (one spike)")
    else:
        ax.plot([], [], " ", label=f"ceiling log k = {fmt(float(min(ceiling)), 3)}"
                + (f"…{fmt(float(max(ceiling)), 3)}" if max(ceiling) > min(ceiling) else "") + " (one spike), off the axis")
        ax.set_ylim(0, top)
    ax.set_xticks(x, [_short(s, 24) for s in labels], rotation=30, ha="right", fontsize=7)
    ax.set_xlabel("checkpoint")
    ax.set_ylabel("singular entropy KL (nats)")
    ax.set_ylim(bottom=0)  # 0 = a flat spectrum
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=10)
    _save(fig, path)


def plot_head_spectrum(label: str, r: dict[str, Any], path: Path, title: str) -> None:
    """One model's head: σ_i/σ_0 against i (log scale, singular entropy in the legend) beside the
    W-error of its own rank-d truncation (weight space, rank_at marked)."""
    plt = _plt()
    s = np.asarray(r["head_sigma"], dtype=float)
    w = np.asarray(r["head_w_error"], dtype=float)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    ax.semilogy(np.arange(s.size), s / s[0] if s.size and s[0] > 0 else s, lw=1.3,
                label=f"σ_i / σ_0 of {_short(label)}")
    ax.plot([], [], " ", label=f"singular entropy KL(σ/Σσ‖u) = {fmt(float(r['head_singular_entropy_kl']))} nats "
                              f"(max log k = {fmt(float(r['head_singular_entropy_max']))})")
    ax.plot([], [], " ", label=f"effective rank {fmt(float(r['head_effective_rank']))} of k = {s.size}")
    ax.set_xlabel("singular value index i")
    ax.set_ylabel("σ_i / σ_0 (log scale)")
    ax.set_title("singular spectrum of the head (Fig. 4)", fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[1]
    d = np.arange(1, w.size + 1)
    ax.plot(d, w, lw=1.3, color="C1", label="W-error of the rank-d truncation")
    for eps, style in zip((0.5, 0.1), ("--", "-.")):
        hit = np.nonzero(w <= eps)[0]
        text = f"W-error = {eps}" + (f": d = {hit[0] + 1}" if hit.size else "")
        ax.axhline(eps, color="0.35", lw=0.8, ls=style, label=text)
        if hit.size:
            ax.plot([hit[0] + 1], [w[hit[0]]], "o", color="C1", ms=5)
    ax.set_xlabel("d (rank kept)")
    ax.set_ylabel("W-error(d) of the head matrix")
    ax.set_ylim(0, 1.02)
    ax.set_title("the head's own truncation (weight space)", fontsize=9)
    ax.legend(fontsize=7)
    for a in axes:
        a.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save(fig, path)


def anisotropy_markdown(results: dict[str, dict[str, Any]], plot: Optional[str]) -> list[str]:
    lines = ["## Anisotropy per layer", "",
             "Mean pairwise cosine similarity A(H) = (‖Σĥ_i‖² − n)/(n² − n) of each layer's token representations "
             "(exact, streamed in fp64), the mean norm and the variance share of the first principal direction. "
             "Depth 0 is the embedding output, depth l/L the output of block l; the last depth is the head's "
             "input (after the final norm) when `last_is_head_input` is true.", ""]
    if plot:
        lines += [f"![anisotropy vs depth]({plot})", ""]
    lines += ["| checkpoint | rows | layers | last-layer anisotropy | max anisotropy (depth) | last-layer PC1 share | "
              "last-layer mean norm | last = head input |", "|---|---|---|---|---|---|---|---|"]
    for label, r in results.items():
        a = np.asarray(r["anisotropy"], dtype=float)
        share = np.asarray(r.get("pc1_variance_share", [np.nan]), dtype=float)
        i = int(np.nanargmax(a)) if np.isfinite(a).any() else 0
        lines.append(f"| {label} | {int(np.asarray(r['n_rows'])):,} | {a.size} | {fmt(float(a[-1]))} | "
                     f"{fmt(float(a[i]))} ({float(np.asarray(r['depth'])[i]):.2f}) | {fmt(float(share[-1]))} | "
                     f"{fmt(float(np.asarray(r['mean_norm'])[-1]))} | {r.get('last_is_head_input')} |")
    lines.append("")
    for label, r in results.items():
        lines += [f"<details><summary>{label}: every layer</summary>", "",
                  "| depth | width | anisotropy | mean norm | PC1 share |", "|---|---|---|---|---|"]
        cols = (r["depth"], r["width"], r["anisotropy"], r["mean_norm"],
                r.get("pc1_variance_share", np.full(len(r["depth"]), np.nan)))
        for dep, wid, a, nrm, sh in zip(*(np.asarray(c) for c in cols)):
            lines.append(f"| {float(dep):.3f} | {int(wid)} | {fmt(float(a))} | {fmt(float(nrm))} | {fmt(float(sh))} |")
        lines += ["", "</details>", ""]
    return lines


def head_spectrum_markdown(results: dict[str, dict[str, Any]], plots: dict[str, str]) -> list[str]:
    lines = ["## Output head spectrum", "",
             "Singular values of the LM head over its real-vocabulary rows (fp64 SVD). Singular entropy "
             "KL(σ̂ ‖ uniform) = log k − H(σ̂) in nats, σ̂ = σ/Σσ (the paper's) and σ²/Σσ² (energy-weighted); "
             "0 = flat spectrum, log k = a single direction. W-error(d) of the head's own rank-d truncation "
             "(weight space).", ""]
    for name, fname in plots.items():
        lines += [f"![{name}]({fname})", ""]
    lines += ["| checkpoint | V' × d | σ_0 | σ_10/σ_0 | σ_99/σ_0 | singular entropy KL(σ/Σσ) | KL(σ²/Σσ²) | log k | "
              "effective rank | W-error(d/4) | W-error(d/2) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, r in results.items():
        s = np.asarray(r["head_sigma"], dtype=float)
        ratio = np.asarray(r["head_sigma_ratio"], dtype=float)
        w = np.asarray(r["head_w_error"], dtype=float)
        k = s.size

        def at(arr, i):
            return fmt(float(arr[i])) if i < arr.size else "—"

        lines.append(f"| {label} | {r['head_n_rows']:,} × {r['head_n_cols']} | {fmt(float(s[0]))} | {at(ratio, 10)} | "
                     f"{at(ratio, 99)} | {fmt(r['head_singular_entropy_kl'])} | {fmt(r['head_singular_entropy_kl_sq'])} | "
                     f"{fmt(r['head_singular_entropy_max'])} | {fmt(r['head_effective_rank'])} | "
                     f"{at(w, max(k // 4, 1) - 1)} | {at(w, max(k // 2, 1) - 1)} |")
    lines.append("")
    return lines


def write_section(out, name: str, lines: list[str]) -> Path:
    """Put ``lines`` between ``<!-- rankest:name -->`` markers in DIR/report.md (replace or append)."""
    path = Path(out) / "report.md"
    begin, end = f"<!-- rankest:{name} -->", f"<!-- /rankest:{name} -->"
    block = "\n".join([begin, *lines, end])
    text = path.read_text() if path.exists() else ""
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = (text.rstrip() + "\n\n" if text.strip() else "") + block + "\n"
    write_text_atomic(path, text)
    return path


def write_diagnostics_report(out, *, anisotropy: Optional[dict] = None, head_spectrum: Optional[dict] = None,
                             teacher: str = "") -> Path:
    """Write the PNGs and the report.md section(s) of whichever results are given."""
    out = Path(out)
    path = out / "report.md"
    name = short_name(teacher)
    if anisotropy:
        rows = ", ".join(dict.fromkeys(f"{int(np.asarray(r['n_rows'])):,}" for r in anisotropy.values()))
        what = "one model" if len(anisotropy) == 1 else f"{len(anisotropy)} checkpoints"
        plot_anisotropy(anisotropy, out / "anisotropy.png",
                        f"Anisotropy by layer — {name}, {what}\nN = {rows} rows"
                        + (" per checkpoint" if len(anisotropy) > 1 else ""))
        path = write_section(out, "anisotropy", anisotropy_markdown(anisotropy, "anisotropy.png"))
    if head_spectrum:
        path = write_section(out, "head_spectrum", head_spectrum_markdown(head_spectrum, _head_plots(
            out, head_spectrum, name)))
    return path


def _head_plots(out: Path, results: dict[str, dict[str, Any]], name: str) -> dict[str, str]:
    """The head-spectrum PNGs of one model (its spectrum) or of a sweep (heat map, entropy)."""
    if len(results) == 1:
        label, r = next(iter(results.items()))
        plot_head_spectrum(label, r, out / "head_spectrum.png",
                           f"Output head spectrum — {name}: {r['head_n_rows']:,} × {r['head_n_cols']} head")
        return {"head σ_i/σ_0 and W-error of its truncation": "head_spectrum.png"}
    n = f"{len(results)} checkpoints"
    plot_head_heatmap(results, out / "head_sigma_heatmap.png", f"Head σ_i/σ_0 (Fig. 4) — {name}, {n}")
    plot_singular_entropy(results, out / "head_singular_entropy.png",
                          f"Head singular entropy (Fig. 5) — {name}, {n}")
    return {"head σ_i/σ_0 across checkpoints": "head_sigma_heatmap.png",
            "singular entropy across checkpoints": "head_singular_entropy.png"}
