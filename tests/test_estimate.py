"""`estimate` end to end on tiny random GPT-NeoX teachers (real Pythia architecture), against an
exact fp64 SVD of the explicitly built target matrix; the CLI on the embedded default; bad input.
"""

import json
import math

import numpy as np
import pytest
import torch

from rankest import cli
from rankest.sources.corpus import iter_batches, load_documents, pack_windows, plan_rows
from rankest.estimator.pipeline import run_estimate
from rankest.ops import reference
from rankest.spectrum import Spectrum
from rankest.sources.teachers import load_teacher

SEQ = 32
D = 32
#: The tiny GPT-NeoX of this file (`make_tiny_neox` kwargs; each teacher adds its seed).
NEOX = dict(hidden_size=D, layers=2, heads=4, context_length=128)


@pytest.fixture(scope="module")
def corpus_file(make_word_corpus):
    return make_word_corpus("corpus", seed=2024, paragraphs=40)  # rankest.testing.WORDS


@pytest.fixture(scope="module")
def neox_dir(make_tiny_neox):
    return str(make_tiny_neox("neox", **NEOX, seed=1))


@pytest.fixture(scope="module")
def neox64(neox_dir, load_tiny_teacher):
    return load_tiny_teacher(neox_dir, "fp64")


def explicit_matrix(teacher, corpus, space):
    """The N×V' target matrix built explicitly from the model's OWN forward (full_logits), all rows."""
    windows = pack_windows(load_documents(corpus), teacher.tokenizer, SEQ)
    plan = plan_rows(len(windows), SEQ, positions="all", tokens=None, seed=0)
    rows = []
    with torch.inference_mode():
        for b in iter_batches(windows, plan, 16):
            logits = teacher.full_logits(b.input_ids)[b.mask]
            r, _ = reference.transform_rows(logits, b.targets[b.mask], teacher.n_cols, space, True, torch.float64)
            rows.append(r)
    return torch.cat(rows).numpy()


def exact_w_error(s):
    tail = np.cumsum((s ** 2)[::-1])[::-1]
    return np.sqrt(np.concatenate([tail[1:], [0.0]]) / tail[0])


def gram_sigma_tol(exact, precision_eps):
    """Error model of a Gram route: |Δσ_i| ≲ 1e-6·σ_i + c·eps·σ_1²/σ_i (the Gram squares the condition)."""
    return 1e-6 * exact + 50 * precision_eps * exact[0] ** 2 / exact


@pytest.mark.parametrize("space", ["clr", "prob", "logprob"])
def test_gram_route_equals_exact_svd_fp64(neox64, corpus_file, space):
    t = explicit_matrix(neox64, corpus_file, space)
    exact = np.linalg.svd(t, compute_uv=False)
    spec = run_estimate(teacher=neox64, corpus=corpus_file, tokens=None, seq_len=SEQ, space=space, route="gram",
                        quiet=True, batch_size=16)
    assert spec.n_rows == t.shape[0] and spec.n_cols == t.shape[1] == neox64.n_cols
    keep = exact >= 1e-6 * exact[0]
    got = spec.sigma[: keep.sum()]
    assert np.all(np.abs(got - exact[keep]) <= gram_sigma_tol(exact[keep], 2.0 ** -52))
    k = int(keep.sum())
    np.testing.assert_allclose(spec.w_error()[:k], exact_w_error(exact)[:k], atol=1e-6)
    assert spec.energy == pytest.approx(float((t ** 2).sum()), rel=1e-10)
    assert abs(spec.off_model_energy) < 1e-10


def test_factor_equals_exact_and_gram_on_clr(neox64, corpus_file):
    t = explicit_matrix(neox64, corpus_file, "clr")
    exact = np.linalg.svd(t, compute_uv=False)
    f = run_estimate(teacher=neox64, corpus=corpus_file, tokens=None, seq_len=SEQ, route="factor", quiet=True)
    g = run_estimate(teacher=neox64, corpus=corpus_file, tokens=None, seq_len=SEQ, route="gram", quiet=True)
    auto = run_estimate(teacher=neox64, corpus=corpus_file, tokens=None, seq_len=SEQ, quiet=True)
    assert auto.route == "factor" and "linear head" in auto.meta["route_reason"]
    r = f.sigma.size
    keep = exact[:r] >= 1e-6 * exact[0]
    np.testing.assert_allclose(f.sigma[:r][keep], exact[:r][keep], rtol=1e-6)
    np.testing.assert_allclose(f.sigma[keep], g.sigma[: r][keep], rtol=1e-6)
    np.testing.assert_allclose(f.w_error()[: r - 1], exact_w_error(exact)[: r - 1], atol=1e-6)
    # A trained-like model (random LayerNorm β ≠ 0): the clr rank is d.
    assert f.numerical_rank == D == g.numerical_rank


def test_fresh_layernorm_gives_rank_d_minus_1(make_tiny_neox, corpus_file):
    # A freshly initialised LayerNorm (β = 0) puts features on a hyperplane: rank d − 1.
    teacher = load_teacher(make_tiny_neox("fresh", **NEOX, seed=2, randomize_norms=False), device="cpu",
                           dtype="fp64")
    spec = run_estimate(teacher=teacher, corpus=corpus_file, tokens=None, seq_len=SEQ, quiet=True)
    assert spec.route == "factor"
    assert spec.numerical_rank == D - 1


@pytest.mark.parametrize("gram_precision", ["fp64", "fast"])
def test_fp32_chunks_within_1e_4(neox_dir, load_tiny_teacher, corpus_file, gram_precision):
    # An fp32 teacher's rows, accumulated from fp32 chunks, against the fp64 SVD of the same rows
    # (the fp32 forward itself moves σ_i by ~1e-7·σ_1, which is not the accumulation's error).
    teacher32 = load_tiny_teacher(neox_dir, "fp32")
    t = explicit_matrix(teacher32, corpus_file, "prob")
    exact = np.linalg.svd(t, compute_uv=False)
    spec = run_estimate(teacher=teacher32, corpus=corpus_file, tokens=None, seq_len=SEQ, space="prob", route="gram",
                        gram_precision=gram_precision, quiet=True)
    keep = exact >= 1e-3 * exact[0]
    err = np.abs(spec.sigma[: keep.sum()] - exact[keep]) / exact[keep]
    if gram_precision == "fp64":
        # fp32 rows, fp64 products and carry: exact products, so only fp64 round-off remains.
        assert err.max() <= 1e-4
    else:
        # fp32 products: a Gram squares the condition, |Δσ_i|/σ_i ≲ 2^-24·(σ_1/σ_i)² (+ the 1e-4 target).
        assert np.all(err <= 1e-4 + 2.0 ** -24 * (exact[0] / exact[keep]) ** 2)


def test_sampled_rows_convergence_and_run_folder(neox64, corpus_file, tmp_path):
    out = tmp_path / "run"
    spec = run_estimate(teacher=neox64, corpus=corpus_file, tokens=600, seq_len=SEQ, out=str(out), quiet=True, seed=3)
    assert spec.n_rows == 600
    assert sorted(spec.convergence) == [75, 150, 300, 600]
    for n, c in spec.convergence.items():
        assert c["numerical_rank"] <= min(n, D + 1)
    summary = json.loads((out / "results.json").read_text())
    for key in ("sigma_1", "rank_at", "numerical_rank", "effective_rank", "stable_rank", "off_model_energy",
                "n_rows", "n_cols", "space", "route", "route_reason", "teacher", "corpus", "nll", "perplexity",
                "convergence", "config", "provenance"):
        assert key in summary, key
    assert summary["provenance"]["torch_version"] == torch.__version__
    assert math.isclose(summary["perplexity"], math.exp(summary["nll"]), rel_tol=1e-9)
    back = Spectrum.load(out / "results.h5")
    np.testing.assert_array_equal(back.sigma, spec.sigma)
    report = (out / "report.md").read_text()
    assert "rank_at(0.1)" in report and "w_error.png" in report
    for png in ("spectrum.png", "w_error.png", "convergence.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the same seed gives the same rows; another seed other rows
    again = run_estimate(teacher=neox64, corpus=corpus_file, tokens=600, seq_len=SEQ, quiet=True, seed=3)
    np.testing.assert_array_equal(again.sigma, spec.sigma)
    other = run_estimate(teacher=neox64, corpus=corpus_file, tokens=600, seq_len=SEQ, quiet=True, seed=4)
    assert not np.array_equal(other.sigma, spec.sigma)
    # an existing folder is refused without --overwrite, and nothing in it is touched
    before = (out / "results.json").read_bytes()
    with pytest.raises(Exception, match="already exists"):
        run_estimate(teacher=neox64, corpus=corpus_file, tokens=600, seq_len=SEQ, out=str(out), quiet=True)
    assert (out / "results.json").read_bytes() == before


# ---- CLI -----------------------------------------------------------------------------------------

def _cli(args, capsys):
    code = cli.main(args)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_cli_embedded_default_end_to_end(embedded_teacher, monkeypatch, tmp_path, capsys):
    # The real loading of the embedded teacher is exercised once, by the session fixture; the CLI
    # reuses that model instead of loading it a second time.
    import rankest.sources.teachers as teachers

    monkeypatch.setattr(teachers, "load_teacher", lambda *a, **k: embedded_teacher)
    out = tmp_path / "run"
    code, stdout, err = _cli(["estimate", "--tokens", "384", "--seq-len", "64", "--out", str(out), "--quiet"], capsys)
    assert code == 0, err
    assert "rank_at(0.5)" in stdout
    summary = json.loads((out / "results.json").read_text())
    assert summary["route"] == "factor" and summary["n_rows"] == 384 and summary["n_cols"] == 49152
    assert summary["corpus"] == "lee"
    # A 135M instruct model on news text: perplexity well above 1, far below the vocabulary size.
    assert 2.0 < summary["perplexity"] < 200.0
    assert summary["numerical_rank"] <= 384
    assert (out / "report.md").exists()
    code, stdout, _ = _cli(["report", str(out)], capsys)
    assert code == 0 and "report.md" in stdout


def test_cli_teachers_lists_table(capsys):
    code, stdout, _ = _cli(["teachers"], capsys)
    assert code == 0 and "pythia-6.9b" in stdout and "EleutherAI/pythia-6.9b" in stdout


@pytest.mark.parametrize("args, needle", [
    (["--teacher", "pythia-7b"], "pythia-6.9b"),
    (["--corpus", "no-such-corpus-xyz"], "no-such-corpus-xyz"),
    (["--tokens", "100000000"], "rows"),
    (["--seq-len", "100000"], "context"),
])
def test_cli_bad_input_exits_2(neox_dir, corpus_file, tmp_path, capsys, args, needle):
    base = ["estimate", "--teacher", neox_dir, "--corpus", corpus_file, "--seq-len", "32", "--quiet",
            "--tokens", "64"]
    code, _, err = _cli(base + args, capsys)
    assert code == 2, err
    assert needle in err
    assert "Traceback" not in err
    # one sentence, on one line, after any progress output
    assert err.strip().splitlines()[-1].startswith("rankest: error: ")


def test_cli_bad_flags_exit_2(capsys):
    for args in (["estimate", "--space", "svd"], ["estimate", "--tokens", "-3"], ["estimate", "--positions", "every"],
                 ["estimate", "--seq-len", "0"], ["estimate", "--route", "factor", "--space", "prob"]):
        with pytest.raises(SystemExit) as e:
            code = cli.main(args)
            raise SystemExit(code)
        assert e.value.code == 2, args
        capsys.readouterr()


def test_cli_unwritable_output(neox_dir, corpus_file, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = _cli(["estimate", "--teacher", neox_dir, "--corpus", corpus_file, "--seq-len", "32",
                         "--tokens", "64", "--out", str(blocker / "run"), "--quiet"], capsys)
    assert code == 2 and "--out" in err


def test_nan_logits_error_names_the_batch(make_tiny_neox, corpus_file, capsys):
    folder = make_tiny_neox("nan", **NEOX, seed=5)
    teacher = load_teacher(folder, device="cpu", dtype="fp32")  # its own: the test poisons its head
    with torch.no_grad():
        teacher.head()[0][3, 0] = float("nan")  # one poisoned head row: every logit row gets a NaN
    with pytest.raises(Exception, match="NaN/Inf logits in batch 0"):
        run_estimate(teacher=teacher, corpus=corpus_file, tokens=64, seq_len=SEQ, quiet=True, route="gram")


def test_sketch_route_is_one_sided_and_reported(neox64, corpus_file, tmp_path):
    t = explicit_matrix(neox64, corpus_file, "prob")
    exact = np.linalg.svd(t, compute_uv=False)
    out = tmp_path / "sk"
    spec = run_estimate(teacher=neox64, corpus=corpus_file, tokens=None, seq_len=SEQ, space="prob", route="sketch",
                        rank_max=40, quiet=True, out=str(out))
    assert spec.route == "sketch" and not spec.exact and spec.sigma.size == 40
    # --passes auto for a neural teacher: one pass (a second would be another forward over the corpus)
    assert spec.meta["passes"] == 1 and spec.meta["method"] == "nystrom" and not (out / "rows.h5").exists()
    assert np.all(spec.sigma <= exact[:40] * (1 + 1e-9))  # Nyström: σ̂_i ≤ σ_i
    w_true = exact_w_error(exact)[:40]
    assert np.all(spec.w_error() >= w_true - 1e-9)  # tails are upper bounds
    trusted = spec.meta["trusted_d"]
    assert 1 <= trusted <= 40
    assert np.all(np.abs(spec.w_error()[:trusted] - w_true[:trusted]) <= 1e-2)
    assert spec.energy == pytest.approx(float((t ** 2).sum()), rel=1e-10)
    summary = json.loads((out / "results.json").read_text())
    assert summary["trusted_d"] == trusted and "sketch_error" in summary
    assert "sketch" in (out / "report.md").read_text()


def test_sketch_with_k_at_least_v_falls_back_to_gram(neox64, corpus_file):
    with pytest.warns(UserWarning, match="exact gram route"):
        spec = run_estimate(teacher=neox64, corpus=corpus_file, tokens=256, seq_len=SEQ, space="prob",
                            route="sketch", rank_max=neox64.n_cols, quiet=True)
    assert spec.route == "gram" and spec.exact


@pytest.mark.parametrize("cache_dtype", ["auto", "bf16"])
def test_multipass_sketch_beats_one_pass_and_matches_exact(neox64, corpus_file, tmp_path, cache_dtype):
    """--passes 4: the rows are cached once (the teacher runs once) and re-read; the result is
    still one-sided and much closer to the exact SVD than one pass (fp64 rows, fp64 cache);
    a bf16 cache is bounded by the rounding of its rows (relative 2^-9 per entry)."""
    t = explicit_matrix(neox64, corpus_file, "prob")
    exact = np.linalg.svd(t, compute_uv=False)
    k = 40
    out = tmp_path / f"mp-{cache_dtype}"
    one = run_estimate(teacher=neox64, corpus=corpus_file, tokens=None, seq_len=SEQ, space="prob", route="sketch",
                       rank_max=k, quiet=True)
    many = run_estimate(teacher=neox64, corpus=corpus_file, tokens=None, seq_len=SEQ, space="prob", route="sketch",
                        rank_max=k, passes=4, row_cache_dtype=cache_dtype, quiet=True, out=str(out))
    assert many.route == "sketch" and many.meta["passes"] == 4 and many.sigma.size == k
    assert "--passes 4" in many.meta["route_reason"]
    assert not (out / "rows.h5").exists()  # the cache is removed once the passes are done
    rel = np.abs(many.sigma[: k // 2] - exact[: k // 2]) / exact[: k // 2]
    rel_one = np.abs(one.sigma[: k // 2] - exact[: k // 2]) / exact[: k // 2]
    if cache_dtype == "auto":  # fp64 rows → fp64 cache
        assert many.meta["row_cache"]["dtype"] == "fp64"
        assert np.all(many.sigma <= exact[:k] * (1 + 1e-9))
        assert rel.max() <= 1e-3 and rel.max() < rel_one.max()
    else:
        assert rel.max() <= 1e-3 + 2 * 2.0 ** -9
    w_true = exact_w_error(exact)[:k]
    assert np.abs(many.w_error()[: k // 2] - w_true[: k // 2]).max() <= 1e-2
    assert json.loads((out / "results.json").read_text())["route"] == "sketch"


def test_passes_bad_input(neox64, corpus_file, capsys, neox_dir):
    from rankest.errors import UserError

    with pytest.raises(UserError, match="sketch route only"):
        run_estimate(teacher=neox64, corpus=corpus_file, tokens=64, seq_len=SEQ, space="prob", route="gram",
                     passes=3, quiet=True)
    with pytest.raises(UserError, match="--passes"):
        run_estimate(teacher=neox64, corpus=corpus_file, tokens=64, seq_len=SEQ, passes=0, quiet=True)
    # auto route resolving to an exact route ignores --passes, and says so
    spec = run_estimate(teacher=neox64, corpus=corpus_file, tokens=64, seq_len=SEQ, space="prob", passes=3,
                        quiet=True)
    assert spec.exact and "ignored" in spec.meta["route_reason"]
    for bad in (["--passes", "0"], ["--passes", "two"], ["--row-cache-dtype", "int8"]):
        assert cli.main(["estimate", *bad]) == 2  # argparse's refusals: the sentence, then --help
        assert "--help" in capsys.readouterr().err


def test_python_api_estimate(neox64, corpus_file):
    """rankest.estimate(...) is run_estimate under the package's name (the Python API)."""
    import rankest

    spec = rankest.estimate(teacher=neox64, corpus=corpus_file, tokens=64, seq_len=SEQ, space="prob", quiet=True)
    assert isinstance(spec, rankest.Spectrum) and spec.n_rows == 64 and spec.route == "gram"
