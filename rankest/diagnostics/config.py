"""`AnisotropyConfig`, `HeadSpectrumConfig`: every option of ``anisotropy`` and ``head-spectrum``
(the CLI flags and the keyword arguments of :func:`rankest.anisotropy` /
:func:`rankest.head_spectrum`, declared once, :mod:`rankest.options`), their defaults and checks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Union

from rankest.diagnostics.head_spectrum import TOP_RATIOS
from rankest.errors import UserError
from rankest.options import check_numbers, option, shared_option

#: Title of the --help section of the sweep's options.
CHECKPOINTS = "checkpoints"

_REVISIONS_HELP = ("comma-separated checkpoints: Hub revisions (step1000,step143000), local model folders, or "
                   "sub-folders of a local --teacher folder")
_RESUME_HELP = "skip the checkpoints already in the run folder"
_CACHE_DIR_HELP = "Hugging Face hub cache folder of the checkpoints (default: the hub's own)"


class _SweepOptions:
    """What both sweeps over checkpoints do with their options (``teacher``, ``revision`` /
    ``revisions``): a mixin of the two dataclasses below."""

    COMMAND: ClassVar[str]

    @classmethod
    def from_kwargs(cls, kwargs: dict):
        """The config of keyword arguments (an unknown one is a TypeError), checked, with
        ``revisions`` a list: the one ``revision``, or ``revisions`` split at commas."""
        unknown = set(kwargs) - set(cls.__dataclass_fields__)
        if unknown:
            raise TypeError(f"{cls.COMMAND}: unknown options {sorted(unknown)}")
        cfg = cls(**kwargs)
        if cfg.revision is not None and cfg.revisions:
            raise UserError("give either --revision or --revisions, not both")
        if cfg.revisions is None and cfg.revision is not None:
            cfg.revisions = [cfg.revision]
        if isinstance(cfg.revisions, str):
            cfg.revisions = [r for r in (x.strip() for x in cfg.revisions.split(",")) if r]
        cfg.validate()
        return cfg

    def validate(self) -> None:
        pass


@dataclass
class AnisotropyConfig(_SweepOptions):
    """Every option of ``anisotropy`` (its CLI also accepts ``--max-memory``, unused)."""

    COMMAND: ClassVar[str] = "anisotropy"

    teacher: Any = shared_option("teacher")  # Python: also a loaded rankest.sources.teachers.Teacher
    revision: Optional[str] = shared_option("revision")
    corpus: Union[str, list, None] = shared_option("corpus")
    tokens: Optional[int] = shared_option("tokens")
    seq_len: int = shared_option("seq_len")
    positions: str = shared_option("positions")
    sample: str = shared_option("sample")
    batch_size: int = shared_option("batch_size")
    device: Any = shared_option("device")
    device_map: Optional[str] = shared_option("device_map")
    dtype: Any = shared_option("dtype")
    seed: int = shared_option("seed")
    out: Optional[str] = shared_option("out")
    overwrite: bool = shared_option("overwrite")
    quiet: bool = shared_option("quiet")
    revisions: Union[str, list, None] = option(None, group=CHECKPOINTS, help=_REVISIONS_HELP)
    resume: bool = option(False, group=CHECKPOINTS, help=_RESUME_HELP)
    pca: bool = option(True, group=CHECKPOINTS,
                       help="skip the per-layer d×d Gram (first-principal-direction share): 8·d²·layers bytes")
    cache_dir: Optional[str] = option(None, cli=False, help=_CACHE_DIR_HELP)

    def validate(self) -> None:
        check_numbers(self)
        if self.tokens is not None and int(self.tokens) < 2:
            raise UserError(f"anisotropy needs at least 2 representations (--tokens ≥ 2), got {self.tokens}")
        if int(self.seq_len) < 1 or int(self.batch_size) < 1:
            raise UserError("--seq-len and --batch-size must be positive integers")


@dataclass
class HeadSpectrumConfig(_SweepOptions):
    """Every option of ``head-spectrum`` (its CLI also accepts the corpus options of the other
    model commands, unused: the head's spectrum reads no text)."""

    COMMAND: ClassVar[str] = "head-spectrum"

    teacher: Any = shared_option("teacher")  # Python: also a loaded rankest.sources.teachers.Teacher
    revision: Optional[str] = shared_option("revision")
    device: Any = shared_option("device")
    device_map: Optional[str] = shared_option("device_map")
    dtype: Any = shared_option("dtype")
    out: Optional[str] = shared_option("out")
    overwrite: bool = shared_option("overwrite")
    quiet: bool = shared_option("quiet")
    revisions: Union[str, list, None] = option(None, group=CHECKPOINTS, help=_REVISIONS_HELP)
    resume: bool = option(False, group=CHECKPOINTS, help=_RESUME_HELP)
    top: int = option(TOP_RATIOS, cli=False,
                      help=f"leading singular-value ratios σ_i/σ_0 kept (default {TOP_RATIOS})")
    cache_dir: Optional[str] = option(None, cli=False, help=_CACHE_DIR_HELP)

    def validate(self) -> None:
        if int(self.top) < 1:
            raise UserError(f"top must be a positive integer, got {self.top}")
