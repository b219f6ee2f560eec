"""Plots and the report.md section of the representation diagnostics (:mod:`rankest.diagnostics`).

* ``anisotropy.png`` — anisotropy against layer depth, one line per checkpoint (Godey et al.
  2024, Fig. 2), beside the share of variance in the first principal direction;
* ``head_sigma_heatmap.png`` — σ_i/σ_0 of the head's top singular values, one row per
  checkpoint (Fig. 4);
* ``head_singular_entropy.png`` — KL(σ̂ ‖ uniform) across checkpoints (Fig. 5), with the
  σ²-normalised variant and the ceiling log k.

The section is written between markers in ``DIR/report.md``, so it is replaced on a rerun and
an `estimate` report in the same folder keeps its own content.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

import numpy as np

from rankest.io.files import write_text_atomic
from rankest.report.plots import _plt, _save
from rankest.report.text import fmt

__all__ = ["plot_anisotropy", "plot_head_heatmap", "plot_singular_entropy", "anisotropy_markdown",
           "head_spectrum_markdown", "write_section", "write_diagnostics_report"]


def _short(label: str, width: int = 28) -> str:
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
    axes[0].set_ylabel("anisotropy (mean pairwise cosine)")
    axes[1].set_ylabel("variance share of the 1st principal direction")
    for ax in axes:
        ax.set_xlabel("layer depth (0 = embeddings, 1 = last)")
        ax.set_xlim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title)
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
    ax.set_title(title)
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
    ax.plot(x, ceiling, color="0.5", ls="none", marker="_", ms=14, label="log k (one spike)")
    ax.set_xticks(x, [_short(s, 24) for s in labels], rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("singular entropy KL (nats)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title)
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
    if anisotropy:
        plot_anisotropy(anisotropy, out / "anisotropy.png", f"{teacher}: anisotropy by layer")
        path = write_section(out, "anisotropy", anisotropy_markdown(anisotropy, "anisotropy.png"))
    if head_spectrum:
        plot_head_heatmap(head_spectrum, out / "head_sigma_heatmap.png", f"{teacher}: head σ_i/σ_0")
        plot_singular_entropy(head_spectrum, out / "head_singular_entropy.png", f"{teacher}: head singular entropy")
        path = write_section(out, "head_spectrum", head_spectrum_markdown(
            head_spectrum, {"head σ_i/σ_0 across checkpoints": "head_sigma_heatmap.png",
                            "singular entropy across checkpoints": "head_singular_entropy.png"}))
    return path

