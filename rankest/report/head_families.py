"""The ``--family`` part of the `heads` report: a table and three plots.

* loss vs parameter count, one line per family (mean over seeds, 95 % interval as error bars);
* loss vs rank with the same error bars and each family's knee (vertical line, its interval
  shaded), the paper's Fig. 6 points beside ours for Pythia-410M / 1B;
* the clr resolved rank (σ > 1e-6·σ₁) of every head's own output distribution vs its parameter count, with
  the feature width d: a linear head stays ≤ r ≤ d; a head above d has broken the bottleneck.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rankest.report.plots import _plt, _save
from rankest.report.text import fmt


def _by_family(groups):
    out: dict[str, list] = {}
    for g in groups:
        out.setdefault(g["family"], []).append(g)
    return out


def _errorbars(ax, x, groups):
    y = [g["val_loss"] for g in groups]
    err = [0.0 if not np.isfinite(g["val_loss_ci95"] or np.nan) else g["val_loss_ci95"] for g in groups]
    return ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=groups[0]["family"])


def plot_loss_vs_params(fam: dict, reference: float, path: Path, title: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for groups in _by_family(fam["groups"]).values():
        _errorbars(ax, [g["n_params"] for g in groups], groups)
    ax.axhline(reference, color="0.3", lw=0.8, label="teacher's own head")
    ax.set_xscale("log")
    ax.set_xlabel("head parameters")
    ax.set_ylabel("validation loss (nats), mean ± 95% CI")
    ax.set_title(f"loss vs parameters · {title}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, path)


def plot_loss_vs_rank(fam: dict, reference: float, paper: dict | None, path: Path, title: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, groups in _by_family(fam["groups"]).items():
        bars = _errorbars(ax, [g["nominal_rank"] for g in groups], groups)
        k = fam["knees"].get(name) or {}
        colour = bars[0].get_color()
        if k.get("rank") is not None:
            ax.axvline(k["rank"], color=colour, ls="--", lw=0.9, label=f"knee of {name}: r = {k['rank']}")
        if k.get("low") is not None:
            ax.axvspan(k["low"], k["high"], color=colour, alpha=0.08)
    if paper:
        pr = sorted(paper["points"])
        ax.plot(pr, [paper["points"][r] for r in pr], marker="s", color="0.5", ls=":",
                label=f"paper Fig. 6 ({paper['name']}, Pile)")
    ax.axhline(reference, color="0.3", lw=0.8, label="teacher's own head")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("rank r (the linear head's; --match-params: of equal parameter count)")
    ax.set_ylabel("validation loss (nats), mean ± 95% CI")
    ax.set_title(f"loss vs rank · {title}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, path)


def plot_output_rank(fam: dict, d: int, path: Path, title: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, groups in _by_family(fam["groups"]).items():
        x = [g["n_params"] for g in groups]
        y = np.array([g["output_resolved_rank"] for g in groups])
        lo = y - [g["output_resolved_rank_min"] for g in groups]
        hi = np.array([g["output_resolved_rank_max"] for g in groups]) - y
        ax.errorbar(x, y, yerr=[lo, hi], marker="o", capsize=3, label=name)
    ax.axhline(d, color="C3", ls="--", lw=0.9, label=f"feature width d = {d}")
    ax.axhline(fam["rank_rows"], color="0.5", ls=":", lw=0.9, label=f"rows measured = {fam['rank_rows']}")
    ax.set_xscale("log")
    ax.set_yscale("log", base=2)
    ax.set_xlabel("head parameters")
    ax.set_ylabel("clr resolved rank (σ > 1e-6·σ₁) of the head's log-probs")
    ax.set_title(f"output rank vs parameters · {title}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, path)


def families_markdown(fam: dict, d: int, objective: str) -> list[str]:
    """The families section of heads.md."""
    seeds = max(g["seeds"] for g in fam["groups"])
    kl = objective == "kl"
    lines = ["## Head families", "",
             f"Every family × rank trained on the same batches as the rank sweep, {seeds} seed(s) each "
             f"(replicates differ in their init only; ± is the 95% Student-t interval over seeds). "
             f"`linear` heads follow `--init`; the non-linear families start from a variance-preserving init "
             f"(weights N(0, 1/fan-in)) whatever `--init`. "
             f"Output rank: the spectrum of the clr matrix of the head's own log-probs on the first "
             f"{fam['rank_rows']} validation rows (exact Gram route; mean, min–max over seeds): the resolved rank "
             f"(#σ_i > 1e-6·σ_1: what the Gram route resolves, whatever the rows' precision), the numerical rank (largest gap σ_i/σ_i+1: "
             f"the cliff of a low-rank head; a full-rank spectrum has no cliff and its largest gap is often the "
             f"first) and rank_at(0.1). d = {d}: a linear or MLP head stays ≤ its rank r; a rank above d means "
             f"the family escapes the softmax bottleneck. The teacher's own head: resolved rank "
             f"{fam['teacher_output_rank']['resolved_rank']}, numerical rank "
             f"{fam['teacher_output_rank']['numerical_rank']} on these rows.", "",
             "| family | rank (own) | parameters | val loss ± 95% CI | gap to teacher | accuracy | "
             + ("KL(teacher‖head) | " if kl else "") + "output resolved rank | output numerical rank | "
             "output rank_at(0.1) |",
             "|---|---|---|---|---|---|" + ("---|" if kl else "") + "---|---|---|"]
    ra = {}
    for h in fam["heads"]:
        ra.setdefault((h["family"], h["label"]), []).append(h["output_rank"]["rank_at_0.1"])
    for g in fam["groups"]:
        r01 = [x for x in ra.get((g["family"], g["label"]), []) if x is not None]
        lines.append(f"| {g['family']} | {g['label']} ({g['rank']}) | {g['n_params']:,} | {fmt(g['val_loss'])} ± "
                     f"{fmt(g['val_loss_ci95'], 2)} | {fmt(g['gap_to_teacher'], 3)} | {fmt(g['val_accuracy'], 3)} | "
                     + (f"{fmt(g['val_kl'])} ± {fmt(g['val_kl_ci95'], 2)} | " if kl else "")
                     + f"{fmt(g['output_resolved_rank'], 4)} ({g['output_resolved_rank_min']}–"
                     f"{g['output_resolved_rank_max']}) | "
                     f"{fmt(g['output_numerical_rank'], 4)} ({g['output_numerical_rank_min']}–"
                     f"{g['output_numerical_rank_max']}) | {fmt(float(np.mean(r01)), 4) if r01 else '—'} |")
    lines += ["", "Knee of loss vs rank (the rank beyond which a doubling improves the loss by less than "
              f"{fmt(next(iter(fam['knees'].values()))['threshold'])} nats; interval: 2.5–97.5% of 1,000 bootstrap "
              "resamples of the seeds):", ""]
    for name, k in fam["knees"].items():
        where = "none within the ranks (the loss still improves at the largest)" if k["rank"] is None else f"r = {k['rank']}"
        inter = "" if k["low"] is None else f", interval [{k['low']}, {k['high']}]"
        lines.append(f"* {name}: {where}{inter}")
    return lines + [""]


def write_family_plots(out: Path, fam: dict, res, paper: dict | None, title: str) -> dict[str, str]:
    """The three PNGs; returns {caption: file name}."""
    out = Path(out)
    ref, d = res.reference["loss"], res.meta.get("hidden_size")
    plots = {"head families: loss versus parameters": "heads_families_loss_vs_params.png",
             "head families: loss versus rank, with the knee": "heads_families_loss_vs_rank.png",
             "head families: output rank versus parameters": "heads_families_output_rank.png"}
    names = list(plots.values())
    plot_loss_vs_params(fam, ref, out / names[0], title)
    plot_loss_vs_rank(fam, ref, paper, out / names[1], title)
    plot_output_rank(fam, d, out / names[2], title)
    return plots
