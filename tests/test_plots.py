"""The figures of every report, read back through matplotlib's artists: titles that say what was
run, a label on every axis, labelled thresholds and rank_at marks on W-error plots, tick labels
that do not overlap, stable and effective rank on axes of their own, a single model's head drawn
as its spectrum; and ``rankest report`` on a folder of each kind.

The figures are caught before they are saved (``_save`` patched) and drawn with the Agg
renderer, so the checks see what the PNG shows: label text and the tick labels' boxes in pixels.
"""

from __future__ import annotations

from itertools import combinations
from pathlib import Path

import numpy as np
import pytest

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from rankest.cli import main  # noqa: E402
from rankest.errors import UserError  # noqa: E402
from rankest.report import diagnostics, heads, plots  # noqa: E402
from rankest.report.folder import render_folder  # noqa: E402
from rankest.spectrum import REPORTED_EPS, Spectrum  # noqa: E402


# ---- catching the figures --------------------------------------------------------------------------
@pytest.fixture
def figures(monkeypatch):
    """{file name: Figure} of every figure a report function saves during the test (not written)."""
    caught: dict[str, object] = {}

    def catch(fig, path):
        caught[Path(path).name] = fig

    for module in (plots, diagnostics, heads):
        monkeypatch.setattr(module, "_save", catch)
    yield caught
    plt.close("all")


def data_axes(fig):
    return [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]


def overlapping_tick_labels(fig):
    """Pairs of visible tick labels (major or minor) of one axis whose pixel boxes intersect."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    clashes = []
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            labels = [t for t in axis.get_ticklabels(which="both") if t.get_visible() and t.get_text().strip()]
            boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in labels]
            clashes += [(a, b) for (a, ba), (b, bb) in combinations(boxes, 2) if ba.overlaps(bb)]
    return clashes


def check_readable(fig, *, mentions: str) -> None:
    """A title naming ``mentions``, an x- and y-label on every data axis, no tick label clash."""
    titles = [fig._suptitle.get_text() if fig._suptitle else ""] + [ax.get_title() for ax in fig.axes]
    assert any(mentions in t for t in titles), titles
    for ax in data_axes(fig):
        assert ax.get_xlabel().strip() and ax.get_ylabel().strip(), (ax.get_title(), ax.get_xlabel(), ax.get_ylabel())
    assert not overlapping_tick_labels(fig)


def legend_texts(ax) -> list[str]:
    leg = ax.get_legend()
    return [t.get_text() for t in leg.get_texts()] if leg else []


# ---- synthetic spectra like a real run's ------------------------------------------------------------
def smollm_like(rng, *, ns=(2048, 4096, 8192, 16384)) -> Spectrum:
    """576 decaying singular values and a convergence record shaped like the embedded teacher's
    (effective rank ≈ 400, stable rank ≈ 2)."""
    sigma = np.sort(rng.gamma(2.0, 1.0, 576) * np.exp(-np.arange(576) / 300))[::-1]
    sigma[0] *= 30
    conv = {n: {"rank_at": {"0.5": 15 + i, "0.1": 390 + 25 * i, "0.01": 570}, "numerical_rank": 576,
                "effective_rank": 360.0 + 15 * i + rng.random(), "stable_rank": 1.88 + 0.01 * rng.random()}
            for i, n in enumerate(ns)}
    return Spectrum(sigma=sigma, energy=float(np.sum(sigma ** 2)), n_rows=max(ns), n_cols=49152, space="clr",
                    route="factor", meta={"teacher": "/models/smollm2-135m-instruct", "corpus": "lee"},
                    convergence=conv)


def test_w_error_labels_thresholds_and_marks_rank_at(figures):
    spec = smollm_like(np.random.default_rng(0))
    plots.estimate_plots(spec, Path("unused"))
    fig = figures["w_error.png"]
    check_readable(fig, mentions="smollm2-135m-instruct on lee")
    assert "/models" not in fig.axes[0].get_title()  # a local path is named by its last component
    ax = fig.axes[0]
    texts = legend_texts(ax)
    w = spec.w_error()
    for eps in REPORTED_EPS:
        d = spec.rank_at(eps)
        assert d is not None and w[d - 1] <= eps < (w[d - 2] if d > 1 else 1.0)  # brute-force rank_at
        assert any(t.startswith(f"W-error = {eps}") and t.endswith(f"= {d}") for t in texts), texts
        # the threshold line itself, and a marker on the curve at (rank_at, W-error there)
        assert any(np.allclose(line.get_ydata(), eps) and line.get_label().startswith(f"W-error = {eps}")
                   for line in ax.get_lines())
        assert any(line.get_marker() == "o" and list(line.get_xdata()) == [d]
                   and np.isclose(line.get_ydata()[0], w[d - 1]) for line in ax.get_lines())


def test_w_error_of_a_sketch_says_when_a_threshold_is_not_reached(figures):
    rng = np.random.default_rng(1)
    sigma = np.sort(rng.random(40))[::-1]
    spec = Spectrum(sigma=sigma, energy=float(np.sum(sigma ** 2)) * 1.5, n_rows=500, n_cols=300, space="prob",
                    route="sketch", exact=False, meta={"teacher": "pythia-160m", "corpus": "lee"})
    assert spec.rank_at(0.01) is None
    plots.plot_w_error([("prob (sketch)", spec)], Path("w.png"), "W-error — pythia-160m")
    texts = legend_texts(figures["w.png"].axes[0])
    assert any("W-error = 0.01: not reached within d ≤ 40" in t for t in texts), texts


@pytest.mark.parametrize("ns", [(2048, 4096, 8192, 16384), (300, 400, 600, 1000, 3000, 20000, 90000, 131072, 1200000)])
def test_convergence_ticks_do_not_overlap_and_ranks_have_their_own_axes(figures, ns):
    spec = smollm_like(np.random.default_rng(2), ns=ns)
    plots.plot_convergence(spec, Path("convergence.png"), plots.run_title("Convergence", spec.meta))
    fig = figures["convergence.png"]
    check_readable(fig, mentions="smollm2-135m-instruct")
    axes = data_axes(fig)
    eff = [spec.convergence[n]["effective_rank"] for n in sorted(ns)]
    stable = [spec.convergence[n]["stable_rank"] for n in sorted(ns)]

    def axis_of(values):
        return [ax for ax in axes if any(np.allclose(line.get_ydata(), values) for line in ax.get_lines())]

    (ax_eff,), (ax_stable,) = axis_of(eff), axis_of(stable)
    assert ax_eff is not ax_stable
    assert ax_stable.get_ylim()[1] < 2 * max(stable)  # a stable rank of ≈ 2 fills its axis, not a flat line
    for ax in axes:  # ticks at measured N only, at most 5, no minor labels
        shown = [t.get_text() for t in ax.xaxis.get_ticklabels(which="both") if t.get_text()]
        assert 2 <= len(shown) <= 5 and "×" not in "".join(shown), shown


def test_the_old_log_ticks_did_overlap(figures):
    """The check above can fail: matplotlib's default log-axis labels of these N collide."""
    fig, ax = plt.subplots(figsize=(4.3, 3.6))
    ns = [300, 512, 1024, 2048]
    ax.plot(ns, [1, 2, 3, 4])
    ax.set_xscale("log")
    assert overlapping_tick_labels(fig)


def head_result(rng, k=32):
    s = np.sort(rng.gamma(3.0, 1.0, k))[::-1]
    w = np.sqrt(np.maximum(1 - np.cumsum(s ** 2) / np.sum(s ** 2), 0))
    return {"head_sigma": s, "head_sigma_ratio": s / s[0], "head_w_error": w, "head_singular_entropy_kl": 0.05,
            "head_singular_entropy_kl_sq": 0.2, "head_singular_entropy_max": float(np.log(k)),
            "head_effective_rank": 30.0, "head_stable_rank": 10.0, "head_n_rows": 320, "head_n_cols": k,
            "head_rank_at": {}}


def test_one_model_head_spectrum_is_a_line_of_sigma_not_a_heat_map(figures, tmp_path):
    r = head_result(np.random.default_rng(3))
    diagnostics.write_diagnostics_report(tmp_path, head_spectrum={"/models/tiny": r}, teacher="/models/tiny")
    assert set(figures) == {"head_spectrum.png"}
    fig = figures["head_spectrum.png"]
    check_readable(fig, mentions="tiny")
    assert not any(ax.get_images() for ax in fig.axes)
    lines = [line for ax in fig.axes for line in ax.get_lines() if len(line.get_xdata()) == r["head_sigma"].size]
    assert any(np.allclose(line.get_ydata(), r["head_sigma"] / r["head_sigma"][0]) for line in lines)
    assert any(np.allclose(line.get_ydata(), r["head_w_error"]) for line in lines)
    assert "head_spectrum.png" in (tmp_path / "report.md").read_text()


def test_a_head_spectrum_sweep_draws_the_heat_map_and_the_entropy(figures, tmp_path):
    rng = np.random.default_rng(4)
    results = {f"step{i}": head_result(rng) for i in (1000, 64000, 143000)}
    diagnostics.write_diagnostics_report(tmp_path, head_spectrum=results, teacher="EleutherAI/pythia-160m")
    heat, entropy = figures["head_sigma_heatmap.png"], figures["head_singular_entropy.png"]
    (image,) = heat.axes[0].get_images()
    assert image.get_array().shape == (3, 32)
    for fig in (heat, entropy):
        check_readable(fig, mentions="EleutherAI/pythia-160m")
    # the ceiling log k ≈ 3.5 is far above KL ≈ 0.2: said in the legend rather than flattening the curves
    ax = entropy.axes[0]
    assert ax.get_ylim()[1] < 1 and any("log k" in t for t in legend_texts(ax))


# ---- real runs on the tiny model, and `rankest report` on each kind of folder ------------------------
@pytest.fixture(scope="module")
def run_folders(tmp_path_factory, tiny_neox_dir):
    """One folder per command, written by its real run on the tiny random GPT-NeoX."""
    import rankest

    root = tmp_path_factory.mktemp("runs")
    t = str(tiny_neox_dir)
    common = {"teacher": t, "tokens": 512, "seq_len": 64, "quiet": True}
    rankest.estimate(out=str(root / "estimate"), diagnostics=True, **common)
    rankest.anisotropy(out=str(root / "anisotropy"), **common)
    rankest.head_spectrum(teacher=t, out=str(root / "head_spectrum"), quiet=True)
    rankest.fit_heads(out=str(root / "heads"), ranks="4,full", init="svd", steps=3, **common)
    return root


def test_figures_of_real_runs_are_readable(figures, run_folders):
    for kind in ("estimate", "anisotropy", "head_spectrum", "heads"):
        render_folder(run_folders / kind)
    expected = {"spectrum.png", "w_error.png", "convergence.png", "anisotropy.png", "head_spectrum.png",
                "heads_loss_vs_rank.png", "heads_loss_vs_w_error.png"}
    assert expected <= set(figures)
    for name in expected:
        check_readable(figures[name], mentions="tiny")


@pytest.mark.parametrize("kind, files, section", [
    ("estimate", ["report.md", "w_error.png", "anisotropy.png", "head_spectrum.png"], "<!-- rankest:head_spectrum -->"),
    ("anisotropy", ["report.md", "anisotropy.png"], "## Anisotropy per layer"),
    ("head_spectrum", ["report.md", "head_spectrum.png"], "## Output head spectrum"),
    ("heads", ["heads.md", "report.md", "heads_loss_vs_rank.png"], "# rankest heads"),
])
def test_report_renders_each_kind_of_folder(run_folders, kind, files, section, capsys):
    folder = run_folders / kind
    for name in files:
        if name.endswith(".png"):
            (folder / name).unlink()
    report = folder / "report.md"
    report.write_text(report.read_text().replace(section, "STALE"))
    assert main(["report", str(folder)]) == 0
    assert "wrote" in capsys.readouterr().out
    for name in files:
        assert (folder / name).stat().st_size > 0, name
    text = (folder / "report.md").read_text()
    assert "STALE" not in text and section in text
    if kind == "estimate":  # the estimate's report and its diagnostics sections, both kept
        assert text.startswith("# rankest estimate") and "<!-- rankest:anisotropy -->" in text


def test_report_refuses_what_it_cannot_render(run_folders, tmp_path, capsys):
    with pytest.raises(UserError, match="holds no rankest results"):
        render_folder(tmp_path)
    (tmp_path / "checkpoint.h5").write_bytes(b"")
    with pytest.raises(UserError, match="unfinished run; .* --resume"):
        render_folder(tmp_path)
    with pytest.raises(UserError, match="is not a folder"):
        render_folder(tmp_path / "missing")
    assert main(["report", str(run_folders / "estimate"), str(run_folders / "heads"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "has no results.h5" in err and f"rankest report {run_folders / 'heads'}" in err and err.count("\n") == 1
