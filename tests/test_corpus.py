"""Tests of rankest.sources.corpus: documents, packing, the row plan and batches."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from rankest.sources import rows as rows_mod
from rankest.sources.corpus import (
    CORPORA,
    DEFAULT_CORPUS,
    RowPlan,
    check_seq_len,
    iter_batches,
    load_documents,
    pack_windows,
    plan_rows,
)
from rankest.errors import UserError


@pytest.fixture(scope="module")
def tokenizer(tiny_teacher):
    return tiny_teacher.tokenizer


# --- documents -----------------------------------------------------------------------------
def test_corpus_table():
    assert DEFAULT_CORPUS == "lee" and CORPORA["lee"].package is not None
    assert (CORPORA["wikitext-103"].hf_path, CORPORA["wikitext-103"].hf_config, CORPORA["wikitext-103"].split) == (
        "Salesforce/wikitext",
        "wikitext-103-raw-v1",
        "test",
    )
    assert CORPORA["wikitext-2"].hf_config == "wikitext-2-raw-v1"


def test_embedded_lee_corpus():
    docs = load_documents("lee")
    assert len(docs) == 300  # 300 ABC news articles, one per line
    assert 340_000 < sum(map(len, docs)) < 370_000
    assert all(d.strip() and "\n" not in d for d in docs)
    short = load_documents("lee", max_chars=5000)
    assert sum(map(len, short)) == 5000 and short[:-1] == docs[: len(short) - 1]
    assert docs[len(short) - 1].startswith(short[-1])


def test_lee_missing_gensim_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "gensim" else real(n, *a))
    with pytest.raises(UserError, match="pip install gensim"):
        load_documents("lee")


def test_txt_paragraphs_and_lines(tmp_path):
    paragraphs = tmp_path / "p.txt"
    paragraphs.write_text("first line\nsame paragraph\n\nsecond\n \t\n\n\nthird\n")
    assert load_documents(str(paragraphs)) == ["first line\nsame paragraph", "second", "third"]
    lines = tmp_path / "l.txt"
    lines.write_text("one\ntwo\nthree\n")
    assert load_documents(lines) == ["one", "two", "three"]


def test_jsonl_json_parquet_and_lists(tmp_path):
    rows = [{"id": i, "text": f"document {i}"} for i in range(4)] + [{"id": 9, "text": "  "}]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert load_documents(str(tmp_path / "a.jsonl")) == [f"document {i}" for i in range(4)]  # blank dropped
    (tmp_path / "b.json").write_text(json.dumps([{"n": 1, "body": "only string column"}]))
    assert load_documents(str(tmp_path / "b.json")) == ["only string column"]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"n": [1, 2], "text": ["alpha", "beta"]}), tmp_path / "c.parquet")
    assert load_documents(str(tmp_path / "c.parquet")) == ["alpha", "beta"]
    both = load_documents([str(tmp_path / "c.parquet"), str(tmp_path / "a.jsonl")])
    assert both == ["alpha", "beta"] + [f"document {i}" for i in range(4)]
    assert load_documents(str(tmp_path / "*.parquet")) == ["alpha", "beta"]
    assert load_documents(str(tmp_path / "c.parquet"), max_chars=7) == ["alpha", "be"]


def test_bad_corpus_inputs(tmp_path):
    (tmp_path / "n.jsonl").write_text(json.dumps({"n": 1}))
    with pytest.raises(UserError, match="no text column"):
        load_documents(str(tmp_path / "n.jsonl"))
    with pytest.raises(UserError, match="does not exist"):
        load_documents(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    with pytest.raises(UserError, match="no non-empty documents"):
        load_documents(str(tmp_path / "empty.txt"))


def test_unreachable_hf_corpus_says_what_was_tried(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(UserError, match="corpus wikitext-103 = Salesforce/wikitext .config wikitext-103-raw-v1.*local"):
        load_documents("wikitext-103")
    with pytest.raises(UserError, match="neither a local file nor a short name"):
        load_documents("nobody/nothing:cfg:test")


# --- packing -------------------------------------------------------------------------------
def test_pack_windows_shapes_and_contents(tokenizer):
    docs = ["alpha beta gamma", "delta", "the quick brown fox jumps over the lazy dog"] * 5
    eos = tokenizer.eos_token_id
    stream = []
    for i, doc in enumerate(docs):
        if i:
            stream.append(eos)
        stream += tokenizer(doc, add_special_tokens=False)["input_ids"]
    seq_len = 7
    windows = pack_windows(docs, tokenizer, seq_len, progress=False, chunk_docs=4)
    n = len(stream) // (seq_len + 1)
    assert windows.dtype == torch.long and windows.shape == (n, seq_len + 1)
    assert windows.flatten().tolist() == stream[: n * (seq_len + 1)]
    first = pack_windows(docs, tokenizer, seq_len, max_windows=3, progress=False, chunk_docs=1)
    assert torch.equal(first, windows[:3])


def test_pack_windows_too_short(tokenizer):
    with pytest.raises(UserError, match="fewer than one window.*smaller --seq-len"):
        pack_windows(["tiny"], tokenizer, 512, progress=False)


def test_pack_lee_with_the_embedded_tokenizer(embedded_teacher):
    docs = load_documents("lee")
    windows = pack_windows(docs, embedded_teacher.tokenizer, 128, max_windows=50, progress=False)
    assert windows.shape == (50, 129)
    assert int(windows.max()) < embedded_teacher.n_cols
    eos = embedded_teacher.tokenizer.eos_token_id
    assert (windows == eos).sum() >= 1  # documents are separated by EOS


def test_check_seq_len():
    check_seq_len(2048, 2048)
    with pytest.raises(UserError, match="exceeds the teacher's context length 2048"):
        check_seq_len(4096, 2048)
    with pytest.raises(UserError):
        check_seq_len(0, 2048)


# --- the row plan --------------------------------------------------------------------------
def _rows(plan: RowPlan) -> set[tuple[int, int]]:
    w, p = torch.nonzero(plan.positions, as_tuple=True)
    return set(zip(plan.windows[w].tolist(), p.tolist()))


def test_plan_all_rows_in_random_window_order():
    plan = plan_rows(50, 16, seed=3)
    assert plan.n_rows == 800 and plan.positions.all() and plan.positions.shape == (50, 16)
    assert sorted(plan.windows.tolist()) == list(range(50))
    assert plan.windows.tolist() != list(range(50))
    assert plan.rows_before()[-1] == 800


def test_plan_is_seeded():
    a, b, c = (plan_rows(200, 32, tokens=300, seed=s) for s in (7, 7, 8))
    assert torch.equal(a.windows, b.windows) and torch.equal(a.positions, b.positions)
    assert _rows(a) != _rows(c)
    assert a.n_rows == len(_rows(a)) == int(a.positions.sum()) == 300
    assert a.positions.any(dim=1).all()  # only windows that hold rows are listed
    assert len(set(a.windows.tolist())) == a.windows.numel()


@pytest.mark.parametrize("threshold", [None, 4])  # permutation, and the draw-deduplicate path
def test_plan_rows_are_uniform(monkeypatch, threshold):
    if threshold is not None:
        monkeypatch.setattr(rows_mod, "_RANDPERM_MAX", threshold)
    n_windows, seq_len, tokens, trials = 6, 10, 15, 1200
    counts = torch.zeros(n_windows, seq_len)
    for seed in range(trials):
        plan = plan_rows(n_windows, seq_len, tokens=tokens, seed=seed, sample="rows")
        counts[plan.windows] += plan.positions.float()
    expected = trials * tokens / (n_windows * seq_len)
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    # Each count is Binomial(trials, 1/4): E[chi2] ≈ 59 · 0.75 ≈ 44, sd ≈ 9.
    assert chi2 < 90, chi2
    # The first window of a plan is uniformly any window holding a row.
    firsts = [int(plan_rows(n_windows, seq_len, tokens=3, seed=s, sample="rows").windows[0]) for s in range(600)]
    assert torch.bincount(torch.tensor(firsts), minlength=n_windows).min() > 60


def test_plan_windows_sampling_is_uniform_over_windows_and_cheap():
    # The default unit: whole windows, so the teacher runs on ≈ tokens, not tokens × seq_len.
    n_windows, seq_len, tokens, trials = 12, 8, 20, 1200
    seen = torch.zeros(n_windows)
    for seed in range(trials):
        plan = plan_rows(n_windows, seq_len, tokens=tokens, seed=seed)
        assert plan.n_rows == tokens == int(plan.positions.sum())
        assert plan.windows.numel() == 3  # ceil(20 / 8) windows, the last one partly used
        assert plan.positions[:2].all() and int(plan.positions[2].sum()) == 4
        seen[plan.windows] += 1
    # Each window is in a plan with probability 3/12: Binomial(1200, 1/4) counts.
    expected = trials * 3 / n_windows
    chi2 = float(((seen - expected) ** 2 / (expected * 0.75)).sum())
    assert chi2 < 35, chi2  # 11 degrees of freedom: P(chi2 > 35) < 1e-3
    with pytest.raises(UserError, match="sampling unit"):
        plan_rows(10, 8, tokens=5, sample="tokens")


def test_plan_positions_last_and_stride():
    last = plan_rows(10, 8, positions="last")
    assert last.n_rows == 10 and torch.equal(last.positions.nonzero()[:, 1], torch.full((10,), 7))
    stride = plan_rows(10, 8, positions="stride:3")
    assert stride.positions[0].nonzero().flatten().tolist() == [1, 4, 7] and stride.n_rows == 30
    assert torch.equal(plan_rows(4, 8, positions="stride:1").positions, plan_rows(4, 8).positions)
    sampled = plan_rows(10, 8, positions="stride:3", tokens=12, seed=1)
    assert set(sampled.positions.nonzero()[:, 1].tolist()) <= {1, 4, 7}
    with pytest.raises(UserError, match="stride"):
        plan_rows(10, 8, positions="stride:0")
    with pytest.raises(UserError, match="use all, last or stride:K"):
        plan_rows(10, 8, positions="first")


def test_plan_too_many_tokens():
    with pytest.raises(UserError, match="more rows than the 40 candidates.*bigger corpus.*--positions all"):
        plan_rows(40, 16, positions="last", tokens=41)
    with pytest.warns(UserWarning, match="using all 40"):
        plan = plan_rows(40, 16, positions="last", tokens=41, allow_fewer=True)
    assert plan.n_rows == 40


def test_sampling_large_candidate_sets_stays_small():
    gen = torch.Generator().manual_seed(0)
    picked = rows_mod._sample_without_replacement(1 << 40, 1000, gen)
    assert picked.numel() == 1000 == picked.unique().numel()
    assert int(picked.min()) >= 0 and int(picked.max()) < 1 << 40


# --- batches -------------------------------------------------------------------------------
def test_iter_batches_follow_the_plan():
    windows = torch.arange(12 * 9).view(12, 9)
    plan = plan_rows(12, 8, tokens=30, seed=2, sample="rows")
    batches = list(iter_batches(windows, plan, 5))
    assert [b.start for b in batches] == list(range(0, plan.windows.numel(), 5))
    assert torch.equal(torch.cat([b.windows for b in batches]), plan.windows)
    assert torch.equal(torch.cat([b.mask for b in batches]), plan.positions)
    assert sum(b.n_rows for b in batches) == 30
    b = batches[0]
    assert b.input_ids.shape == b.targets.shape == b.mask.shape == (len(b.windows), 8)
    assert torch.equal(b.input_ids, windows[b.windows, :-1]) and torch.equal(b.targets, windows[b.windows, 1:])
    resumed = list(iter_batches(windows, plan, 5, start=5))
    assert torch.equal(resumed[0].windows, batches[1].windows)
