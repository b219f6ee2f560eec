"""The n-gram part of a report: the target's facts, the corpus-size sweep, and the paper's Fig. 7."""

from __future__ import annotations

from pathlib import Path

from rankest.report.plots import plot_w_error, run_title, short_name
from rankest.report.text import fmt_metric


def render_ngram_section(spec, sweep: dict, out) -> str:
    """The n-gram facts appended to report.md (and the corpus-size sweep plot)."""
    m = spec.meta
    lines = ["", "## n-gram target", "",
             f"{m['order']}-gram model, smoothing `{m['smoothing']}`, rows weighted `{m['weighting']}`"
             f"{' (each row × sqrt(c(h)): the Gram of one row per token occurrence)' if m['weighting'] == 'count' else ' (the paper’s)'}, "
             f"tokenizer `{m['tokenizer']}`.", "",
             "| fact | value |", "|---|---|",
             f"| tokens in the corpus | {m['n_tokens']:,} |",
             f"| distinct {m['order']}-grams | {m['distinct_ngrams']:,} |",
             f"| contexts observed / used (C) | {m['contexts_total']:,} / {m['contexts']:,} |",
             f"| share of used contexts seen once | {m['singleton_context_share']:.3f} |",
             f"| vocabulary V / observed columns / Gram columns | {m['vocab']:,} / {m['observed_columns']:,} / {m['gram_columns']:,} |",
             f"| in-sample NLL per token (nats) | {m['nll']:.4f} |",
             f"| counting throughput | {m['count_tokens_per_second'] or 0:,.0f} tokens/s |", "",
             "MLE rows of singleton contexts are one-hot: they mostly measure the spread of the next-token "
             "unigram distribution, not the structure of language; a large share of them pushes the rank up. "
             "Unobserved tokens are identical columns, merged exactly into one (see rankest/targets/ngram.py).", ""]
    if sweep:
        plot_w_error([(f"{f:g} of the corpus ({fa['n_tokens']:,} tokens)", s) for f, (s, fa) in sorted(sweep.items())],
                     out / "corpus_fractions.png",
                     run_title("Corpus-size sweep", m, f"{m['order']}-gram, {m['smoothing']} smoothing, {spec.space} space, "
                                                      f"tokenizer {short_name(m['tokenizer'])}"))
    fractions = m.get("corpus_fractions")  # results.json's summary: a re-render from results.h5 keeps the table
    if fractions:
        lines += ["## Corpus-size sweep", ""]
        if (Path(out) / "corpus_fractions.png").is_file():
            lines += ["![corpus-size sweep](corpus_fractions.png)", ""]
        lines += ["| fraction | tokens | contexts | singleton share | rank_at(0.5) | rank_at(0.1) | rank_at(0.01) |",
                  "|---|---|---|---|---|---|---|"]
        for f, fa in sorted(fractions.items(), key=lambda t: float(t[0])):
            r = fa["rank_at"]
            lines.append(f"| {float(f):g} | {fa['n_tokens']:,} | {fa['contexts']:,} | {fa['singleton_context_share']:.3f} | "
                         f"{fmt_metric(r['0.5'])} | {fmt_metric(r['0.1'])} | {fmt_metric(r['0.01'])} |")
        lines.append("")
    return "\n".join(lines)


# ---- comparison report (rankest.report.compare.compare_runs) -------------------------------------------
#: Godey et al. (2024), Fig. 7, digitised (±0.02; docs/design.md, "Reference numbers"): 5-gram MLE prob matrices.
PAPER_FIG7 = {"w_error_at_1000": (0.50, 0.57), "w_error_at_2000": (0.39, 0.49),
              "d_at_0.1": {"Llama-2": (7000, 9000), "Pythia": (10000, 12000)}}


def draw_paper_fig7(ax) -> None:
    """The paper's Fig. 7 ranges on a W-error plot: W-error at d = 1000 and 2000, and where the
    curves cross 0.1 for each tokenizer."""
    lo, hi = PAPER_FIG7["w_error_at_1000"]
    ax.plot([1000, 1000], [lo, hi], color="k", lw=3, alpha=0.6, label="paper Fig. 7 (5-gram MLE, 3 corpora)")
    lo, hi = PAPER_FIG7["w_error_at_2000"]
    ax.plot([2000, 2000], [lo, hi], color="k", lw=3, alpha=0.6)
    for (tok, (a, b)), style in zip(PAPER_FIG7["d_at_0.1"].items(), ("-", "--")):
        ax.plot([a, b], [0.1, 0.1], color="k", lw=3, alpha=0.4, ls=style, label=f"paper: W-error 0.1 ({tok})")
    ax.set_xlim(left=1)


def ngram_label(meta: dict) -> str:
    """' TOKENIZER SMOOTHING [weighted by count] [C=used/observed]' for an n-gram run, '' otherwise."""
    if "contexts" not in meta:
        return ""
    out = f" {short_name(meta.get('tokenizer'))} {meta.get('smoothing')}"
    if meta.get("weighting") == "count":
        out += " count-weighted"
    if meta.get("contexts") != meta.get("contexts_total"):
        out += f" C={meta.get('contexts'):,}/{meta.get('contexts_total'):,}"
    return out


def ngram_compare_lines(specs, folders) -> list[str]:
    """A table of the n-gram facts of the n-gram runs among ``specs`` (empty when none)."""
    rows = [(label, s, f) for (label, s), f in zip(specs, folders) if "contexts" in s.meta]
    if not rows:
        return []
    lines = ["", "## n-gram runs", "",
             "Paper (Godey et al. 2024, Fig. 7, digitised): 5-gram MLE probability rows, W-error(1000) ≈ 0.50–0.57, "
             "W-error(2000) ≈ 0.39–0.49, W-error ≤ 0.1 past d ≈ 7–9k (Llama-2 tokenizer) or 10–12k (Pythia), on "
             "corpora far larger than a local run's: the curve moves with the corpus size (see each run's sweep).", "",
             "| run | order | tokenizer | smoothing | weighting | tokens | contexts C used / observed | singleton share | W-error(1000) | W-error(2000) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for label, s, f in rows:
        m = s.meta
        w = s.w_error()
        at = lambda d: f"{w[d - 1]:.3f}" if d <= w.size else "—"  # noqa: E731
        lines.append(f"| `{f}` | {m.get('order')} | {m.get('tokenizer')} | {m.get('smoothing')} | {m.get('weighting')} | "
                     f"{m.get('n_tokens', 0):,} | {m.get('contexts', 0):,} / {m.get('contexts_total', 0):,} | {m.get('singleton_context_share', float('nan')):.3f} | "
                     f"{at(1000)} | {at(2000)} |")
    return lines + [""]
