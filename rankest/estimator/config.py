"""`EstimateConfig`: every option of ``estimate``, its defaults and its checks (each a sentence)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

from rankest.errors import UserError
from rankest.io.rowcache import CACHE_DTYPES
from rankest.ops.reference import GRAM_PRECISIONS, SPACES
from rankest.options import (
    check_numbers,
    checkpoint_every_option,
    option,
    parse_passes,
    positive_int,
    resume_option,
    shared_option,
)
from rankest.runtime.memory import parse_size
from rankest.runtime.run import check_checkpoint_options
from rankest.sources.corpus import DEFAULT_CORPUS
from rankest.sources.teachers import DEFAULT_TEACHER
from rankest.targets import ngram

ROUTES = ("auto", "factor", "gram", "sketch")

#: Titles of estimate's own --help sections.
ESTIMATION = "estimation"
NGRAM = "n-gram targets (--teacher ngram:N)"


@dataclass
class EstimateConfig:
    """Every option of `estimate`: the CLI flags (``--seq-len`` is ``seq_len``) and the keyword
    arguments of :func:`rankest.estimate`, declared once (:mod:`rankest.options`)."""

    teacher: Any = shared_option("teacher")  # Python: also a loaded rankest.sources.teachers.Teacher
    revision: Optional[str] = shared_option("revision")
    corpus: Union[str, list, None] = shared_option("corpus")
    tokens: Optional[int] = shared_option("tokens")
    seq_len: int = shared_option("seq_len")
    space: str = option("clr", choices=SPACES, group=ESTIMATION,
                        help="target space: centred log-probs (default), probabilities, log-probs")
    route: str = option("auto", choices=ROUTES, group=ESTIMATION,
                        help="accumulation route (default auto: factor when exact, gram when it fits, else sketch)")
    rank_max: Optional[int] = option(None, type=positive_int, group=ESTIMATION,
                                     help="sketch size k / largest rank reported")
    passes: Union[int, str] = option("auto", type=parse_passes, group=ESTIMATION,
                                     help="sketch route: passes over the rows (auto = 1 for a neural teacher; for rows "
                                          "from a file or memory, the rows cached on disk and passes until the "
                                          "estimated error of sigma_1..sigma_k is below 1e-3; q >= 2 caches the rows "
                                          "on disk once and runs q passes over them)")
    row_cache_dtype: str = option("auto", choices=("auto", *CACHE_DTYPES), group=ESTIMATION,
                                  help="dtype of the row cache of --passes >= 2 (auto: the rows' own dtype)")
    keep_row_cache: bool = option(False, group=ESTIMATION, help="keep rows.h5 of --passes >= 2 in the run folder")
    batch_size: int = shared_option("batch_size")
    device: str = shared_option("device")
    dtype: str = shared_option("dtype")
    device_map: Optional[str] = shared_option("device_map")  # spread the teacher over the visible GPUs
    max_memory: Optional[str] = shared_option("max_memory")
    seed: int = shared_option("seed")
    positions: str = shared_option("positions")
    sample: str = shared_option("sample")
    gram_precision: str = option("fp64", choices=GRAM_PRECISIONS, group=ESTIMATION,
                                 help="Gram products in fp64 (default) or fp32 with an fp64 carry")
    out: Optional[str] = shared_option("out")
    overwrite: bool = shared_option("overwrite")
    quiet: bool = shared_option("quiet")
    convergence: bool = option(True, group=ESTIMATION, help="skip the metrics at N/8, N/4, N/2")
    checkpoint_every: Optional[int] = checkpoint_every_option(unit="CHUNKS", what="chunks")
    resume: bool = resume_option(run="run")
    diagnostics: bool = option(False, group=ESTIMATION,  # rankest.diagnostics, on the same batches
                               help="also measure every layer's anisotropy and the head spectrum on the same "
                                    "batches (anisotropy.*, head_spectrum.* in --out)")
    # n-gram targets (--teacher ngram:N), see rankest.targets.ngram
    tokenizer: Optional[str] = option(None, group=NGRAM,
                                      help="pythia | gpt2 (after `rankest setup-tokenizers`) | smollm2 | a "
                                           "tokenizer folder, tokenizer.json or .gguf")
    smoothing: str = option("mle", group=NGRAM,
                            help="mle (the paper's, default) | add-k:K | kn (interpolated Kneser–Ney)")
    min_count: int = option(1, type=positive_int, group=NGRAM, help="use contexts seen at least M times (default 1)")
    contexts: Union[int, str, None] = option("all", group=NGRAM, help="all (default) or C contexts sampled with --seed")
    weighting: str = option("equal", choices=ngram.WEIGHTINGS, group=NGRAM,
                            help="rows weighted equally (the paper's) or by context count")
    corpus_fractions: Union[str, list, None] = option(None, group=NGRAM, help="also run on these prefixes of the "
                                                                              "corpus, e.g. 0.125,0.25,0.5,1")
    rows: Any = option(None, cli=False, help="rows made in memory instead of a teacher's: a 2-D tensor or a "
                                             "sequence of (n_i, V) chunks")

    @classmethod
    def from_kwargs(cls, kwargs: dict) -> "EstimateConfig":
        """The config of keyword arguments (an unknown one is a TypeError), with the embedded
        teacher and corpus as defaults, checked."""
        unknown = set(kwargs) - set(cls.__dataclass_fields__)
        if unknown:
            raise TypeError(f"unknown options: {sorted(unknown)}")
        cfg = cls(**kwargs)
        if cfg.teacher is None:
            cfg.teacher = DEFAULT_TEACHER
        if cfg.corpus is None:
            cfg.corpus = DEFAULT_CORPUS
        cfg.validate()
        return cfg

    @property
    def target_kind(self) -> str:
        """``rows``, ``logits``, ``ngram`` or ``neural``: which target the options name."""
        if self.rows is not None:
            return "rows"
        if isinstance(self.teacher, str) and self.teacher.startswith(("logits:", "ngram:")):
            return self.teacher.split(":", 1)[0]
        return "neural"

    def validate(self) -> None:
        check_numbers(self)
        if self.space not in SPACES:
            raise UserError(f"--space must be one of {', '.join(SPACES)}, got {self.space!r}.")
        if self.route not in ROUTES:
            raise UserError(f"--route must be one of {', '.join(ROUTES)}, got {self.route!r}.")
        if self.route == "factor" and self.space != "clr":
            raise UserError(f"the factor route is exact only for --space clr (centred log-probs equal centred "
                            f"logits, a linear function of the features); use --route gram or sketch for "
                            f"--space {self.space}.")
        if self.gram_precision not in GRAM_PRECISIONS:
            raise UserError(f"--gram-precision must be fp64 or fast, got {self.gram_precision!r}.")
        for name in ("seq_len", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(self, name)}.")
        if self.tokens is not None and int(self.tokens) < 2:
            raise UserError(f"--tokens must be at least 2 (a spectrum needs rows), got {self.tokens}.")
        if self.sample not in ("windows", "rows"):
            raise UserError(f"--sample must be windows or rows, got {self.sample!r}.")
        if self.rank_max is not None and int(self.rank_max) < 1:
            raise UserError(f"--rank-max must be a positive integer, got {self.rank_max}.")
        if self.max_memory is not None:
            parse_size(self.max_memory)
        check_checkpoint_options(self, unit="chunks")
        if self.passes != "auto" and not (isinstance(self.passes, int) and self.passes >= 1):
            raise UserError(f"--passes must be a positive integer or auto, got {self.passes!r}.")
        if self.row_cache_dtype != "auto" and self.row_cache_dtype not in CACHE_DTYPES:
            raise UserError(f"--row-cache-dtype must be auto or one of {', '.join(CACHE_DTYPES)}, "
                            f"got {self.row_cache_dtype!r}.")
        kind = self.target_kind
        if kind != "neural" and self.diagnostics:
            raise UserError(f"--diagnostics measures a neural teacher's layers; a {kind} target has none: drop it.")
        if kind == "ngram":  # every n-gram option checked before any tokenising
            ngram.parse_order(self.teacher)
            ngram.check_target_options(self.space, self.smoothing, self.weighting)
            ngram.parse_contexts(self.contexts)
            ngram.parse_fractions(self.corpus_fractions)
            if int(self.min_count) < 1:
                raise UserError(f"--min-count must be ≥ 1, got {self.min_count}.")
            if self.passes not in ("auto", 1):
                raise UserError(f"--passes {self.passes} does not apply to n-gram targets (their exact Gram or "
                                f"single-pass sketch reads the counts once); drop it.")
