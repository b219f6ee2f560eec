"""n-gram targets: the compiled counting and sparse Gram ops against brute force, the rows
against a dense reference, the spectrum against an exact fp64 SVD, corpora of known rank, the
estimate integration and bad input."""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict

import numpy as np
import pytest
import torch

from rankest import ops
from rankest.errors import UserError
from rankest.targets.ngram import build_rows, count_ngrams
from rankest.estimator.pipeline import ngram_spectrum

IMPLS = [pytest.param(ops, id="compiled"), pytest.param(ops.reference, id="reference")]


def random_stream(rng, length, vocab, p_boundary=0.02):
    t = rng.integers(0, vocab, size=length)
    t[rng.random(length) < p_boundary] = -1
    return torch.from_numpy(t.astype(np.int64))


def brute_counts(stream, n):
    t = stream.tolist()
    c = Counter(tuple(t[i:i + n]) for i in range(len(t) - n + 1) if min(t[i:i + n]) >= 0)
    return sorted(c.items())


# ---- ngram_count ---------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("order", [1, 2, 3, 5])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_ngram_count_matches_brute_force(impl, order, dtype):
    rng = np.random.default_rng(order)
    # dense repeats, sparse, all distinct; 2^40 forces the general (unpacked) path: n·40 bits > 128
    for vocab, length in ((3, 3000), (50, 2000), (100000, 500), (2**40 if dtype == torch.int64 else 2**31 - 1, 300)):
        stream = random_stream(rng, length, vocab).to(dtype)
        grams, counts = impl.ngram_count(stream, order)
        got = [(tuple(g), int(c)) for g, c in zip(grams.tolist(), counts.tolist())]
        assert got == brute_counts(stream, order)
        assert grams.dtype == torch.int64 and grams.shape == (len(got), order)


def test_ngram_count_edge_cases():
    assert ops.ngram_count(torch.tensor([1, 2], dtype=torch.int64), 3)[0].shape == (0, 3)
    assert ops.ngram_count(torch.full((10,), -1, dtype=torch.int64), 2)[0].shape == (0, 2)
    for big in (0, 2**60):  # one n-gram many times, packed and general path
        g, c = ops.ngram_count(torch.full((10000,), big, dtype=torch.int64), 4)
        assert g.tolist() == [[big] * 4] and c.tolist() == [9997]
    # the general path with repeats: a few huge token values
    rng = np.random.default_rng(0)
    stream = torch.from_numpy(rng.choice(np.array([2**50, 2**50 + 1, 7, -1]), size=3000))
    g, c = ops.ngram_count(stream, 3)
    assert [(tuple(x), int(y)) for x, y in zip(g.tolist(), c.tolist())] == brute_counts(stream, 3)


@pytest.mark.parametrize("impl", IMPLS)
def test_ngram_count_bad_input(impl):
    with pytest.raises(ValueError):
        impl.ngram_count(torch.zeros(5, dtype=torch.int64), 0)
    with pytest.raises(ValueError):
        impl.ngram_count(torch.zeros(5, dtype=torch.float32), 2)
    with pytest.raises(ValueError):
        impl.ngram_count(torch.zeros(2, 5, dtype=torch.int64), 2)


# ---- sparse_gram_update --------------------------------------------------------------------------
def random_csr(rng, n, v, density):
    dense = np.where(rng.random((n, v)) < density, rng.standard_normal((n, v)), 0.0)
    crow = np.zeros(n + 1, np.int64)
    crow[1:] = np.cumsum((dense != 0).sum(axis=1))
    r, c = np.nonzero(dense)
    return dense, torch.from_numpy(crow), torch.from_numpy(c.astype(np.int64)), torch.from_numpy(dense[r, c])


@pytest.mark.parametrize("impl", IMPLS)
def test_sparse_gram_update_matches_dense(impl):
    rng = np.random.default_rng(1)
    v = 37
    gram = torch.from_numpy(rng.standard_normal((v, v)))  # upper triangle must stay untouched
    start = gram.clone()
    dense_all = []
    for n, density in ((20, 0.1), (0, 0.5), (15, 0.9), (7, 0.0)):
        dense, crow, col, val = random_csr(rng, n, v, density)
        impl.sparse_gram_update(gram, crow, col, val)
        dense_all.append(dense)
    d = np.concatenate(dense_all)
    expected = start.numpy() + d.T @ d
    low = np.tril_indices(v)
    np.testing.assert_allclose(gram.numpy()[low], expected[low], rtol=1e-12, atol=1e-12)
    up = np.triu_indices(v, 1)
    assert np.array_equal(gram.numpy()[up], start.numpy()[up])


@pytest.mark.parametrize("impl", IMPLS)
def test_sparse_gram_update_bad_input(impl):
    g = torch.zeros(4, 4, dtype=torch.float64)
    ok = dict(crow=torch.tensor([0, 2]), col=torch.tensor([0, 3]), val=torch.tensor([1.0, 2.0], dtype=torch.float64))
    impl.sparse_gram_update(g, **ok)
    bad = [
        dict(ok, col=torch.tensor([3, 0])),  # not increasing
        dict(ok, col=torch.tensor([1, 1])),  # duplicate
        dict(ok, col=torch.tensor([0, 4])),  # out of range
        dict(ok, crow=torch.tensor([0, 3])),  # crow[-1] != nnz
        dict(ok, val=torch.tensor([1.0, 2.0])),  # float32
    ]
    for kw in bad:
        with pytest.raises(ValueError):
            impl.sparse_gram_update(g, **kw)
    with pytest.raises(ValueError):
        impl.sparse_gram_update(torch.zeros(4, 3, dtype=torch.float64), **ok)


@pytest.mark.skipif(not ops._has_kernel("sparse_gram_update", torch.device("cpu")),
                    reason="the loaded extension has no sparse_gram_update kernel")
def test_opcheck_sparse_gram_update():
    rng = np.random.default_rng(3)
    _, crow, col, val = random_csr(rng, 6, 9, 0.4)
    torch.library.opcheck(torch.ops.rankest.sparse_gram_update.default,
                          (torch.zeros(9, 9, dtype=torch.float64), crow, col, val))


# ---- rows against a dense reference -----------------------------------------------------------------
def expand(rows, dense_compressed):
    """Compressed (R, width) rows → full (R, V) rows (the merged column back to V − m copies)."""
    full = np.zeros((dense_compressed.shape[0], rows.vocab))
    full[:, rows.cols] = dense_compressed[:, :rows.m]
    if rows.width > rows.m:
        other = np.setdiff1d(np.arange(rows.vocab), rows.cols)
        full[:, other] = dense_compressed[:, rows.m:rows.m + 1] / math.sqrt(rows.rest)
    return full


def kn_reference(stream, n, vocab):
    """Interpolated Kneser–Ney written from the definition (Chen & Goodman 1999), plain Python:
    p(w | h) for every n−1 token context h of the stream → {h: [p(w) for w < vocab]}."""
    t = stream.tolist()
    grams = {j: Counter(tuple(t[i:i + j]) for i in range(len(t) - j + 1) if min(t[i:i + j]) >= 0)
             for j in range(1, n + 1)}
    # counts per order: raw at the top, continuation counts N1+(• g) below
    cnt = {n: dict(grams[n])}
    for j in range(n - 1, 0, -1):
        cont = Counter(g[1:] for g in cnt[j + 1])
        cnt[j] = dict(cont)
    disc = {}
    for j, c in cnt.items():
        n1 = sum(1 for v in c.values() if v == 1)
        n2 = sum(1 for v in c.values() if v == 2)
        disc[j] = n1 / (n1 + 2 * n2) if n1 + 2 * n2 else 0.5
    by_ctx = {j: defaultdict(dict) for j in cnt}
    for j, c in cnt.items():
        for g, v in c.items():
            by_ctx[j][g[:-1]][g[-1]] = v

    def p(j, h):
        if j == 0:
            return np.full(vocab, 1.0 / vocab)
        lower = p(j - 1, h[1:])
        nxt = by_ctx[j].get(h)
        if not nxt:
            return lower
        tot = sum(nxt.values())
        out = lower * disc[j] * len(nxt) / tot
        for w, v in nxt.items():
            out[w] += max(v - disc[j], 0) / tot
        return out

    return {h: p(n, h) for h in by_ctx[n]}


ROW_CASES = [(sm, sp, w) for sm in ("mle", "add-k:0.5", "kn") for sp in ("prob", "clr") for w in ("equal", "count")
             if not (sp == "clr" and sm == "mle")]  # clr of MLE is refused: test_cli_bad_input


@pytest.mark.parametrize("smoothing,space,weighting", ROW_CASES)
def test_rows_match_dense_reference(smoothing, space, weighting):
    rng = np.random.default_rng(7)
    vocab, n = 30, 3
    stream = random_stream(rng, 600, 12, p_boundary=0.03)  # tokens 12..29 never occur
    counts = count_ngrams(stream, n)
    rows = build_rows(counts, vocab=vocab, smoothing=smoothing, space=space, weighting=weighting, seed=3)
    got = expand(rows, rows.dense_chunk(rows.sel))
    kn = kn_reference(stream, n, vocab) if smoothing == "kn" else None
    t = stream.tolist()
    by_ctx = defaultdict(Counter)
    for i in range(len(t) - n + 1):
        if min(t[i:i + n]) >= 0:
            by_ctx[tuple(t[i:i + n - 1])][t[i + n - 1]] += 1
    assert len(rows.sel) == len(by_ctx)
    for r, ci in enumerate(rows.sel):
        h = tuple(counts.contexts[ci])
        c = np.zeros(vocab)
        for w, v in by_ctx[h].items():
            c[w] = v
        if smoothing == "mle":
            p = c / c.sum()
        elif smoothing == "kn":
            p = kn[h]
        else:
            p = (c + 0.5) / (c.sum() + 0.5 * vocab)
        np.testing.assert_allclose(p.sum(), 1.0, rtol=1e-12)
        x = p if space == "prob" else np.log(p) - np.log(p).mean()
        if weighting == "count":
            x = x * math.sqrt(c.sum())
        np.testing.assert_allclose(got[r], x, rtol=1e-10, atol=1e-13)
    # the sparse route's energy is the dense rows' squared norm
    np.testing.assert_allclose(rows.row_energy(rows.sel), (got ** 2).sum(), rtol=1e-10)


# ---- spectrum against the exact SVD ---------------------------------------------------------------
@pytest.mark.parametrize("smoothing,space,weighting", [
    ("mle", "prob", "equal"), ("mle", "prob", "count"), ("add-k:1", "prob", "equal"),
    ("add-k:0.1", "clr", "count"), ("kn", "prob", "equal"), ("kn", "clr", "equal")])
def test_spectrum_matches_exact_svd(smoothing, space, weighting):
    rng = np.random.default_rng(11)
    vocab, n = 64, 4
    stream = random_stream(rng, 3000, 40, p_boundary=0.01)
    counts = count_ngrams(stream, n)
    rows = build_rows(counts, vocab=vocab, smoothing=smoothing, space=space, weighting=weighting,
                      contexts=400, seed=5)
    spec, reason, _ = ngram_spectrum(rows, route="gram")
    dense = expand(rows, rows.dense_chunk(rows.sel))
    sigma = np.linalg.svd(dense, compute_uv=False)
    k = spec.sigma.size
    assert k == min(dense.shape[0], rows.width)
    # eigvalsh of the Gram: σ_i to ~eps·σ_1²/σ_i; compare the squares
    np.testing.assert_allclose(spec.sigma ** 2, sigma[:k] ** 2, rtol=0, atol=1e-10 * sigma[0] ** 2)
    assert np.all(sigma[k:] < 1e-9 * sigma[0])  # the merged columns hide only exact zeros
    np.testing.assert_allclose(spec.energy, (dense ** 2).sum(), rtol=1e-12)
    assert spec.n_rows == 400 and spec.n_cols == vocab and spec.route == "gram"
    # the W-error curve and rank_at from the sparse Gram equal those of the SVD
    tail = np.sqrt(np.cumsum((sigma ** 2)[::-1])[::-1] / (sigma ** 2).sum())
    np.testing.assert_allclose(spec.w_error()[:20], np.append(tail[1:], 0.0)[:20], atol=1e-7)


def test_sketch_route_from_dense_chunks():
    rng = np.random.default_rng(2)
    stream = random_stream(rng, 4000, 200, p_boundary=0.01)
    counts = count_ngrams(stream, 2)
    rows = build_rows(counts, vocab=300, smoothing="add-k:1", space="prob")
    exact, _, _ = ngram_spectrum(rows, route="gram")
    with pytest.raises(UserError, match="does not fit"):
        ngram_spectrum(rows, route="gram", budget=10_000)
    sk, reason, _ = ngram_spectrum(rows, route="auto", budget=10_000, rank_max=20)  # too small: sketch
    assert sk.route == "sketch" and "sketch" in reason.lower()
    np.testing.assert_allclose(sk.energy, exact.energy, rtol=1e-12)
    assert np.all(sk.sigma[:20] <= exact.sigma[:20] * (1 + 1e-9))  # Nyström never overestimates
    np.testing.assert_allclose(sk.sigma[0], exact.sigma[0], rtol=1e-2)
    # oracle: the same sketch (same seed) fed the explicitly built compressed matrix at once
    from rankest.accumulate.base import Chunk
    from rankest.accumulate.sketch import Sketch

    ref = Sketch(rows.width, 20, space="prob", seed=0, precision="fp64")
    x = torch.from_numpy(rows.dense_chunk(rows.sel))
    ref.update(Chunk(stats=torch.zeros(x.shape[0], 4, dtype=torch.float64), rows=x))
    np.testing.assert_allclose(sk.sigma, ref.finalize(energy=exact.energy).sigma, rtol=1e-9, atol=1e-12)


# ---- hand-made corpora of known rank -------------------------------------------------------------
def docs_stream(docs):
    out = []
    for d in docs:
        out += list(d) + [-1]
    return torch.tensor(out, dtype=torch.int64)


def numerical_rank(sigma):
    return int((sigma > 1e-9 * sigma[0]).sum())


def test_known_rank_one_fixed_token():
    rng = np.random.default_rng(4)
    vocab, n_next = 500, 17
    targets = rng.choice(np.arange(100, 400), size=n_next, replace=False)
    docs = []
    for i in range(300):  # 300 distinct contexts, each always followed by one fixed token
        h = (int(i // 30), int(i % 30) + 30)
        docs += [h + (int(targets[i % n_next]),)] * int(rng.integers(1, 4))
    counts = count_ngrams(docs_stream(docs), 3)
    mle = ngram_spectrum(build_rows(counts, vocab=vocab), route="gram")[0]
    assert numerical_rank(mle.sigma) == n_next
    addk = ngram_spectrum(build_rows(counts, vocab=vocab, smoothing="add-k:1"), route="gram")[0]
    assert numerical_rank(addk.sigma) == n_next + 1
    # contexts whose continuations mix existing rows' tokens leave the MLE rank unchanged
    for j in range(40):
        h = (50 + j, 60)
        a, b = targets[j % n_next], targets[(j * 7 + 3) % n_next]
        docs += [h + (int(a),), h + (int(b),), h + (int(b),)]
    counts2 = count_ngrams(docs_stream(docs), 3)
    mixed = ngram_spectrum(build_rows(counts2, vocab=vocab), route="gram")[0]
    assert counts2.n_contexts == counts.n_contexts + 40
    assert numerical_rank(mixed.sigma) == n_next
    # a context with a new continuation token raises it by one
    counts3 = count_ngrams(docs_stream(docs + [(90, 91, 450)]), 3)
    assert numerical_rank(ngram_spectrum(build_rows(counts3, vocab=vocab), route="gram")[0].sigma) == n_next + 1


# ---- contexts, weighting, sampling --------------------------------------------------------------------
def test_context_selection():
    rng = np.random.default_rng(9)
    counts = count_ngrams(random_stream(rng, 5000, 8), 3)
    all_rows = build_rows(counts, vocab=8)
    assert sorted(all_rows.sel) == list(range(counts.n_contexts))
    m3 = build_rows(counts, vocab=8, min_count=80)
    assert set(m3.sel) == set(np.flatnonzero(counts.ctx_count >= 80)) and len(m3.sel) < counts.n_contexts
    a = build_rows(counts, vocab=8, contexts=20, seed=1).sel
    b = build_rows(counts, vocab=8, contexts=20, seed=1).sel
    c = build_rows(counts, vocab=8, contexts=20, seed=2).sel
    assert len(a) == 20 == len(set(a)) and np.array_equal(a, b) and not np.array_equal(np.sort(a), np.sort(c))


# ---- estimate integration -----------------------------------------------------------------------------
def test_estimate_run_folder(tiny_neox_dir, tmp_path):
    from rankest.estimator.pipeline import run_estimate
    from rankest.targets.ngram import tokenize_documents
    from rankest.sources.tokenizers import load_tokenizer
    from rankest.sources.corpus import DEFAULT_CORPUS, load_documents

    out = tmp_path / "run"
    corpus = tmp_path / "small.txt"  # the first 80 documents of the embedded corpus (speed)
    corpus.write_text("\n\n".join(load_documents(DEFAULT_CORPUS)[:80]))
    spec = run_estimate(teacher="ngram:3", tokenizer=str(tiny_neox_dir), space="prob", out=str(out), quiet=True,
                        corpus=str(corpus), corpus_fractions="0.25,0.5,1", seed=1)
    summary = json.loads((out / "results.json").read_text())
    for key in ("sigma_1", "energy", "rank_at", "numerical_rank", "effective_rank", "stable_rank", "off_model_energy",
                "n_rows", "n_cols", "space", "route", "teacher", "corpus", "nll", "perplexity", "convergence",
                "route_reason", "contexts", "singleton_context_share", "smoothing", "weighting", "order", "tokenizer",
                "corpus_fractions"):
        assert key in summary, key
    assert summary["teacher"] == "ngram:3" and summary["smoothing"] == "mle" and summary["weighting"] == "equal"
    assert set(summary["corpus_fractions"]) == {"0.25", "0.5", "1.0"}
    assert summary["corpus_fractions"]["0.25"]["n_tokens"] < summary["corpus_fractions"]["1.0"]["n_tokens"]
    for f in ("results.h5", "report.md", "w_error.png", "corpus_fractions.png"):
        assert (out / f).is_file()
    assert "## n-gram target" in (out / "report.md").read_text()
    # the same rows built directly, densified, and SVD'd
    tok, _ = load_tokenizer(str(tiny_neox_dir))
    counts = count_ngrams(tokenize_documents(load_documents(str(corpus)), tok), 3)
    assert spec.meta["contexts"] == counts.n_contexts == spec.n_rows
    np.testing.assert_allclose(spec.meta["singleton_context_share"], float((counts.ctx_count == 1).mean()))
    rows = build_rows(counts, vocab=len(tok))
    sigma = np.linalg.svd(rows.dense_chunk(rows.sel), compute_uv=False)
    np.testing.assert_allclose(spec.sigma[:50] ** 2, sigma[:50] ** 2, atol=1e-10 * sigma[0] ** 2)
    # MLE in-sample NLL = Σ −c log(c/c(h)) / tokens, by brute force
    nll = -sum(float(c) * math.log(c / counts.ctx_count[i]) for i in range(counts.n_contexts)
               for c in counts.counts[counts.ptr[i]:counts.ptr[i + 1]]) / counts.ctx_count.sum()
    np.testing.assert_allclose(spec.meta["nll"], nll, rtol=1e-10)
    # the comparison report lists the n-gram facts and draws the paper's Fig. 7 ranges
    from rankest.report.compare import compare_runs

    md = compare_runs([out, out], tmp_path / "cmp").read_text()
    assert "## n-gram runs" in md and f"{spec.meta['contexts']:,} / {counts.n_contexts:,}" in md
    assert (tmp_path / "cmp" / "compare_w_error.png").is_file()


def test_cli_bad_input(tiny_neox_dir, capsys):
    from rankest.cli import main

    tk = ["--tokenizer", str(tiny_neox_dir), "--quiet"]
    cases = [
        (["--teacher", "ngram:3", "--space", "clr"] + tk, "log 0"),
        (["--teacher", "ngram:0", "--space", "prob"] + tk, "ngram:N"),
        (["--teacher", "ngram:1", "--space", "prob"] + tk, "ngram:N"),
        (["--teacher", "ngram:3", "--space", "prob", "--smoothing", "add-k:-1"] + tk, "--smoothing"),
        (["--teacher", "ngram:3", "--space", "prob", "--contexts", "1"] + tk, "--contexts"),
        (["--teacher", "ngram:3", "--space", "prob", "--corpus-fractions", "0.5,2"] + tk, "--corpus-fractions"),
        (["--teacher", "ngram:3", "--space", "logprob"] + tk, "prob"),
        (["--teacher", "ngram:3", "--space", "prob", "--tokenizer", "/no/such/tokenizer"], "--tokenizer"),
        (["--teacher", "ngram:3", "--space", "prob", "--min-count", "100000"] + tk, "--min-count"),
    ]
    for argv, needle in cases:
        assert main(["estimate", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert "rankest: error:" in err and needle in err, (argv, err)


def test_gguf_bpe_builder_matches_transformers():
    """The builder setup-tokenizers uses for Pythia's / GPT-2's GGUF vocabularies, checked
    offline on the embedded teacher's GGUF against transformers' own GGUF tokenizer."""
    from rankest.sources.corpus import DEFAULT_CORPUS, load_documents
    from rankest.sources.tokenizers import build_from_gguf, load_tokenizer
    from rankest.sources.teachers import DEFAULT_TEACHER, TEACHERS, _gguf_location

    mine = build_from_gguf(_gguf_location(*TEACHERS[DEFAULT_TEACHER].gguf))
    ref, name = load_tokenizer("smollm2")
    assert name == "smollm2" and len(mine) == len(ref)
    texts = load_documents(DEFAULT_CORPUS)[:40] + ["Hello   world!\n\n  tabs\tand émojis 🙂 <|endoftext|> 1234567"]
    for t in texts:
        assert mine(t, add_special_tokens=False)["input_ids"] == ref(t, add_special_tokens=False)["input_ids"], t[:80]


def test_named_tokenizer_not_set_up(tmp_path, monkeypatch):
    from rankest.sources.tokenizers import load_tokenizer

    monkeypatch.setenv("RANKEST_CACHE", str(tmp_path))
    with pytest.raises(UserError, match="setup-tokenizers"):
        load_tokenizer("pythia")
