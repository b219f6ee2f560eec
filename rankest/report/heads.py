"""The `heads` report: a table and PNG plots of loss / accuracy versus rank and loss versus W-error.

Where the teacher is one the paper used, its digitised numbers (docs/design.md, "Reference
numbers", ±0.02 nats) are drawn beside ours: Fig. 6 (final validation loss of a rank-r head on
the frozen model, after ~150M Pile tokens from N(0,1) init) and Fig. 8 (Pythia-1B: loss of the
head truncated to rank d against the W-error of the truncated head matrix). Our corpus, token
count and steps differ from the paper's, so the comparison is of shape, not of value.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from rankest.io.files import write_text_atomic
from rankest.report.head_families import families_markdown, write_family_plots
from rankest.report.plots import _plt, _save, run_title
from rankest.report.text import fmt

#: Paper Fig. 6: final validation loss by rank r of heads trained on frozen models.
PAPER_FIG6 = {
    "pythia-410m": {32: 4.05, 64: 3.53, 128: 3.15, 256: 2.91, 512: 2.77, 768: 2.71, 1024: 2.69},
    "pythia-1b": {32: 3.83, 64: 3.40, 128: 3.01, 256: 2.79, 512: 2.65, 1024: 2.54, 1536: 2.49, 2048: 2.48},
}
#: Paper Fig. 8 (Pythia-1B): (W-error of the truncated head matrix, loss), d = 2048 … 32.
PAPER_FIG8 = {
    "pythia-1b": [(0.0, 2.475), (0.36, 2.49), (0.56, 2.54), (0.735, 2.65), (0.826, 2.785), (0.875, 3.01),
                  (0.903, 3.39), (0.919, 3.83)],
}


def paper_key(teacher: str) -> str | None:
    """The paper's name of a teacher it used (``pythia-1b``, ``EleutherAI/pythia-410m``), else None."""
    name = str(teacher or "").lower().rsplit("/", 1)[-1]
    return name if name in PAPER_FIG6 else None


def plot_loss_vs_rank(res, path: Path, title: str) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    r = np.asarray(res.ranks)
    ax = axes[0]
    ax.plot(r, res.val_loss, marker="o", label=f"trained heads ({res.meta.get('init', '?')} init)")
    ax.plot(r, res.truncation_loss_feature, marker="^", ls="--", label="truncated head, feature metric (svd init)")
    ax.plot(r, res.truncation_loss, marker="v", ls=":", label="truncated head, weight space (Fig. 8)")
    ax.axhline(res.reference["loss"], color="0.3", lw=0.8, label="teacher's own head")
    key = paper_key(res.meta.get("teacher"))
    if key:
        pr = sorted(PAPER_FIG6[key])
        ax.plot(pr, [PAPER_FIG6[key][x] for x in pr], marker="s", color="C3", alpha=0.6,
                label=f"paper Fig. 6 ({key}, Pile)")
    _rank_axis(ax, res)
    ax.set_ylabel("validation loss (nats)")
    ax.set_title("loss: lower is better", fontsize=9)
    _cap_ylim(ax, res)
    ax.legend(fontsize=7)
    ax = axes[1]
    ax.plot(r, res.val_accuracy, marker="o", label="trained heads")
    ax.plot(r, res.truncation_accuracy_feature, marker="^", ls="--", label="truncated, feature metric")
    ax.plot(r, res.truncation_accuracy, marker="v", ls=":", label="truncated, weight space")
    ax.axhline(res.reference["accuracy"], color="0.3", lw=0.8, label="teacher's own head")
    _rank_axis(ax, res)
    ax.set_ylabel("validation top-1 accuracy")
    ax.set_title("accuracy: higher is better", fontsize=9)
    ax.legend(fontsize=7)
    for a in axes:
        a.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save(fig, path)


def _rank_axis(ax, res) -> None:
    """A log₂ axis of the heads' ranks, ticked at each rank and labelled as the run named it
    ("full (576)"), without minor labels. Paper ranks outside the run's range extend the axis."""
    from matplotlib.ticker import FixedFormatter, FixedLocator, NullLocator

    ticks, names = [], []
    for lab, r in sorted(zip(res.labels, res.ranks), key=lambda t: -t[1]):  # from "full" down
        if not ticks or math.log2(ticks[-1] / r) >= 0.6:  # 512 beside "full (576)" would overlap
            ticks.append(r)
            names.append(lab if lab == str(r) else f"{lab} ({r})")
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(ticks[::-1]))
    ax.xaxis.set_major_formatter(FixedFormatter(names[::-1]))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("rank r of the head (log scale)")


def _cap_ylim(ax, res) -> None:
    """Untrained N(0,1) heads can sit at losses of thousands: keep the interesting range visible."""
    ref = res.reference["loss"]
    vals = [v for v in list(res.val_loss) + list(res.truncation_loss) + list(res.truncation_loss_feature)
            if v is not None and math.isfinite(v)]
    top = max(vals + [ref])
    if top > 4 * ref + 5:
        ax.set_ylim(min(vals + [ref]) - 0.2, 4 * ref + 5)


def plot_loss_vs_w_error(res, path: Path, title: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(res.head_w_error_weight, res.truncation_loss, marker="v", label="W-error of W (weight space)")
    ax.plot(res.head_w_error_feature, res.truncation_loss_feature, marker="^",
            label="W-error of H·W_cᵀ (feature metric)")
    for x, y, lab in zip(res.head_w_error_weight, res.truncation_loss, res.labels):
        ax.annotate(lab, (x, y), fontsize=7, textcoords="offset points", xytext=(3, 3))
    key = paper_key(res.meta.get("teacher"))
    if key in PAPER_FIG8:
        xs, ys = zip(*PAPER_FIG8[key])
        ax.plot(xs, ys, marker="s", color="C3", alpha=0.6, label=f"paper Fig. 8 ({key}, weight space)")
    ax.axhline(res.reference["loss"], color="0.3", lw=0.8, label="teacher's own head")
    ax.set_xlabel("W-error of the truncated head")
    ax.set_ylabel("validation loss (nats)")
    ax.set_xlim(-0.02, 1.0)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    _save(fig, path)


def render_heads_markdown(res, plots: dict[str, str]) -> str:
    m = res.meta
    ref = res.reference
    lines = [
        f"# rankest heads — {m.get('teacher', '?')} on {m.get('corpus', '?')}",
        "",
        f"Heads W = A·B of rank r on the frozen final features (d = {m.get('hidden_size')}, V' = {m.get('n_cols'):,}), "
        f"objective `{m.get('objective')}`, init `{m.get('init')}`, {m.get('steps')} AdamW steps "
        f"(β = 0.9, 0.95, weight decay 0.01, 1% warm-up, cosine to 10%) of ≈ {m.get('rows_per_step', 0):.0f} rows "
        f"({fmt(m.get('epochs'), 3)} epochs of {m.get('n_train_rows', 0):,} training rows), every rank on the "
        f"same batches. Validation: {m.get('n_val_rows', 0):,} held-out rows (whole windows, seeded split).",
        "",
        "## Validation loss and accuracy by rank",
        "",
        "| rank | peak LR | loss at init | val loss | val accuracy | val perplexity | truncated loss (feature metric) | "
        "W-error H·W_cᵀ | truncated loss (weight space) | W-error W |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    init = res.init_loss or [None] * len(res.labels)
    for i, lab in enumerate(res.labels):
        lines.append(f"| {lab} ({res.ranks[i]}) | {res.lr[i]:.3g} | {fmt(init[i])} | {fmt(res.val_loss[i])} | "
                     f"{fmt(res.val_accuracy[i])} | {fmt(res.val_perplexity[i])} | "
                     f"{fmt(res.truncation_loss_feature[i])} | {fmt(res.head_w_error_feature[i], 3)} | "
                     f"{fmt(res.truncation_loss[i])} | {fmt(res.head_w_error_weight[i], 3)} |")
    lines.append(f"| teacher's head (reference) | — | | {fmt(ref['loss'])} | {fmt(ref['accuracy'])} | "
                 f"{fmt(ref['perplexity'])} | | 0 | | 0 |")
    for w in m.get("warnings") or []:
        lines += ["", f"**Warning**: {w}."]
    if res.val_kl is not None:
        lines += ["", "KL(teacher ‖ head) on the validation rows (nats): "
                  + ", ".join(f"{lab}: {fmt(k)}" for lab, k in zip(res.labels, res.val_kl))]
    if res.lr_search:
        lines += ["", f"LR search ({res.lr_search.get('search_steps')} steps, scored on "
                      f"{res.lr_search.get('held_out_rows')} held-out training rows): `"
                  + str({k: v for k, v in res.lr_search.items() if k not in ('search_steps', 'held_out_rows')}) + "`"]
    key = paper_key(m.get("teacher"))
    if key:
        lines += ["", f"Paper Fig. 6 ({key}, ~150M Pile tokens, N(0,1) init): "
                  + ", ".join(f"r = {r}: {v}" for r, v in sorted(PAPER_FIG6[key].items()))
                  + ". Drawn beside ours; corpus, tokens and steps differ."]
    if res.families is not None:
        lines += [""] + families_markdown(res.families, m.get("hidden_size"), m.get("objective"))
    lines += ["", "## Cost", "",
              f"* features (teacher forward or cache reads): {fmt(m.get('seconds_features'), 3)} s; heads: "
              f"{fmt(m.get('seconds_heads'), 3)} s; {fmt(m.get('seconds_per_step'), 3)} s per step for all "
              f"{len(res.ranks)} heads ({fmt(m.get('seconds_heads_per_step'), 3)} s of it in the heads)",
              f"* head parameters + gradients + AdamW moments: {m.get('head_state_bytes', 0) / 2**20:.1f} MiB; "
              f"peak RSS {m.get('peak_rss_bytes', 0) / 2**20:.0f} MiB"
              + (f"; peak device memory {m['peak_device_bytes'] / 2**20:.0f} MiB" if 'peak_device_bytes' in m else ""),
              f"* truncation curve (two eigensolves of d×d and the evaluations): {fmt(m.get('seconds_truncation'), 3)} s",
              "", "## Plots", ""]
    for name, fname in plots.items():
        lines += [f"![{name}]({fname})", ""]
    lines += ["## How to read this", "",
              "* **val loss**: mean next-token cross-entropy (nats) over held-out contexts; perplexity = exp(loss).",
              "* **truncated (feature metric)**: the best rank-r approximation of the teacher's centred logits on the "
              "training features (the `svd` init, before any training); its W-error is the `clr` W-error of "
              "`rankest estimate` on these rows (`head_w_error_feature`).",
              "* **truncated (weight space)**: the teacher's head matrix W cut to rank r by its own SVD, the paper's "
              "Fig. 8; its W-error is `head_w_error_weight`. The paper finds the loss rising once it passes ≈ 0.6.",
              ""]
    cfg, prov = m.get("config") or {}, m.get("provenance") or {}
    lines += ["## Configuration and provenance", "", "```"]
    lines += [f"{k}: {v}" for k, v in sorted(cfg.items())] + [""]
    lines += [f"{k}: {v}" for k, v in sorted(prov.items())]
    lines += ["```", ""]
    return "\n".join(lines)


def write_heads_report(out: Path, res) -> Path:
    """heads_loss_vs_rank.png, heads_loss_vs_w_error.png and heads.md (also report.md when absent)."""
    out = Path(out)
    m = res.meta
    title = run_title("Rank-r heads", m, f"{m.get('objective')} objective, {m.get('init')} init, {m.get('steps')} steps, "
                      f"{m.get('n_train_rows', 0):,} training / {m.get('n_val_rows', 0):,} validation rows")
    plots = {"loss and accuracy versus rank": "heads_loss_vs_rank.png",
             "loss versus W-error of the truncated head": "heads_loss_vs_w_error.png"}
    plot_loss_vs_rank(res, out / plots["loss and accuracy versus rank"], title)
    plot_loss_vs_w_error(res, out / plots["loss versus W-error of the truncated head"], title)
    if res.families is not None:
        key = paper_key(res.meta.get("teacher"))
        paper = {"name": key, "points": PAPER_FIG6[key]} if key else None
        plots.update(write_family_plots(out, res.families, res, paper, title))
    text = render_heads_markdown(res, plots)
    write_text_atomic(out / "heads.md", text)
    if not (out / "report.md").exists():
        write_text_atomic(out / "report.md", text)
    return out / "heads.md"
