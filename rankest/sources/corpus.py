"""Corpora: documents → packed token windows → the sampled contexts (rows) of a run.

Two steps here, and the plan of rows in :mod:`rankest.sources.rows` (re-exported here):

1. :func:`load_documents` — a short name of :data:`CORPORA`, an HF dataset
   ``NAME[:CONFIG[:SPLIT]]``, or local ``.txt`` / ``.jsonl`` / ``.json`` / ``.parquet`` files.
2. :func:`pack_windows` — tokenise, concatenate with EOS between documents, cut into
   non-overlapping windows of ``seq_len + 1`` tokens (inputs ``w[:, :-1]``, targets ``w[:, 1:]``).
3. :func:`plan_rows` — which (window, position) pairs become rows of the target matrix: every
   chosen position, or ``tokens`` of them drawn uniformly without replacement (seeded), with the
   windows in a seeded random order so that every prefix of the plan is a random subsample
   (convergence curves are computed on prefixes). :func:`iter_batches` walks the plan.

The embedded default corpus ``lee`` is the Lee background corpus (Lee, Pincombe & Welsh 2005,
"An empirical evaluation of models of text document similarity", CogSci 2005): 300 ABC
(Australian Broadcasting Corporation) news articles, about 360 kB, one document per line. It
is not part of rankest: it is read from the test data of the gensim wheel
(``gensim/test/test_data/lee_background.cor``; gensim is LGPL-2.1 and distributes the corpus
with its tests), located without importing gensim. gensim is installed with its dependencies
(scipy, smart_open): ``--no-deps`` would leave pip reporting their absence as an ``ERROR`` at
every later install. rankest never copies the text into its own files.

Examples::

    python -c "from rankest.sources.corpus import load_documents; print(len(load_documents('lee')))"
    python -c "from rankest.sources.corpus import load_documents; print(len(load_documents('wikitext-2')))"
"""

from __future__ import annotations

import contextlib
import difflib
import glob
import logging
import os
import pathlib
import re
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from rankest.errors import UserError, first_line
from rankest.sources.assets import package_file
from rankest.sources.rows import Batch, RowPlan, iter_batches, plan_rows

__all__ = [
    "CorpusInfo",
    "CORPORA",
    "DEFAULT_CORPUS",
    "load_documents",
    "pack_windows",
    "RowPlan",
    "plan_rows",
    "Batch",
    "iter_batches",
    "check_seq_len",
]


@dataclass(frozen=True)
class CorpusInfo:
    """One named corpus: either an HF dataset split, or a file inside an installed package."""

    name: str
    description: str
    hf_path: str | None = None  # datasets.load_dataset(hf_path, hf_config, split=split)
    hf_config: str | None = None
    split: str | None = None
    column: str = "text"
    package: tuple[str, str] | None = None  # (python package, file inside it): one document per line


CORPORA: dict[str, CorpusInfo] = {
    info.name: info
    for info in [
        CorpusInfo(
            "lee",
            "Lee background corpus: 300 ABC news articles (~360 kB), embedded via the gensim wheel",
            package=("gensim", "test/test_data/lee_background.cor"),
        ),
        CorpusInfo(
            "wikitext-2",
            "WikiText-2 raw, test split (Merity et al. 2016)",
            hf_path="Salesforce/wikitext",
            hf_config="wikitext-2-raw-v1",
            split="test",
        ),
        CorpusInfo(
            "wikitext-103",
            "WikiText-103 raw, test split (Merity et al. 2016)",
            hf_path="Salesforce/wikitext",
            hf_config="wikitext-103-raw-v1",
            split="test",
        ),
        CorpusInfo(
            # The Pile's validation set (Gao et al. 2020) as re-hosted by MIT HAN lab for AWQ
            # calibration; the original the-eye.eu host is gone.
            "pile-val",
            "The Pile, validation split (mit-han-lab/pile-val-backup, ~1 GB download)",
            hf_path="mit-han-lab/pile-val-backup",
            split="validation",
        ),
    ]
}
DEFAULT_CORPUS = "lee"

_GENSIM_PIP = "pip install gensim==4.4.0"
_LOCAL_SUFFIXES = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "json",
                   ".json": "json", ".parquet": "parquet"}
_SPLIT_PREFERENCE = ("test", "validation", "train")


# --- documents -----------------------------------------------------------------------------
def load_documents(spec: str | os.PathLike | Sequence[str | os.PathLike], *, max_chars: int | None = None) -> list[str]:
    """Read a corpus as a list of non-empty documents.

    Parameters
    ----------
    spec : str, path or sequence of them
        A short name of :data:`CORPORA`; local files (``.txt``: one document per blank-line
        separated paragraph when the file has blank lines, else one per line; ``.jsonl`` /
        ``.json`` with a ``text`` field; ``.parquet``), glob patterns allowed; or an HF dataset
        ``NAME[:CONFIG[:SPLIT]]`` (column ``text``, else the first string column; without a
        split: ``test``, else ``validation``, else ``train``). A sequence concatenates its items.
    max_chars : int, optional
        Stop once this many characters are read (the last document is cut).

    Returns
    -------
    list of str
        Documents in corpus order; whitespace-only documents dropped.
    """
    if max_chars is not None and max_chars <= 0:
        raise UserError(f"max_chars must be positive, got {max_chars}")
    items = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    if not items:
        raise UserError("no corpus given; pass --corpus NAME or one or more files")
    documents: list[str] = []
    budget = max_chars
    for item in items:
        for doc in _iter_spec(os.fspath(item)):
            if not doc.strip():
                continue
            if budget is not None:
                if len(doc) >= budget:
                    documents.append(doc[:budget])
                    return documents
                budget -= len(doc)
            documents.append(doc)
    if not documents:
        raise UserError(f"the corpus {_describe(items)} has no non-empty documents; check its contents")
    return documents


def _describe(items: list[Any]) -> str:
    names = [os.fspath(x) for x in items]
    return names[0] if len(names) == 1 else f"{names[0]} (+{len(names) - 1} more)"


def _iter_spec(spec: str) -> Iterable[str]:
    if spec in CORPORA:
        info = CORPORA[spec]
        if info.package is not None:
            return _read_lines(_package_file(*info.package))
        return _load_hf(info.hf_path, info.hf_config, info.split, info.column, short=spec)
    path = pathlib.Path(spec).expanduser()
    if path.is_file():
        return _load_local([path])
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in _LOCAL_SUFFIXES)
        if not files:
            raise UserError(
                f"the corpus folder {path} has no .txt/.jsonl/.json/.parquet files; pass files instead"
            )
        return _load_local(files)
    if glob.has_magic(spec):
        files = sorted(pathlib.Path(p) for p in glob.glob(os.path.expanduser(spec)))
        if not files:
            raise UserError(f"the corpus pattern {spec} matches no file; check the path")
        return _load_local(files)
    if pathlib.Path(spec).suffix.lower() in _LOCAL_SUFFIXES or spec.startswith((".", "/", "~")):
        raise UserError(f"the corpus file {spec} does not exist; check the path")
    parts = spec.split(":")
    if len(parts) > 3 or not parts[0]:
        raise UserError(
            f"cannot read --corpus {spec!r}: use a short name ({', '.join(CORPORA)}), local "
            "files, or an HF dataset as NAME[:CONFIG[:SPLIT]]"
        )
    name, config, split = (parts + [None, None])[:3]
    return _load_hf(name, config or None, split or None, None, short=None)


def _package_file(package: str, relative: str) -> pathlib.Path:
    return package_file(package, relative, what="the embedded corpus", install=_GENSIM_PIP)


def _read_lines(path: pathlib.Path) -> Iterator[str]:
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            yield line.rstrip("\r\n")


def _has_blank_line(path: pathlib.Path) -> bool:
    """Whether the first MiB of a text file has a blank (whitespace-only) line."""
    with open(path, encoding="utf-8", errors="replace") as handle:
        head = handle.read(1 << 20)
    return re.search(r"\n[ \t\r\f\v]*\n", head) is not None


def _read_text(path: pathlib.Path) -> Iterator[str]:
    """A .txt file: one document per blank-line separated paragraph when it has blank lines,
    else one per line. Streamed, so files larger than memory are fine."""
    if not _has_blank_line(path):
        yield from _read_lines(path)
        return
    paragraph: list[str] = []
    for line in _read_lines(path):
        if line.strip():
            paragraph.append(line)
        elif paragraph:
            yield "\n".join(paragraph)
            paragraph = []
    if paragraph:
        yield "\n".join(paragraph)


def _load_local(files: list[pathlib.Path]) -> Iterator[str]:
    """Local files: text read directly; JSON lines / JSON / Parquet through the ``datasets``
    packaged builders (they work offline), in memory, with a temporary cache."""
    for path in files:
        builder = _LOCAL_SUFFIXES.get(path.suffix.lower())
        if builder is None:
            raise UserError(
                f"cannot read the corpus file {path}: use .txt, .jsonl, .json or .parquet files"
            )
        if builder == "text":
            yield from _read_text(path)
            continue
        try:
            import datasets

            # A cache folder of its own, removed once the rows are in memory: a local file leaves
            # nothing in the shared datasets cache (~/.cache/huggingface), outside the run's --out.
            with tempfile.TemporaryDirectory(prefix="rankest-corpus-") as cache, _datasets_errors_silenced():
                # (silenced: its own "Failed to read schema" line would precede ours)
                dataset = datasets.load_dataset(builder, data_files=[str(path)], split="train", cache_dir=cache,
                                                keep_in_memory=True)
        except Exception as exc:  # datasets raises many types for a malformed file
            raise UserError(
                f"cannot read the corpus file {path} as {builder} ({first_line(exc, typed=True)}); check "
                "its format (.jsonl needs one JSON object per line with a text field)"
            ) from exc
        yield from _column(dataset, None, str(path))


@contextlib.contextmanager
def _datasets_errors_silenced():
    """datasets' logger quiet below CRITICAL: a malformed local file is reported by rankest's one
    sentence, not by the builder's log line before it."""
    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _column(dataset: Any, column: str | None, where: str) -> Iterator[str]:
    """The ``text`` column, else the first string column."""
    features = dataset.features
    if column is None or column not in features:
        if "text" in features:
            column = "text"
        else:
            strings = [k for k, v in features.items() if getattr(v, "dtype", None) in ("string", "large_string")]
            if not strings:
                raise UserError(
                    f"the corpus {where} has no text column (columns: {', '.join(features)}); "
                    "give it a string column named text"
                )
            column = strings[0]
    for batch in dataset.iter(batch_size=1000):
        for doc in batch[column]:
            if isinstance(doc, str):
                yield doc


def _load_hf(name: str, config: str | None, split: str | None, column: str | None, *, short: str | None) -> Iterator[str]:
    import datasets

    label = name + (f" (config {config})" if config else "") + (f", split {split}" if split else "")
    if short:
        prefix = f"cannot load the corpus {short} = {label} from the Hugging Face datasets cache or Hub"
    else:
        close = difflib.get_close_matches(name, list(CORPORA), n=2, cutoff=0.6)
        prefix = (
            f"{name!r} is neither a local file nor a short name ({', '.join(CORPORA)})"
            + (f" — did you mean {' or '.join(close)}? —" if close else "")
            + f" and loading the Hugging Face dataset {label} failed"
        )
    try:
        if split is None:
            try:
                names = datasets.get_dataset_split_names(name, config)
            except Exception:  # offline: the cached dataset still knows its splits
                names = list(datasets.load_dataset(name, config))
            split = next((s for s in _SPLIT_PREFERENCE if s in names), names[0])
        dataset = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # offline, unknown name, bad config or split: all user-facing
        offline = any(
            os.environ.get(k, "").strip().lower() in {"1", "on", "yes", "true"}
            for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
        )
        raise UserError(
            f"{prefix} ({first_line(exc, typed=True)}" + ("; offline mode is on" if offline else "")
            + "); download it where there is network, use local .txt/.jsonl/.parquet files, "
            f"or the embedded corpus {DEFAULT_CORPUS}"
        ) from exc
    yield from _column(dataset, column, label)


# --- windows -------------------------------------------------------------------------------
def check_seq_len(seq_len: int, context_length: int) -> None:
    """Raise :class:`UserError` unless ``1 ≤ seq_len ≤ context_length``."""
    if seq_len < 1:
        raise UserError(f"--seq-len must be at least 1, got {seq_len}")
    if seq_len > context_length:
        raise UserError(
            f"--seq-len {seq_len} exceeds the teacher's context length {context_length}; "
            f"use --seq-len {context_length} or less"
        )


def pack_windows(
    documents: Iterable[str],
    tokenizer: Any,
    seq_len: int,
    *,
    max_windows: int | None = None,
    progress: bool = True,
    chunk_docs: int = 256,
) -> torch.Tensor:
    """Tokenise documents, concatenate them and cut non-overlapping windows.

    Documents are tokenised without special tokens and joined with the tokenizer's EOS token
    between consecutive documents (none when it has no EOS). The stream is cut into windows of
    ``seq_len + 1`` tokens; the incomplete tail is dropped. Tokenisation is lazy (``chunk_docs``
    documents at a time) and stops once ``max_windows`` windows are full.

    Parameters
    ----------
    documents : iterable of str
    tokenizer : a transformers tokenizer
    seq_len : int
        L, the teacher's input length; windows hold L + 1 tokens.
    max_windows : int, optional
    progress : bool
        Show a tqdm bar (desc ``"tokenising"``).

    Returns
    -------
    LongTensor of shape (W, seq_len + 1)
        Inputs are ``w[:, :-1]`` and targets ``w[:, 1:]``.
    """
    if seq_len < 1:
        raise UserError(f"--seq-len must be at least 1, got {seq_len}")
    if max_windows is not None and max_windows < 1:
        raise UserError(f"max_windows must be at least 1, got {max_windows}")
    width = seq_len + 1
    eos = getattr(tokenizer, "eos_token_id", None)
    docs = documents if isinstance(documents, list) else list(documents)
    windows: list[torch.Tensor] = []
    carry: list[int] = []
    n_windows = 0
    total_tokens = 0
    bar = tqdm(total=len(docs), desc="tokenising", unit="doc", disable=not progress or len(docs) < 2 * chunk_docs)
    try:
        for start in range(0, len(docs), chunk_docs):
            chunk = docs[start : start + chunk_docs]
            encoded = tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]
            stream = carry
            for i, ids in enumerate(encoded):
                if eos is not None and (start + i) > 0:
                    stream.append(eos)
                stream.extend(ids)
                total_tokens += len(ids)
            bar.update(len(chunk))
            n_full = len(stream) // width
            if max_windows is not None:
                n_full = min(n_full, max_windows - n_windows)
            if n_full:
                block = torch.tensor(stream[: n_full * width], dtype=torch.long).view(n_full, width)
                windows.append(block)
                n_windows += n_full
                carry = stream[n_full * width :]
            else:
                carry = stream
            if max_windows is not None and n_windows >= max_windows:
                break
    finally:
        bar.close()
    if n_windows == 0:
        raise UserError(
            f"the corpus gives {total_tokens} tokens, fewer than one window of --seq-len + 1 = "
            f"{width}; use a bigger corpus or a smaller --seq-len"
        )
    return torch.cat(windows)


# --- the row plan --------------------------------------------------------------------------
def corpus_name(corpus) -> str:
    """How results name a run's corpus: the spec as given, or the shape of pre-tokenised windows
    (None for none: a target whose rows do not come from a corpus)."""
    if corpus is None:
        return None
    if isinstance(corpus, torch.Tensor):
        return f"pre-tokenised windows {tuple(corpus.shape)}"
    return corpus if isinstance(corpus, str) else ",".join(map(str, corpus))


def windows_for(corpus, docs, tokenizer, seq_len: int, *, max_windows: int | None, progress: bool) -> torch.Tensor:
    """The packed windows (W, seq_len + 1) of a run: ``corpus`` itself when it is a pre-tokenised
    LongTensor (benchmarks, synthetic tokens; its shape is checked), else ``docs`` (from
    :func:`load_documents`, read before the teacher so a typo fails fast) packed with
    :func:`pack_windows`."""
    if isinstance(corpus, torch.Tensor):
        if corpus.dim() != 2 or corpus.shape[1] != seq_len + 1:
            raise UserError(f"pre-tokenised windows must have shape (W, seq_len + 1 = {seq_len + 1}), "
                            f"got {tuple(corpus.shape)}.")
        return corpus
    return pack_windows(docs, tokenizer, seq_len, max_windows=max_windows, progress=progress)












