"""What a person reads of an estimate: bounds instead of None, key facts first, snapshots or the
reason they are missing, a report of tables and sentences (tiny NeoX teacher, d = 32, V' = 320)."""

import json

import pytest

import rankest.accumulate.sketch as sketch_module
from rankest import cli
from rankest.estimator.pipeline import run_estimate
from rankest.report.compare import compare_runs
from rankest.spectrum import convergence_verdict

SEQ = 32
D = 32


@pytest.fixture(scope="module")
def corpus(make_word_corpus):
    return make_word_corpus("corpus", seed=2024, paragraphs=40)


def _run(teacher, corpus, out, **kw):
    args = dict(teacher=teacher, corpus=corpus, tokens=256, seq_len=SEQ, quiet=True, out=str(out))
    args.update(kw)
    spec = run_estimate(**args)
    return spec, json.loads((out / "results.json").read_text()), (out / "report.md").read_text()


def test_prob_default_run_has_snapshots(tiny_teacher, corpus, tmp_path):
    spec, summary, report = _run(tiny_teacher, corpus, tmp_path / "prob", space="prob")
    # Either the promised snapshots at N/8, N/4, N/2 and N, or the reason in results and report.
    if "convergence_skipped" in summary:
        assert summary["convergence_skipped"] in report
    else:
        assert sorted(int(n) for n in summary["convergence"]) == [32, 64, 128, 256]
        assert summary["convergence_verdict"]["text"] in report
        assert "| 256 |" in report
    assert summary["convergence_verdict"]["converged"] in (True, False, None)


def test_skipped_snapshots_are_stated(tiny_teacher, corpus, tmp_path, monkeypatch):
    # A sketch whose finalize is not cheap (the default prob sketch of a 49k vocabulary): forced here.
    monkeypatch.setattr(sketch_module, "SNAPSHOT_MAX_FLOPS", 0)
    spec, summary, report = _run(tiny_teacher, corpus, tmp_path / "sk", space="prob", route="sketch", rank_max=16)
    assert spec.route == "sketch"
    assert "flops" in summary["convergence_skipped"] and "--rank-max" in summary["convergence_skipped"]
    assert list(summary["convergence"]) == ["256"]
    assert summary["convergence_verdict"]["converged"] is None
    assert "snapshots were skipped" in report and summary["convergence_skipped"] in report


def test_sketch_report_shows_bounds_tables_and_sentences(tiny_teacher, corpus, tmp_path, capsys):
    out = tmp_path / "sk"
    spec, summary, report = _run(tiny_teacher, corpus, out, space="prob", route="sketch", rank_max=16)
    assert spec.truncated
    # results.json: the documented shapes of bounds, never a bare null for a tail-dependent metric
    assert set(summary["effective_rank"]) >= {"lower", "upper", "reason"}
    assert summary["effective_rank"]["lower"] <= summary["effective_rank"]["upper"]
    assert isinstance(summary["numerical_rank"], dict) or isinstance(summary["numerical_rank"], int)
    for n, entry in summary["convergence"].items():
        assert isinstance(entry["effective_rank"], dict), n  # truncation decides it: never a saturated number
    # report.md: small, no raw arrays, no Python None, key facts before the configuration
    assert len(report.encode()) < 12_000
    assert "sigma_upper': [" not in report and "[0." not in report
    assert "None" not in report
    assert "## Sketch error estimates" in report and "| W-error trusted up to d (estimate) |" in report
    assert report.index("## Key facts") < report.index("## Summary") < report.index("## Configuration")
    assert "sketch** of the top k = 16" in report and " … " in report
    config = report[report.index("## Configuration"):]
    assert "rank_max: 16" in config and "smoothing" not in config and "tokenizer:" not in config
    # `rankest report` comparisons print bounds too
    compare_runs([out], tmp_path / "cmp")
    cmp_text = (tmp_path / "cmp" / "compare.md").read_text()
    assert "None" not in cmp_text


def test_cli_summary_prints_bounds_not_none(tiny_neox_dir, corpus, tmp_path, capsys):
    code = cli.main(["estimate", "--teacher", str(tiny_neox_dir), "--corpus", corpus, "--tokens", "256",
                     "--seq-len", str(SEQ), "--space", "prob", "--route", "sketch", "--rank-max", "16", "--quiet",
                     "--no-convergence"])
    out = capsys.readouterr().out
    assert code == 0
    assert "None" not in out and "rank_at(0.01) = " in out
    assert "effective rank = " in out and " … " in out
    assert "convergence snapshots skipped: --no-convergence" in out


def test_clr_report_says_the_numerical_rank_is_the_hidden_size(tiny_teacher, corpus, tmp_path):
    spec, summary, report = _run(tiny_teacher, corpus, tmp_path / "clr", space="clr")
    assert spec.route == "factor" and summary["hidden_size"] == D
    nr = summary["numerical_rank"]
    if nr == D:
        assert f"equals the teacher's hidden size d = {D}" in report and "the expected answer" in report
    else:  # any other answer comes with its reason
        assert f"d = {D}" in report and ("bias" in report or "below" in report or "above" in report)
    assert "rank_max" not in report[report.index("## Configuration"):]  # a sketch option: not this run's


def test_clr_report_with_fewer_rows_than_d(tiny_teacher, corpus, tmp_path):
    spec, summary, report = _run(tiny_teacher, corpus, tmp_path / "few", space="clr", tokens=20)
    assert summary["numerical_rank"] <= 20 and summary["threshold_rank"] <= 20
    assert "only N = 20 rows" in report


def test_convergence_verdict_rule():
    conv = {100: {"rank_at": {"0.1": 50}}, 200: {"rank_at": {"0.1": 80}}, 400: {"rank_at": {"0.1": 80}}}
    v = convergence_verdict(conv)
    assert v["converged"] is True and v["change"] == 0 and v["text"].startswith("converged")
    conv[400] = {"rank_at": {"0.1": 90}}
    v = convergence_verdict(conv)
    assert v["converged"] is False and "sample more rows" in v["text"]
    conv[400] = {"rank_at": {"0.1": {"lower": 17, "upper": 300, "reason": "not reached by the 16 kept values"}}}
    v = convergence_verdict(conv)
    assert v["converged"] is None and "beyond the kept values" in v["text"]
    assert convergence_verdict({400: {"rank_at": {"0.1": 3}}})["converged"] is None


def _cliff(r, n_rows=100, space="clr", exact=True, k=None):
    import numpy as np

    from rankest.spectrum import Spectrum
    s = np.concatenate([np.linspace(3, 1, r), 1e-12 * np.ones(5)])
    if k is not None:
        s = np.linspace(3, 1, k)
    return Spectrum(sigma=s, energy=float(np.sum(s ** 2)) * (1 if exact else 2), n_rows=n_rows, n_cols=200,
                    space=space, route="gram" if exact else "sketch", exact=exact, meta={"hidden_size": 8})


def test_rank_expectation_sentences():
    from rankest.report.estimate import rank_expectation
    assert "equals the teacher's hidden size d = 8: the expected answer" in rank_expectation(_cliff(8))
    assert "bias" in rank_expectation(_cliff(9))
    assert "only N = 6 rows" in rank_expectation(_cliff(6, n_rows=6))
    assert "fewer directions" in rank_expectation(_cliff(5))
    assert "not a linear function" in rank_expectation(_cliff(12))
    assert "the expected answer" in rank_expectation(_cliff(9, space="logprob"))
    assert "no rank to recover" in rank_expectation(_cliff(8, space="prob"))
    assert "not determined" in rank_expectation(_cliff(8, exact=False, k=16))
