"""n-gram targets: the paper's count-based 5-gram rank experiment (Godey et al. 2024, Fig. 7).

    python -m rankest estimate --teacher ngram:5 --tokenizer pythia --corpus wikitext-103 --space prob

Rows of the target matrix T are the observed (n−1)-token contexts h, columns the vocabulary,
entries p(w | h) of a count-based model:

``mle`` (the paper's)   p = c(h w) / c(h)
``add-k:K``             p = (c(h w) + K) / (c(h) + K·V)
``kn``                  interpolated Kneser–Ney (Chen & Goodman 1999, eq. 17 with one discount
                        per order, D = n1 / (n1 + 2·n2)); lower orders use continuation counts
                        N1+(• w …); the recursion ends in the uniform distribution 1/V.

Spaces: ``prob`` (the paper's) and ``clr`` (log p − mean log p; only with smoothing, since
log 0 is −∞). Rows are weighted equally (the paper's) or by context count (``count``: row ·
sqrt(c(h)), so TᵀT = Σ_h c(h)·p_h p_hᵀ, the Gram of one row per token occurrence).

Exactness and memory
--------------------
Counting: :func:`rankest.ops.ngram_count` (compiled, hashed, memory ∝ distinct n-grams).
Columns: tokens that never occur (no row gives them mass beyond the smoothing floor) are
identical columns a·1; k identical columns have the spectrum of one column √k·a
(TTᵀ = S Sᵀ + k·a aᵀ either way), so T is reduced *exactly* to the m observed tokens plus one
merged "rest" column: the Gram is (m+1)², not V². The spectrum's remaining singular values are
exactly zero. ``n_cols`` reported is still the full V.
Gram: ``mle``/``add-k`` rows are sparse + a per-row constant, x_r = d_r + α_r·1. The sparse
part goes through :func:`rankest.ops.sparse_gram_update` (CSR, no densifying, fp64) and the
constant through exact rank-2 corrections (u = Σ α_r d_r, A = Σ α_r²):
G = DᵀD + u·1ᵀ + 1·uᵀ + A·11ᵀ. ``kn`` rows are dense: densified chunk by chunk and fed to
``ops.gram_update`` (fp64). When the (m+1)² fp64 Gram does not fit ``--max-memory`` the dense
chunks feed the Nyström sketch (:class:`rankest.accumulate.sketch.Sketch`) instead.
"""

from __future__ import annotations

import hashlib
import math
import sys
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from rankest import ops
from rankest.accumulate.base import Accumulator, Chunk, SparseRows
from rankest.accumulate.gram import gram_nbytes
from rankest.accumulate.sparse_gram import SparseGram
from rankest.errors import UserError
from rankest.sources import corpus
from rankest.sources.tokenizers import load_tokenizer
from rankest.spectrum import Spectrum
from rankest.targets.base import Target

SMOOTHING_HELP = "mle | add-k:K | kn"
WEIGHTINGS = ("equal", "count")
NGRAM_SPACES = ("prob", "clr")
CHUNK_ROWS = 4096  # contexts per chunk (dense chunks: CHUNK_ROWS × (m+1) fp64)


# ---- options -------------------------------------------------------------------------------------
def parse_order(teacher: str) -> int:
    """``ngram:5`` → 5."""
    _, _, n = str(teacher).partition(":")
    if not n.isdigit() or int(n) < 2:
        raise UserError(f"an n-gram teacher is written ngram:N with N ≥ 2 (e.g. ngram:5; a unigram model has a "
                        f"single context, one row), got {teacher!r}.")
    return int(n)


def parse_smoothing(text: str) -> tuple[str, float]:
    """``mle`` → ("mle", 0); ``add-k:0.5`` → ("add-k", 0.5); ``kn`` → ("kn", 0)."""
    t = str(text).strip().lower()
    if t in ("mle", "kn"):
        return t, 0.0
    if t.startswith("add-k:"):
        try:
            k = float(t.split(":", 1)[1])
        except ValueError:
            k = float("nan")
        if k > 0 and math.isfinite(k):
            return "add-k", k
    raise UserError(f"--smoothing must be {SMOOTHING_HELP} with K > 0 (e.g. add-k:1), got {text!r}.")


def parse_contexts(text) -> Optional[int]:
    """``all`` → None; ``C`` → C sampled contexts."""
    if text is None or str(text).lower() == "all":
        return None
    try:
        f = float(text)
        c = int(f) if math.isfinite(f) and f == int(f) else 0
    except (TypeError, ValueError):
        c = 0
    if not 2 <= c <= 2**53:
        raise UserError(f"--contexts must be 'all' or a whole number of contexts from 2 to 2^53, got {text!r}.")
    return c


def parse_fractions(text) -> Optional[list[float]]:
    """``0.125,0.25,0.5,1`` → sorted fractions in (0, 1]."""
    if text is None or text == "" or text == []:
        return None
    items = text if isinstance(text, (list, tuple)) else str(text).split(",")
    try:
        fr = sorted({float(x) for x in items})
    except (TypeError, ValueError):
        fr = []
    if not fr or not all(0 < f <= 1 for f in fr):  # also refuses nan
        raise UserError(f"--corpus-fractions must be comma-separated fractions in (0, 1], e.g. 0.25,0.5,1; got {text!r}.")
    return fr


# ---- counting ------------------------------------------------------------------------------------
@dataclass
class NgramCounts:
    """Distinct n-grams of a stream in CSR layout (rows = contexts).

    contexts : (C, n−1) int64, lexicographic; ptr : (C+1,) int64; next : (M,) int64 next
    tokens (increasing within a context); counts : (M,) int64; ctx_count : (C,) c(h).
    """

    order: int
    contexts: np.ndarray
    ptr: np.ndarray
    next: np.ndarray
    counts: np.ndarray
    ctx_count: np.ndarray
    n_tokens: int

    @property
    def n_contexts(self) -> int:
        return int(self.contexts.shape[0])


def count_ngrams(tokens: torch.Tensor, order: int) -> NgramCounts:
    """Count the n-grams of a token stream (negative tokens = document boundaries)."""
    grams, counts = ops.ngram_count(tokens, order)
    g, c = grams.numpy(), counts.numpy()
    n_tokens = int((tokens >= 0).sum())
    if order == 1:
        return NgramCounts(1, np.zeros((1 if g.shape[0] else 0, 0), np.int64),
                           np.array([0, g.shape[0]] if g.shape[0] else [0], np.int64),
                           g[:, 0].copy(), c, np.array([c.sum()] if g.shape[0] else [], np.int64), n_tokens)
    ctx = g[:, :-1]
    new = np.ones(g.shape[0], dtype=bool)
    if g.shape[0] > 1:
        new[1:] = (ctx[1:] != ctx[:-1]).any(axis=1)
    starts = np.flatnonzero(new)
    ptr = np.append(starts, g.shape[0]).astype(np.int64)
    return NgramCounts(order, np.ascontiguousarray(ctx[starts]), ptr, g[:, -1].copy(), c,
                       np.add.reduceat(c, starts) if starts.size else np.zeros(0, np.int64), n_tokens)


def continuation_counts(counts: NgramCounts) -> NgramCounts:
    """The (n−1)-gram table with Kneser–Ney continuation counts N1+(• g) as its counts."""
    n = counts.order
    full = np.concatenate([np.repeat(counts.contexts, np.diff(counts.ptr), axis=0), counts.next[:, None]], axis=1)
    suffix = full[:, 1:]
    uniq, inv = np.unique(suffix, axis=0, return_inverse=True)
    cont = np.bincount(inv.ravel(), minlength=uniq.shape[0]).astype(np.int64)  # distinct left neighbours
    m = n - 1
    if m == 1:
        return NgramCounts(1, np.zeros((1, 0), np.int64), np.array([0, uniq.shape[0]], np.int64),
                           uniq[:, 0].copy(), cont, np.array([cont.sum()], np.int64), counts.n_tokens)
    ctx = uniq[:, :-1]
    new = np.ones(uniq.shape[0], dtype=bool)
    new[1:] = (ctx[1:] != ctx[:-1]).any(axis=1)
    starts = np.flatnonzero(new)
    return NgramCounts(m, np.ascontiguousarray(ctx[starts]), np.append(starts, uniq.shape[0]).astype(np.int64),
                       uniq[:, -1].copy(), cont, np.add.reduceat(cont, starts), counts.n_tokens)


def _discount(counts: np.ndarray) -> float:
    n1, n2 = int((counts == 1).sum()), int((counts == 2).sum())
    return n1 / (n1 + 2 * n2) if n1 + 2 * n2 else 0.5


def _keys(rows: np.ndarray) -> np.ndarray:
    """Rows of non-negative int64 → bytes whose order is the rows' lexicographic order."""
    be = np.ascontiguousarray(rows.astype(">i8"))
    return be.view(f"S{8 * rows.shape[1]}").ravel() if rows.shape[1] else np.zeros(rows.shape[0], "S1")


# ---- tokenising ----------------------------------------------------------------------------------
def tokenize_documents(docs: Sequence[str], tokenizer, *, progress: bool = False) -> torch.Tensor:
    """Documents → one int64 stream with −1 between documents (no n-gram spans two)."""
    parts: list[np.ndarray] = []
    batch = 256
    for i in tqdm(range(0, len(docs), batch), desc="tokenise", unit="batch", disable=not progress):
        enc = tokenizer(list(docs[i:i + batch]), add_special_tokens=False)["input_ids"]
        for ids in enc:
            parts.append(np.asarray(ids, dtype=np.int64))
            parts.append(np.array([-1], dtype=np.int64))
    return torch.from_numpy(np.concatenate(parts) if parts else np.zeros(0, np.int64))


# ---- rows ----------------------------------------------------------------------------------------
@dataclass
class NgramRows:
    """The selected contexts' rows over compressed columns (see the module docstring).

    cols : (m,) token id of each compressed column; rest : V − m merged columns (0: none).
    sel : (R,) indices of the selected contexts (in the order rows are streamed).
    """

    counts: NgramCounts
    sel: np.ndarray
    cols: np.ndarray
    vocab: int
    smoothing: str
    k: float
    space: str
    weighting: str
    kn_tables: Optional[list] = None  # [(NgramCounts, D)] for orders 1..n (kn only)

    @property
    def m(self) -> int:
        return int(self.cols.size)

    @property
    def rest(self) -> int:
        return self.vocab - self.m

    @property
    def width(self) -> int:
        """Columns of the compressed matrix: m, plus one merged column when it is non-zero."""
        return self.m + (1 if self.rest and self.smoothing != "mle" else 0)

    def weights(self, idx: np.ndarray) -> np.ndarray:
        c = self.counts.ctx_count[idx].astype(np.float64)
        return np.ones_like(c) if self.weighting == "equal" else c

    def sparse_chunk(self, idx: np.ndarray):
        """mle / add-k rows of contexts ``idx``: CSR (crow, col, val) of d_r and α_r (x_r = d_r + α_r·1),
        scaled by sqrt(weight)."""
        cnt = self.counts
        lo, hi = cnt.ptr[idx], cnt.ptr[idx + 1]
        lens = hi - lo
        crow = np.zeros(idx.size + 1, np.int64)
        np.cumsum(lens, out=crow[1:])
        ent = np.repeat(lo - crow[:-1], lens) + np.arange(crow[-1])
        c = cnt.counts[ent].astype(np.float64)
        col = self._colmap[cnt.next[ent]]
        n_h = np.repeat(cnt.ctx_count[idx].astype(np.float64), lens)
        if self.smoothing == "mle":
            val, alpha = c / n_h, np.zeros(idx.size)
        elif self.space == "prob":
            den = n_h + self.k * self.vocab
            val = c / den
            alpha = self.k / (cnt.ctx_count[idx] + self.k * self.vocab)
        else:  # clr of add-k: log(c+k) − mean = log1p(c/k) − mean over V of the same
            val = np.log1p(c / self.k)
            sums = np.add.reduceat(val, crow[:-1]) if val.size else np.zeros(idx.size)
            sums = np.where(lens > 0, sums, 0.0)
            alpha = -sums / self.vocab
        w = np.sqrt(self.weights(idx))
        return crow, col, val * np.repeat(w, lens), alpha * w

    def dense_chunk(self, idx: np.ndarray) -> np.ndarray:
        """Rows of contexts ``idx`` over the compressed columns, (R, width) fp64 (merged column
        scaled by sqrt(V − m))."""
        out = np.zeros((idx.size, self.width), np.float64)
        if self.smoothing != "kn":
            crow, col, val, alpha = self.sparse_chunk(idx)
            r = np.repeat(np.arange(idx.size), np.diff(crow))
            out[r, col] = val
            out[:, :self.m] += alpha[:, None]
            if self.width > self.m:
                out[:, self.m] = math.sqrt(self.rest) * alpha
            return out
        p, p_rest = self._kn_prob(idx)
        if self.space == "clr":
            lp, lr = np.log(p), np.log(p_rest)
            mean = (lp.sum(axis=1) + self.rest * lr) / self.vocab
            p, p_rest = lp - mean[:, None], lr - mean
        w = np.sqrt(self.weights(idx))
        out[:, :self.m] = p * w[:, None]
        if self.width > self.m:
            out[:, self.m] = math.sqrt(self.rest) * p_rest * w
        return out

    def _kn_prob(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Interpolated Kneser–Ney p(w | h) for contexts ``idx``: (R, m) and the (R,) value of
        every token outside the m columns."""
        tables = self.kn_tables
        n = self.counts.order
        ctx = self.counts.contexts[idx]
        r = idx.size
        # order 1: p1(w) = max(N1+(•w) − D, 0)/N1+(••) + D·types/N1+(••) · 1/V
        t1, d1 = tables[0]
        tot = float(t1.counts.sum())
        lam1 = d1 * t1.counts.size / tot
        p = np.full((r, self.m), lam1 / self.vocab)
        p[:, self._colmap[t1.next]] += np.maximum(t1.counts - d1, 0.0) / tot
        p_rest = np.full(r, lam1 / self.vocab)
        for j in range(2, n + 1):
            tj, dj = tables[j - 1]
            h = ctx[:, n - j:]  # the last j − 1 tokens of the context
            keys = _keys(h)
            tkeys = tj._ctx_keys
            pos = np.searchsorted(tkeys, keys)
            found = (pos < tkeys.size) & (tkeys[np.minimum(pos, tkeys.size - 1)] == keys)
            rows = np.flatnonzero(found)
            ci = pos[rows]
            lo, hi = tj.ptr[ci], tj.ptr[ci + 1]
            lens = hi - lo
            tot = tj.ctx_count[ci].astype(np.float64)
            lam = np.ones(r)
            lam[rows] = dj * lens / tot
            p *= lam[:, None]
            p_rest *= lam
            ent = np.repeat(lo, lens) + np.arange(lens.sum()) - np.repeat(np.cumsum(lens) - lens, lens)
            rr = np.repeat(rows, lens)
            p[rr, self._colmap[tj.next[ent]]] += np.maximum(tj.counts[ent] - dj, 0.0) / np.repeat(tot, lens)
        return p, p_rest

    def row_energies(self, idx: np.ndarray) -> np.ndarray:
        """‖x_r‖² over the full V columns for each context of ``idx`` ((R,) fp64)."""
        if self.smoothing == "kn":
            return (self.dense_chunk(idx) ** 2).sum(axis=1)
        crow, col, val, alpha = self.sparse_chunk(idx)
        nnz = np.diff(crow)
        row = np.repeat(np.arange(idx.size), nnz)
        on = np.bincount(row, weights=(val + alpha[row]) ** 2, minlength=idx.size)
        return on + (self.vocab - nnz) * alpha ** 2

    def row_energy(self, idx: np.ndarray) -> float:
        """Σ ‖x_r‖² over the contexts ``idx``, over the full V columns (fp64)."""
        return float(self.row_energies(idx).sum())

    def row_stats(self, idx: np.ndarray) -> tuple[float, float, float]:
        """(Σ c(h)·H(p_h), Σ −c(hw) log p(w|h), Σ c(h)) over contexts ``idx``: in-sample entropy
        and NLL per token, from the probabilities of the chosen smoothing."""
        cnt = self.counts
        lo, hi = cnt.ptr[idx], cnt.ptr[idx + 1]
        lens = hi - lo
        ent_idx = np.repeat(lo, lens) + np.arange(lens.sum()) - np.repeat(np.cumsum(lens) - lens, lens)
        c = cnt.counts[ent_idx].astype(np.float64)
        n_h = cnt.ctx_count[idx].astype(np.float64)
        if self.smoothing == "mle":
            p_obs = c / np.repeat(n_h, lens)
            ent = -np.add.reduceat(p_obs * np.log(p_obs), np.cumsum(lens) - lens) if p_obs.size else np.zeros(0)
        else:
            if self.smoothing == "add-k":
                den = n_h + self.k * self.vocab
                p_obs = (c + self.k) / np.repeat(den, lens)
                p0 = self.k / den
                ent = -(np.add.reduceat(p_obs * np.log(p_obs), np.cumsum(lens) - lens)
                        + (self.vocab - lens) * p0 * np.log(p0))
            else:
                p, p_rest = self._kn_prob(idx)
                ent = -((p * np.log(p)).sum(axis=1) + self.rest * p_rest * np.log(p_rest))
                rr = np.repeat(np.arange(idx.size), lens)
                p_obs = p[rr, self._colmap[cnt.next[ent_idx]]]
        return float((n_h * ent).sum()), float(-(c * np.log(p_obs)).sum()), float(n_h.sum())


def check_target_options(space: str, smoothing: str, weighting: str) -> tuple[str, float]:
    """The checks of an n-gram target's ``space``, ``smoothing`` and ``weighting`` (each failure a
    sentence); returns :func:`parse_smoothing` (``smoothing``)."""
    kind, k = parse_smoothing(smoothing)
    if space not in NGRAM_SPACES:
        raise UserError(f"n-gram targets support --space prob (the paper's) or clr (with smoothing), got {space!r}.")
    if space == "clr" and kind == "mle":
        raise UserError("--space clr takes log p, and MLE rows have zeros (log 0 = −∞); use --space prob, or "
                        "smoothing: --smoothing add-k:1 or --smoothing kn.")
    if weighting not in WEIGHTINGS:
        raise UserError(f"--weighting must be equal or count, got {weighting!r}.")
    return kind, k


def build_rows(counts: NgramCounts, *, vocab: int, smoothing: str = "mle", space: str = "prob",
               weighting: str = "equal", min_count: int = 1, contexts: Optional[int] = None,
               seed: int = 0) -> NgramRows:
    """Choose the contexts (≥ min_count occurrences, then C sampled, seeded; streamed in a
    seeded random order so every prefix is a uniform subsample) and the compressed columns."""
    kind, k = check_target_options(space, smoothing, weighting)
    if counts.n_contexts == 0:
        raise UserError(f"the corpus has no {counts.order}-gram (fewer than {counts.order} tokens per document); "
                        f"use a larger corpus or a lower order.")
    if int(counts.next.max()) >= vocab:
        raise UserError(f"a token id ({int(counts.next.max())}) is ≥ the vocabulary size {vocab}; "
                        f"the tokenizer and the vocabulary do not match.")
    eligible = np.flatnonzero(counts.ctx_count >= int(min_count))
    if eligible.size < 2:
        raise UserError(f"only {eligible.size} context(s) occur at least {min_count} times; lower --min-count.")
    rng = np.random.default_rng(seed)
    if contexts is not None and contexts < eligible.size:
        eligible = np.sort(rng.choice(eligible, size=contexts, replace=False))
    elif contexts is not None and contexts > eligible.size:
        print(f"rankest: --contexts {contexts:,} is more than the {eligible.size:,} contexts seen at least "
              f"{min_count} time(s); capped: using all {eligible.size:,}", file=sys.stderr)
    sel = rng.permutation(eligible)
    tables = None
    if kind == "kn":
        tables = [None] * counts.order
        t = counts
        tables[t.order - 1] = (t, _discount(t.counts))
        while t.order > 1:
            t = continuation_counts(t)
            tables[t.order - 1] = (t, _discount(t.counts))
        for t, _ in tables:
            t._ctx_keys = _keys(t.contexts)
        # every token of the stream can have mass; the rest are identical columns
        cols = np.unique(np.concatenate([tables[0][0].next, counts.next]))
    else:
        lo, hi = counts.ptr[sel], counts.ptr[sel + 1]
        mask = np.zeros(counts.next.size, bool)
        lens = hi - lo
        mask[np.repeat(lo, lens) + np.arange(lens.sum()) - np.repeat(np.cumsum(lens) - lens, lens)] = True
        cols = np.unique(counts.next[mask])
    rows = NgramRows(counts, sel, cols, int(vocab), kind, k, space, weighting, tables)
    colmap = np.full(int(vocab), -1, np.int64)
    colmap[cols] = np.arange(cols.size)
    rows._colmap = colmap
    return rows




def ngram_facts(counts: NgramCounts, rows: NgramRows) -> dict[str, Any]:
    """What the paper left implicit: contexts, singletons, sizes, and the in-sample NLL."""
    sel = rows.sel
    ent, nll, tok = 0.0, 0.0, 0.0
    for a in range(0, sel.size, CHUNK_ROWS):
        e, l, t = rows.row_stats(sel[a:a + CHUNK_ROWS])
        ent, nll, tok = ent + e, nll + l, tok + t
    sel_counts = counts.ctx_count[sel]
    return {
        "order": counts.order, "smoothing": rows.smoothing + (f":{rows.k:g}" if rows.smoothing == "add-k" else ""),
        "weighting": rows.weighting, "n_tokens": counts.n_tokens, "distinct_ngrams": int(counts.next.size),
        "contexts_total": counts.n_contexts, "contexts": int(sel.size),
        "singleton_context_share": float((sel_counts == 1).mean()),
        "singleton_context_share_all": float((counts.ctx_count == 1).mean()),
        "vocab": rows.vocab, "observed_columns": rows.m, "gram_columns": rows.width,
        # in-sample (training) NLL and entropy per token of the chosen model, on its contexts
        "nll": nll / tok, "perplexity": float(np.exp(nll / tok)), "entropy": ent / tok,
    }


# ---- the target -----------------------------------------------------------------------------------
def is_ngram_teacher(teacher) -> bool:
    return isinstance(teacher, str) and teacher.startswith("ngram:")


class NgramTarget(Target):
    """The rows of a count-based n-gram model (module docstring), CHUNK_ROWS contexts a unit.

    ``n_cols`` is the compressed width the accumulators see (m observed columns, plus the merged
    one); the finished spectrum reports the full vocabulary V. mle / add-k rows reach the exact
    route as sparse chunks (:class:`~rankest.accumulate.sparse_gram.SparseGram`), kn rows and
    every sketch as dense fp64 chunks.
    """

    unit = "ctx"
    precision = "fp64"  # the rows are exact in fp64, whatever --gram-precision says
    supports_passes = False
    row_dtype = torch.float64

    def __init__(self, rows: NgramRows, *, facts: Optional[dict] = None, tokenizer: str = "",
                 chunk_rows: Optional[int] = None) -> None:
        self.rows, self.chunk_rows = rows, int(chunk_rows or CHUNK_ROWS)
        self.name, self.source, self.tokenizer = f"ngram:{rows.counts.order}", "counts", tokenizer
        self.n_cols, self.n_rows = rows.width, int(rows.sel.size)
        self.n_units = -(-self.n_rows // self.chunk_rows)
        self.facts = dict(facts) if facts is not None else ngram_facts(rows.counts, rows)
        self.sweep: dict[float, tuple] = {}  # corpus fraction → (Spectrum, facts), set by the pipeline

    @classmethod
    def from_options(cls, cfg, *, stream: Optional[torch.Tensor] = None, tokenizer=None) -> "NgramTarget":
        """Count ``cfg.corpus`` (or the token ``stream`` given) with ``cfg``'s order, smoothing,
        space, weighting, min_count, contexts and seed."""
        order = parse_order(cfg.teacher)
        check_target_options(cfg.space, cfg.smoothing, cfg.weighting)  # before any tokenising
        n_ctx = parse_contexts(cfg.contexts)
        if int(cfg.min_count) < 1:
            raise UserError(f"--min-count must be ≥ 1, got {cfg.min_count}.")
        t0 = time.perf_counter()
        if tokenizer is None:
            tokenizer = load_tokenizer(cfg.tokenizer)
        tok, tok_name = tokenizer
        t_tok = 0.0
        if stream is None:
            docs = corpus.load_documents(cfg.corpus)
            t = time.perf_counter()
            stream = tokenize_documents(docs, tok, progress=not cfg.quiet)
            t_tok = time.perf_counter() - t
        t = time.perf_counter()
        counts = count_ngrams(stream, order)
        t_count = time.perf_counter() - t
        rows = build_rows(counts, vocab=len(tok), smoothing=cfg.smoothing, space=cfg.space, weighting=cfg.weighting,
                          min_count=int(cfg.min_count), contexts=n_ctx, seed=cfg.seed)
        target = cls(rows, tokenizer=tok_name)
        target.stream, target.tokenizer_pair = stream, tokenizer
        target.facts.update(seconds_count=t_count, seconds_tokenize=t_tok, seconds_prepare=time.perf_counter() - t0,
                            count_tokens_per_second=counts.n_tokens / t_count if t_count > 0 else None)
        return target

    def prefixes(self, cfg, fractions) -> list[tuple[float, "NgramTarget"]]:
        """The same model on the prefixes of the corpus (whole documents, in corpus order) that
        hold each fraction < 1 of its tokens (the corpus-size sweep)."""
        stream = self.stream
        bounds = np.flatnonzero(stream.numpy() < 0) + 1
        out = []
        for f in fractions:
            if f >= 1:
                continue
            cut = int(bounds[max(0, np.searchsorted(bounds, f * stream.numel()) - 1)]) if bounds.size else stream.numel()
            cut = max(cut, int(bounds[0]) if bounds.size else cut)
            out.append((f, NgramTarget.from_options(cfg, stream=stream[:cut], tokenizer=self.tokenizer_pair)))
        return out

    # ---- the plan ----------------------------------------------------------------------------
    def rows_before(self, j: int) -> int:
        return min(j * self.chunk_rows, self.n_rows)

    def derived(self) -> dict[str, Any]:
        h = hashlib.sha256()
        for a in (self.rows.sel, self.rows.cols, self.rows.counts.contexts[self.rows.sel], self.rows.counts.ctx_count):
            h.update(np.ascontiguousarray(a).tobytes())
        return {"n_cols": self.n_cols, "vocab": self.rows.vocab, "n_rows": self.n_rows, "rows_sha256": h.hexdigest()}

    # ---- rows --------------------------------------------------------------------------------
    def chunk(self, j: int, needs: str) -> Chunk:
        idx = self.rows.sel[self.rows_before(j):self.rows_before(j + 1)]
        stats = torch.full((idx.size, 4), float("nan"), dtype=torch.float64)  # no next token per row
        if needs == "sparse":
            crow, col, val, alpha = self.rows.sparse_chunk(idx)
            stats[:, 3] = torch.from_numpy(self.rows.row_energies(idx))
            return Chunk(stats=stats, sparse=SparseRows(crow, col, val, alpha))
        x = torch.from_numpy(self.rows.dense_chunk(idx))
        stats[:, 3] = (x ** 2).sum(dim=1)  # the merged column √(V−m)·a carries (V−m)·a² exactly
        return Chunk(stats=stats, rows=x)

    # ---- routes ------------------------------------------------------------------------------
    def gram_nbytes(self, *, on_gpu: bool) -> int:
        w = self.rows.width
        return gram_nbytes(w) + (8 * w * w if self.rows.smoothing != "mle" else 0)  # + the corrected copy

    def gram_what(self) -> str:
        r = self.rows
        return (f"the compressed Gram ({r.width:,}² fp64: {r.m:,} observed tokens"
                f"{' + 1 merged column' if r.width > r.m else ''}, of V = {r.vocab:,}) plus eigensolver workspace")

    def accumulator(self, route: str, *, precision: str, space: str) -> Optional[Accumulator]:
        if route == "gram" and self.rows.smoothing != "kn":
            return SparseGram(self.rows.m, self.rows.width, self.rows.rest, space=space, n_cols=self.rows.vocab)
        return None

    def finish(self, spec: Spectrum) -> Spectrum:
        """The full vocabulary's spectrum: V columns; an exact one keeps min(N, width) values (the
        rest are exact zeros)."""
        if spec.exact:
            spec.sigma = spec.sigma[:min(spec.n_rows, spec.sigma.size)]
        spec.n_cols = self.rows.vocab
        return spec

    def meta(self) -> dict[str, Any]:
        return {"teacher": self.name, "teacher_source": self.source, "tokenizer": self.tokenizer, "device": "cpu",
                **self.facts}
