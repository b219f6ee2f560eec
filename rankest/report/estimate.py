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
from rankest.report.text import fmt, fmt_metric
from rankest.spectrum import CONVERGED_CHANGE, REPORTED_EPS, Spectrum, convergence_verdict


#: Options that apply only to some runs (report.md lists an option only where it applies).
NGRAM_OPTIONS = ("tokenizer", "smoothing", "min_count", "contexts", "weighting", "corpus_fractions")
SKETCH_OPTIONS = ("rank_max", "passes", "row_cache_dtype", "keep_row_cache")
NEURAL_OPTIONS = ("revision", "dtype", "device_map", "diagnostics", "batch_size")
CORPUS_OPTIONS = ("corpus", "seq_len", "positions", "sample")


def applicable_config(config: dict, spec: Spectrum) -> dict:
    """The options of ``config`` that apply to this run's target and route: n-gram options for an
    n-gram target, sketch options for the sketch route, teacher and corpus options for a neural
    teacher (a file of logits has neither), and no option left at None."""
    teacher = str(config.get("teacher") or spec.meta.get("teacher") or "")
    ngram, rows = "contexts" in spec.meta, teacher.startswith("logits:") or teacher == "rows"
    drop = set() if ngram else set(NGRAM_OPTIONS)
    if spec.route != "sketch":
        drop |= set(SKETCH_OPTIONS)
    if ngram or rows:
        drop |= set(NEURAL_OPTIONS)
    if rows:
        drop |= set(CORPUS_OPTIONS)
    if ngram:
        drop.add("gram_precision")  # n-gram rows are fp64 on every route
    return {k: v for k, v in config.items() if k not in drop and v is not None}


def rank_expectation(spec: Spectrum) -> Optional[str]:
    """A sentence on what the numerical rank means for this target: for a neural teacher's clr
    (logprob) rows the expected answer is its hidden size d (d + 1), otherwise why it differs."""
    d, space = spec.meta.get("hidden_size"), spec.space
    if d is None:
        return None
    if space == "prob":
        return (f"`prob` rows have no rank to recover: exp breaks the low-rank structure of the logits, so their "
                f"rank grows with N up to min(N, V'); read rank_at(ε) and the W-error curve (the hidden size is "
                f"d = {d:,}).")
    nr = spec.metric("numerical_rank")
    if spec.numerical_rank is None:
        return f"The numerical rank is not determined ({fmt_metric(nr)}); the teacher's hidden size is d = {d:,}."
    expect = d if space == "clr" else d + 1
    what = ("a linear head's clr matrix H·Wcᵀ has rank ≤ d" if space == "clr"
            else "log-probs add the per-row logsumexp to H·Wᵀ: rank ≤ d + 1")
    name = "d" if space == "clr" else "d + 1"
    if nr == expect and space == "clr":
        return f"The numerical rank {nr:,} equals the teacher's hidden size d = {d:,}: the expected answer ({what})."
    if space != "clr" and nr in (d, d + 1):
        return (f"The numerical rank {nr:,} is {'d' if nr == d else 'd + 1'} (the teacher's hidden size d = {d:,}): "
                f"the expected answer ({what}; d when the logsumexp lies in the span of the features).")
    if nr == expect + 1:
        return (f"The numerical rank {nr:,} is {name} + 1 (d = {d:,}): the head's bias adds one direction "
                f"([H 1]·[W b]ᵀ), the expected answer for a head with a bias.")
    if nr < expect and spec.n_rows <= expect:
        return (f"The numerical rank {nr:,} is below {name} = {expect:,} because there are only N = {spec.n_rows:,} "
                f"rows: a matrix of N rows has rank ≤ N; sample more than {expect:,} rows to recover d.")
    if nr < expect:
        return (f"The numerical rank {nr:,} is below {name} = {expect:,} (d = {d:,}): the features span fewer "
                f"directions on these rows (a LayerNorm's affine hyperplane or a freshly initialised model gives "
                f"d − 1), or the cliff is not the largest gap at N = {spec.n_rows:,}.")
    return (f"The numerical rank {nr:,} is above {name} = {expect:,} (d = {d:,}): the logits are not a linear "
            f"function of the d features (soft-capping, logit scaling: see linear_head_check_rel_err), or the "
            f"route's round-off shows as values (compare the threshold rank).")


def summary_lines(spec: Spectrum) -> list[str]:
    """The few lines ``rankest estimate`` prints: ranks as values or bounds, never None."""
    m = spec.metrics()
    r = m["rank_at"]
    lines = [", ".join(f"rank_at({e}) = {fmt_metric(r[str(e)])}" for e in REPORTED_EPS),
             f"numerical rank = {fmt_metric(m['numerical_rank'])}, threshold rank = {fmt_metric(m['threshold_rank'])}, "
             f"effective rank = {fmt_metric(m['effective_rank'], 4)}, stable rank = {fmt(m['stable_rank'], 4)}, "
             f"off-model energy = {fmt(m['off_model_energy'], 3)}"]
    if spec.truncated:
        lines.append(f"(a sketch of the top {spec.sigma.size:,} of {min(spec.n_rows, spec.n_cols):,} values: "
                     "ranges are bounds that the unseen tail decides)")
    skipped = spec.meta.get("convergence_skipped")
    lines.append(f"convergence snapshots skipped: {skipped}" if skipped
                 else f"convergence: {convergence_verdict(spec.convergence)['text']}")
    if spec.meta.get("nll") is not None:
        lines.append(f"teacher NLL = {fmt(spec.meta['nll'])} nats (perplexity {fmt(spec.meta.get('perplexity'))})")
    return lines


def _key_facts(spec: Spectrum) -> list[str]:
    facts = []
    expectation = rank_expectation(spec)
    if expectation:
        facts.append(expectation)
    skipped = spec.meta.get("convergence_skipped")
    if skipped:
        facts.append(f"Convergence with N was not measured: snapshots were skipped ({skipped}).")
    else:
        facts.append(f"Convergence with N: {convergence_verdict(spec.convergence)['text']} (rule: converged when "
                     f"rank_at(0.1) moves by less than {CONVERGED_CHANGE:.0%} from N/2 to N).")
    if spec.truncated:
        facts.append(f"This is a **sketch** of the top k = {spec.sigma.size:,} of min(N, V') = "
                     f"{min(spec.n_rows, spec.n_cols):,} singular values: σ̂ ≤ σ, the W-error curve is an upper "
                     f"bound (trusted up to d = {spec.meta.get('trusted_d')}), and every metric the unseen tail "
                     "decides is printed as a bound or with the reason it is not known.")
    return [f"* {f}" for f in facts]


def _sketch_table(meta: dict) -> list[str]:
    err = meta.get("sketch_error") or {}
    rows = [("unexplained energy E − Σσ̂² (share of E)", err.get("unexplained_fraction")),
            ("estimated ‖TᵀT − Â‖_F from the probes", err.get("residual_fro")),
            (f"its bound ({fmt(err.get('confidence'))} confidence)", err.get("residual_bound")),
            ("relative error bound on σ_k", err.get("sigma_k_rel_error")),
            ("W-error trusted up to d (estimate)", meta.get("trusted_d")),
            ("W-error trusted up to d (certified)", err.get("trusted_d_certified")),
            ("widest W-error interval within the trusted d", err.get("w_error_width_max")),
            ("probes", err.get("n_probes")), ("Nyström shift ν", err.get("shift"))]
    return (["## Sketch error estimates", "", "| estimate | value |", "|---|---|"]
            + [f"| {name} | {fmt(v)} |" for name, v in rows]
            + ["", "Per-value arrays (`sigma_upper`, `w_error_lower`) are in results.h5 and results.json under "
                   "`sketch_error`.", ""])


def _convergence_section(spec: Spectrum) -> list[str]:
    lines = ["## Convergence with the number of rows", ""]
    skipped = spec.meta.get("convergence_skipped")
    if skipped:
        lines += [f"Snapshots at N/8, N/4 and N/2 were skipped: {skipped}.", ""]
    if len(spec.convergence) < 2:
        return lines
    lines += ["A rank estimate grows with N until it saturates: if the last rows still move it, the corpus sample "
              f"was too small for the number reported. **Verdict**: {convergence_verdict(spec.convergence)['text']}.",
              "",
              "| N | rank_at(0.5) | rank_at(0.1) | rank_at(0.01) | numerical rank | threshold rank | effective rank |",
              "|---|---|---|---|---|---|---|"]
    for n in sorted(spec.convergence):
        c = spec.convergence[n]
        r = c["rank_at"]
        lines.append(f"| {n:,} | {fmt_metric(r.get('0.5'))} | {fmt_metric(r.get('0.1'))} | {fmt_metric(r.get('0.01'))} | "
                     f"{fmt_metric(c.get('numerical_rank'))} | {fmt_metric(c.get('threshold_rank'))} | "
                     f"{fmt_metric(c.get('effective_rank'))} |")
    if spec.truncated:
        lines += ["", "Ranges are bounds: the values the sketch did not keep decide them, so they cannot show saturation."]
    lines.append("")
    return lines


def render_markdown(spec: Spectrum, *, config: dict, prov: dict, plots: dict[str, str], sections: str = "") -> str:
    """report.md: the key facts and the metrics first, then the plots, the convergence table, the
    target's own ``sections`` (n-gram), how to read it, and last the options that applied."""
    m = spec.metrics()
    meta = spec.meta
    lines = [
        f"# rankest estimate — {meta.get('teacher', '?')} on {meta.get('corpus', '?')}",
        "",
        f"Space `{spec.space}`, route `{spec.route}` ({meta.get('route_reason', '')}), "
        f"N = {spec.n_rows:,} rows × V' = {spec.n_cols:,} columns, products in {spec.precision}, rows in "
        f"{spec.row_precision or spec.precision}.",
        "",
        "## Key facts",
        "",
        *_key_facts(spec),
        "",
        "## Summary",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    for eps in REPORTED_EPS:
        lines.append(f"| rank_at({eps}) — least d with W-error ≤ {eps} | {fmt_metric(m['rank_at'][str(eps)], why=True)} |")
    lines += [
        f"| numerical rank (largest gap σ_i/σ_(i+1) above 1e-6·σ_1) | {fmt_metric(m['numerical_rank'], why=True)} |",
        f"| threshold rank (σ_i > τ = {fmt(spec.threshold(), 3)}: max(N,V')·eps·σ_1 or the route's round-off) | "
        f"{fmt_metric(m['threshold_rank'], why=True)} |",
        f"| effective rank (Roy & Vetterli) | {fmt_metric(m['effective_rank'], why=True)} |",
        f"| stable rank ‖T‖_F²/σ_1² | {fmt(m['stable_rank'])} |",
        f"| energy ‖T‖_F² (streamed, fp64) | {fmt(spec.energy, 8)} |",
        f"| off-model energy 1 − Σσ²/‖T‖_F² | {fmt(m['off_model_energy'])} |",
        f"| teacher NLL on the rows (nats) | {fmt(meta.get('nll'))} |",
        f"| teacher perplexity | {fmt(meta.get('perplexity'))} |",
        "",
    ]
    if not spec.exact:
        lines += _sketch_table(meta)
    lines += ["## Plots", ""]
    for name, fname in plots.items():
        lines.append(f"![{name}]({fname})")
        lines.append("")
    lines += _convergence_section(spec)
    if sections:
        lines += [sections.strip("\n"), ""]
    lines += ["## How to read this", "",
              "* **W-error(d)** = sqrt(Σ_{i>d} σ_i² / Σ σ_i²): the relative Frobenius error of the best rank-d "
              "approximation of the target matrix (Eckart–Young). A head of rank d cannot produce targets closer "
              "than this (in this space).",
              "* **rank_at(ε)**: the rank needed for W-error ≤ ε.",
              "* **numerical rank**: where the spectrum falls off a cliff; for `clr` rows of a linear-head teacher "
              "it recovers the hidden size (Finlayson et al. 2024; Carlini et al. 2024).",
              "* **threshold rank**: the values above the round-off of the precision the rows had (numpy's "
              "matrix_rank rule, τ = σ_1·max(N, V')·eps, or the route's own round-off): with fp32 rows it ignores "
              "values below ≈ max(N, V')·1.2e-7·σ_1, so it can sit below the numerical rank.",
              "* **off-model energy**: the share of the rows' energy the spectrum leaves unexplained — ≈ 0 for exact "
              "routes, the bf16 noise of the real logits for `factor`, the tail beyond k for a sketch.",
              "* **a … b**, **> k**: a bound — the values a sketch did not keep decide the metric.", "",
              "## Configuration and provenance", "", "Options that apply to this run:", "", "```"]
    for k, v in sorted(applicable_config(config, spec).items()):
        lines.append(f"{k}: {v}")
    lines += ["```", "", "```"]
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
    sections = render_ngram_section(spec, sweep or {}, out) if "contexts" in spec.meta else ""  # an n-gram target
    write_text_atomic(path, render_markdown(spec, config=config, prov=prov, plots=plots, sections=sections))
    return path


