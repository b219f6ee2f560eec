"""`heads` against explicit oracles: truncated heads built here by numpy's fp64 SVD, the teacher's own
loss, separate single-rank runs, and the features read back from the cache; bad input; the CLI.

Tiny random GPT-NeoX teachers (randomised norms) in fp64 give tolerances near fp64 round-off;
the embedded SmolLM2 teacher (fp32) checks the full-rank svd init on a real model.
"""

import copy
import json
import math

import h5py
import numpy as np
import pytest
import torch

from rankest import UserError, cli, fit_heads
from rankest.heads import (HeadSpec, HeadSweep, evaluate_head, feature_truncations, lr_factor, paper_lr, parse_ranks,
                           weight_truncations)
from rankest.sources.teachers import load_teacher

SEQ = 32
WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which but have an "
         "they you were her she there been one all we their has would when if so no will more out up into do any "
         "river market school budget storm council bridge winter garden doctor rain fire train paper").split()


@pytest.fixture(scope="module")
def corpus_file(make_word_corpus):
    return make_word_corpus("heads-corpus", seed=77, paragraphs=60, words=WORDS)


@pytest.fixture(scope="module")
def neox_dir(make_tiny_neox):
    return str(make_tiny_neox("heads-neox", hidden_size=32, layers=2, heads=4, context_length=128, seed=5))


@pytest.fixture(scope="module")
def neox64(neox_dir, load_tiny_teacher):
    return load_tiny_teacher(neox_dir, "fp64")


@pytest.fixture(scope="module")
def neox32(neox_dir, load_tiny_teacher):
    return load_tiny_teacher(neox_dir, "fp32")


def run(teacher, corpus, **kw):
    opts = dict(teacher=teacher, corpus=corpus, seq_len=SEQ, tokens=512, val_tokens=128, batch_size=4,
                quiet=True, seed=3)
    opts.update(kw)
    return fit_heads(**opts)


def np_loss(h, w, targets, bias=None):
    """Plain numpy fp64 mean cross-entropy and accuracy of logits h·wᵀ (+ bias)."""
    z = h @ w.T + (0 if bias is None else bias)
    zmax = z.max(axis=1, keepdims=True)
    lse = zmax[:, 0] + np.log(np.exp(z - zmax).sum(axis=1))
    return float(np.mean(lse - z[np.arange(len(targets)), targets])), float(np.mean(z.argmax(1) == targets))


# ---- ranks, LR table, schedule ---------------------------------------------------------------
def test_parse_ranks_caps_dedupes_and_refuses():
    with pytest.warns(UserWarning, match="exceed"):
        assert parse_ranks("64,8,full,100,8", 32) == ([8, 32], ["8", "full"])
    assert parse_ranks([3, "full"], 5) == ([3, 5], ["3", "full"])
    for bad in ("0", "-4", "abc", "8,x", "", "1.5"):
        with pytest.raises(UserError):
            parse_ranks(bad, 32)


def test_paper_lr_table_and_schedule():
    assert [paper_lr(r) for r in (8, 32, 64, 256, 512, 768, 1024, 1536, 2048)] == \
        [2e-2, 2e-2, 1e-2, 1e-2, 7e-3, 5e-3, 5e-3, 2e-3, 2e-3]
    steps = 1000  # warm-up 10 steps, then cosine from 1 to 0.1 at the last step
    assert lr_factor(0, steps) == pytest.approx(0.1)
    assert lr_factor(9, steps) == pytest.approx(1.0)
    assert lr_factor(999, steps) == pytest.approx(0.1)
    mid = 10 + (999 - 10) / 2
    assert lr_factor(int(mid), steps) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (int(mid) - 10) / 989)))
    assert lr_factor(0, 1) == 1.0  # a one-step run uses the peak LR


# ---- truncations against numpy's SVD -------------------------------------------------------------
def test_truncations_equal_explicit_svd_heads():
    """Fresh random H (rows, d) and W (V', d): weight-space truncation = U_r S_r V_rᵀ of W; feature-metric
    truncation = the head whose logits are the best rank-r approximation of H·W_cᵀ (numpy SVD of the
    explicitly built N×V' matrix); both W-error curves from the explicit singular values."""
    rng = np.random.default_rng(11)
    n, d, v = 300, 24, 90
    h = rng.standard_normal((n, d)) @ np.diag(np.linspace(3, 0.2, d)) + 0.5
    w = rng.standard_normal((v, d)) * np.linspace(2, 0.1, d)
    ranks = [1, 5, 12, d]
    wf, werr_w = weight_truncations(torch.from_numpy(w), ranks)
    ff, werr_f = feature_truncations(torch.from_numpy(w), torch.from_numpy(h.T @ h), ranks)
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    wc = w - w.mean(0)
    m = h @ wc.T
    mu, ms, mvt = np.linalg.svd(m, full_matrices=False)
    for r in ranks:
        a, b = (x.numpy() for x in wf[r])
        np.testing.assert_allclose(a @ b, (u[:, :r] * s[:r]) @ vt[:r], atol=1e-10 * np.abs(w).max())
        a, b = (x.numpy() for x in ff[r])
        best = (mu[:, :r] * ms[:r]) @ mvt[:r]  # Eckart–Young on the explicit logit matrix
        np.testing.assert_allclose(h @ (a @ b).T, best, atol=1e-9 * np.abs(m).max())
        # H has full column rank, so the minimising head is unique: W_r = V_r V_rᵀ W_c
        np.testing.assert_allclose(a @ b, mvt[:r].T @ mvt[:r] @ wc, atol=1e-9 * np.abs(wc).max())
    tail = lambda sv: np.sqrt(np.concatenate([np.cumsum((sv ** 2)[::-1])[::-1][1:], [0]]) / (sv ** 2).sum())
    np.testing.assert_allclose(werr_w, tail(s), atol=1e-12)
    np.testing.assert_allclose(werr_f, tail(ms[:d]), atol=1e-10)


def test_feature_truncation_rank_deficient_features():
    """Features on a hyperplane through 0 (a LayerNorm with β = 0): G has rank d − 1; rank d − 1 already
    reproduces the logits H·W_cᵀ on such rows (eigh with a floor, not Cholesky)."""
    rng = np.random.default_rng(12)
    d, v = 16, 40
    h = rng.standard_normal((200, d))
    h -= h.mean(1, keepdims=True)  # every row sums to 0
    w = rng.standard_normal((v, d))
    ff, werr = feature_truncations(torch.from_numpy(w), torch.from_numpy(h.T @ h), [d - 1, d])
    wc = w - w.mean(0)
    for r in (d - 1, d):
        a, b = (x.numpy() for x in ff[r])
        np.testing.assert_allclose(h @ (a @ b).T, h @ wc.T, atol=1e-9 * np.abs(h @ wc.T).max())
    assert werr[d - 2] < 1e-7  # rank d − 1 already explains everything
    np.testing.assert_allclose(np.matmul(*(x.numpy() for x in ff[d])), wc, atol=1e-8 * np.abs(wc).max())
    # Fewer metric rows (10) than d: rank 10 reproduces their logits, and the full-rank head is W_c
    # itself, so new rows outside their span keep the teacher's logits.
    few = rng.standard_normal((10, d))
    ff, werr = feature_truncations(torch.from_numpy(w), torch.from_numpy(few.T @ few), [10, d])
    a, b = (x.numpy() for x in ff[10])
    np.testing.assert_allclose(few @ (a @ b).T, few @ wc.T, atol=1e-8 * np.abs(few @ wc.T).max())
    np.testing.assert_allclose(np.matmul(*(x.numpy() for x in ff[d])), wc, atol=1e-8 * np.abs(wc).max())
    assert werr[9] < 1e-6


# ---- the sweep -------------------------------------------------------------------------------------
@pytest.mark.parametrize("init", ["normal", "scaled", "svd"])
def test_sweep_equals_separate_runs(init):
    """Three ranks trained together for 4 steps equal three single-rank runs with the same seed.
    Every head does the same fp32 operations on the same rows in both settings and AdamW is
    elementwise, so they agree to fp32 round-off (we allow 1e-6 relative)."""
    g = torch.Generator().manual_seed(21)
    d, v, n = 20, 64, 96
    w = torch.randn(v, d, generator=g, dtype=torch.float64)
    batches = [(torch.randn(n, d, generator=g), torch.randint(0, v, (n,), generator=g)) for _ in range(4)]
    gram = sum(h.double().T @ h.double() for h, _ in batches)
    ff, _ = feature_truncations(w, gram, [2, 7, d])
    specs = [HeadSpec(2, 2e-2, "2"), HeadSpec(7, 1e-2, "7"), HeadSpec(d, 5e-3, "full")]
    kw = dict(n_cols=v, d=d, init=init, seed=9, steps=4, device=torch.device("cpu"), svd_factors=ff)
    together = HeadSweep(specs, **kw)
    alone = [HeadSweep([s], **kw) for s in specs]
    for h, t in batches:
        losses = together.step(h, t)
        for i, one in enumerate(alone):
            np.testing.assert_allclose(one.step(h, t), losses[i:i + 1], rtol=1e-6)
    for i, one in enumerate(alone):
        for p, q in ((together.A[i], one.A[0]), (together.B[i], one.B[0])):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_sweep_kl_full_rank_svd_has_zero_loss():
    """KL of the teacher's own distribution to itself is 0: the full-rank svd head starts at it (fp64)."""
    g = torch.Generator().manual_seed(4)
    d, v = 12, 30
    w = torch.randn(v, d, generator=g, dtype=torch.float64)
    h = torch.randn(80, d, generator=g, dtype=torch.float64)
    ff, _ = feature_truncations(w, h.T @ h, [3, d])
    sweep = HeadSweep([HeadSpec(3, 1e-3, "3"), HeadSpec(d, 1e-3, "full")], n_cols=v, d=d, init="svd", seed=0, steps=2,
                      device=torch.device("cpu"), dtype=torch.float64, svd_factors=ff, objective="kl")
    losses = sweep.step(h, torch.zeros(80, dtype=torch.long), teacher_weight=w)
    assert abs(losses[1]) < 1e-12 and losses[0] > 1e-3
    ev = evaluate_head(h, torch.zeros(80, dtype=torch.long), w, teacher_weight=w)
    assert abs(ev["kl"]) < 1e-12


# ---- end to end on the tiny fp64 teacher -----------------------------------------------------------
def test_truncation_and_svd_init_against_oracles(neox64, corpus_file, tmp_path):
    """From the features the run cached: the reference row is the plain fp64 loss of the teacher's head;
    the weight-space truncation equals numpy's truncated W; the feature-metric truncation (= the svd
    init) equals the head built from the explicit SVD of H_train·W_cᵀ, and at full rank reproduces the
    teacher's own validation loss (fp64: to 1e-10)."""
    cache = tmp_path / "feats.h5"
    res = run(neox64, corpus_file, ranks="2,6,full", init="svd", steps=2, lr=1e-4, cache_features=str(cache))
    with h5py.File(cache, "r") as f:
        htr, hva, tva = f["train_features"][...], f["val_features"][...], f["val_targets"][...]
    assert res.meta["gram_rows"] == len(htr) == 512 and len(hva) == res.meta["n_val_rows"] == 128
    n_cols = neox64.n_cols
    w = neox64.head()[0][:n_cols].double().numpy()
    ref_loss, ref_acc = np_loss(hva, w, tva)
    assert res.reference["loss"] == pytest.approx(ref_loss, abs=1e-10)
    assert res.reference["accuracy"] == pytest.approx(ref_acc, abs=1e-12)
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    wc = w - w.mean(0)
    _, _, mvt = np.linalg.svd(htr @ wc.T, full_matrices=False)
    for i, r in enumerate(res.ranks):
        lw, _ = np_loss(hva, (u[:, :r] * s[:r]) @ vt[:r], tva)
        lf, _ = np_loss(hva, mvt[:r].T @ mvt[:r] @ wc, tva)
        assert res.truncation_loss[i] == pytest.approx(lw, abs=1e-9)
        assert res.truncation_loss_feature[i] == pytest.approx(lf, abs=1e-9)
    assert res.labels[-1] == "full" and res.ranks[-1] == 32
    assert res.truncation_loss_feature[-1] == pytest.approx(ref_loss, abs=1e-10)
    assert res.truncation_loss[-1] == pytest.approx(ref_loss, abs=1e-10)
    assert res.head_w_error_weight[-1] == 0 and res.head_w_error_feature[-1] == pytest.approx(0, abs=1e-7)
    # A full-rank svd head with a negligible LR stays at the teacher's loss after its steps.
    res0 = run(neox64, corpus_file, ranks="full", init="svd", steps=1, lr=1e-14)
    assert res0.val_loss[0] == pytest.approx(ref_loss, abs=1e-10)


def test_svd_trained_head_beats_its_truncation(neox32, corpus_file):
    """Next-token CE training from the svd init never ends above the truncation it started from."""
    res = run(neox32, corpus_file, ranks="3,8", init="svd", steps=24, lr=3e-3)
    for i in range(len(res.ranks)):
        assert res.val_loss[i] <= res.truncation_loss_feature[i]
        assert res.train_loss[-1, i] < res.train_loss[0, i]


def test_sweep_run_equals_separate_runs_end_to_end(neox32, corpus_file):
    """fit_heads with ranks 2,5 equals fit_heads with 2 and with 5 (same seed, same batches), fp32."""
    kw = dict(init="normal", steps=3)
    both = run(neox32, corpus_file, ranks="2,5", **kw)
    for i, r in enumerate((2, 5)):
        one = run(neox32, corpus_file, ranks=str(r), **kw)
        assert one.val_loss[0] == pytest.approx(both.val_loss[i], rel=1e-6)
        np.testing.assert_allclose(one.train_loss[:, 0], both.train_loss[:, i], rtol=1e-6)
        assert one.lr == [paper_lr(r)]


def test_cached_and_on_the_fly_agree_and_cache_is_checked(neox32, neox_dir, corpus_file, tmp_path, make_tiny_neox):
    cache = tmp_path / "c.h5"
    kw = dict(ranks="4,full", init="scaled", steps=3, objective="kl")
    fly = run(neox32, corpus_file, **kw)
    first = run(neox32, corpus_file, cache_features=str(cache), **kw)  # writes the cache
    again = run(neox32, corpus_file, cache_features=str(cache), **kw)  # reads it
    for res in (first, again):
        np.testing.assert_allclose(res.val_loss, fly.val_loss, rtol=1e-6)
        np.testing.assert_allclose(res.val_kl, fly.val_kl, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(res.truncation_loss_feature, fly.truncation_loss_feature, rtol=1e-6)
    assert again.meta["features"].startswith("cache:")
    # Another teacher with the same tokenizer, another tokenizer, or other rows: refused.
    other = load_teacher(make_tiny_neox("heads-other", seed=8), device="cpu", dtype="fp32")
    with pytest.raises(UserError, match="different teacher"):
        run(other, corpus_file, cache_features=str(cache), **kw)
    imposter = copy.copy(neox32)
    imposter.tokenizer = other.tokenizer.__class__.from_pretrained(make_tiny_neox("heads-tok", tokenizer_vocab=300))
    with pytest.raises(UserError, match="different tokenizer"):
        run(imposter, corpus_file, cache_features=str(cache), **kw)
    with pytest.raises(UserError, match="other rows"):
        run(neox32, corpus_file, cache_features=str(cache), **{**kw, "seed": 4})


# ---- bad input ---------------------------------------------------------------------------------------
def test_bad_input(neox32, corpus_file):
    with pytest.raises(UserError, match="fewer than the 100"):
        run(neox32, corpus_file, val_tokens=50, ranks="2")
    with pytest.raises(UserError, match="validation split alone needs"):
        run(neox32, corpus_file, val_tokens=100_000, ranks="2")
    with pytest.raises(UserError, match="not positive"):
        run(neox32, corpus_file, ranks="0,4")
    with pytest.raises(UserError, match="--init"):
        run(neox32, corpus_file, init="xavier")
    with pytest.raises(UserError, match="--objective"):
        run(neox32, corpus_file, objective="mse")
    with pytest.raises(UserError, match="only one"):
        run(neox32, corpus_file, lr=1e-3, lr_search=True)
    # A teacher whose logits are not its head applied to its features cannot be distilled with kl.
    capped = copy.copy(neox32)
    capped.full_logits = lambda ids: 30 * torch.tanh(neox32.full_logits(ids) / 30)
    with pytest.raises(UserError, match="use --objective ce"):
        run(capped, corpus_file, objective="kl", ranks="2", steps=1)


def test_lr_search_picks_from_the_grid(neox32, corpus_file):
    res = run(neox32, corpus_file, ranks="2,full", init="scaled", steps=20, lr_search=True)
    for lab, r, lr in zip(res.labels, res.ranks, res.lr):
        tried = res.lr_search[lab]
        assert len(tried) == 3 and lr == pytest.approx(paper_lr(r) * [0.5, 1, 2][
            int(np.argmin(list(tried.values())))], rel=1e-2)


def test_cli_writes_the_run_folder(neox_dir, corpus_file, tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match="exceed"):  # the notice that 500 > min(d, V') became full
        code = cli.main(["heads", "--teacher", neox_dir, "--corpus", corpus_file, "--seq-len", str(SEQ),
                         "--tokens", "512", "--val-tokens", "128", "--ranks", "2,8,500", "--init", "svd",
                         "--steps", "2", "--quiet", "--out", str(out)])
    assert code == 0
    summary = json.loads((out / "heads.json").read_text())
    assert summary["ranks"] == [2, 8, 32] and summary["labels"] == ["2", "8", "full"]
    for key in ("val_loss", "val_accuracy", "val_perplexity", "truncation_loss", "head_w_error_weight",
                "head_w_error_feature"):
        assert len(summary[key]) == 3
    assert summary["val_perplexity"][0] == pytest.approx(math.exp(summary["val_loss"][0]))
    for f in ("heads.h5", "heads.md", "report.md", "heads_loss_vs_rank.png", "heads_loss_vs_w_error.png"):
        assert (out / f).is_file()
    from rankest.heads.pipeline import HeadsResult

    back = HeadsResult.load(out / "heads.h5")
    assert back.val_loss == summary["val_loss"] and back.w_error_weight_curve.shape == (32,)
    # A teacher the paper used gets its digitised Fig. 6 numbers in the report.
    from rankest.report.heads import PAPER_FIG6, paper_key, write_heads_report

    back.meta["teacher"] = "EleutherAI/pythia-1b"
    assert paper_key(back.meta["teacher"]) == "pythia-1b" and paper_key(neox_dir) is None
    text = write_heads_report(tmp_path, back).read_text()
    assert "Paper Fig. 6 (pythia-1b" in text and f"r = 2048: {PAPER_FIG6['pythia-1b'][2048]}" in text
    assert cli.main(["heads", "--teacher", neox_dir, "--corpus", corpus_file, "--ranks", "8,abc", "--quiet"]) == 2
    assert "--ranks entry 'abc'" in capsys.readouterr().err


# ---- the embedded teacher --------------------------------------------------------------------------
def test_embedded_svd_full_rank_reproduces_teacher_loss(embedded_teacher):
    """SmolLM2-135M (d = 576, V' = 49,152, fp32): the full-rank svd head gives the teacher's own
    validation loss, even from a Gram of 128 < d rows (the floored metric makes it W_c itself). Its
    logits differ from the teacher's by a per-row constant plus fp32 rounding of the factors
    (≈ 1e-7 relative, logits of O(10)), so 1e-5 nats. One step at a negligible LR keeps the trained
    full-rank head there too."""
    with pytest.warns(UserWarning, match="fewer than d"):
        res = fit_heads(teacher=embedded_teacher, seq_len=64, tokens=128, val_tokens=128, ranks="64,full",
                        init="svd", steps=1, lr=1e-12, batch_size=2, quiet=True)
    assert res.ranks == [64, 576] and res.meta["gram_rows"] == 128
    assert res.truncation_loss_feature[1] == pytest.approx(res.reference["loss"], abs=1e-5)
    assert res.val_loss[1] == pytest.approx(res.reference["loss"], abs=1e-5)
    assert res.truncation_loss[1] == pytest.approx(res.reference["loss"], abs=1e-5)
    assert res.truncation_loss_feature[0] > res.reference["loss"] + 0.05  # rank 64 costs something
