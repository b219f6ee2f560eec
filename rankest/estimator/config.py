"""`EstimateConfig`: every option of ``estimate``, its defaults and its checks (each a sentence)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

from rankest.errors import UserError
from rankest.io.rowcache import CACHE_DTYPES
from rankest.ops.reference import GRAM_PRECISIONS, SPACES
from rankest.runtime.memory import parse_size
from rankest.runtime.run import check_checkpoint_options
from rankest.sources.corpus import DEFAULT_CORPUS
from rankest.sources.teachers import DEFAULT_TEACHER
from rankest.targets import ngram

ROUTES = ("auto", "factor", "gram", "sketch")


@dataclass
class EstimateConfig:
    """Every option of `estimate` (the CLI flags, under the same names)."""

    teacher: Any = None  # short name, local folder, or a loaded rankest.sources.teachers.Teacher
    revision: Optional[str] = None
    corpus: Union[str, list, None] = None
    tokens: Optional[int] = 16384
    seq_len: int = 256
    space: str = "clr"
    route: str = "auto"
    rank_max: Optional[int] = None
    passes: Union[int, str] = "auto"
    row_cache_dtype: str = "auto"
    keep_row_cache: bool = False
    batch_size: int = 8
    device: str = "auto"
    dtype: str = "auto"
    device_map: Optional[str] = None  # spread the teacher over the visible GPUs (teachers.load_teacher)
    max_memory: Optional[str] = None
    seed: int = 0
    positions: str = "all"
    sample: str = "windows"
    gram_precision: str = "fp64"
    out: Optional[str] = None
    overwrite: bool = False
    quiet: bool = False
    convergence: bool = True
    checkpoint_every: Optional[int] = None
    resume: bool = False
    diagnostics: bool = False  # anisotropy + head spectrum on the same batches (rankest.diagnostics)
    # n-gram targets (--teacher ngram:N), see rankest.targets.ngram
    tokenizer: Optional[str] = None
    smoothing: str = "mle"
    min_count: int = 1
    contexts: Union[int, str, None] = "all"
    weighting: str = "equal"
    corpus_fractions: Union[str, list, None] = None
    # rows made in memory (rankest.estimate(rows=...)): a 2-D tensor or a sequence of (n_i, V) chunks
    rows: Any = None

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
