"""`SaturationConfig`: every option of ``saturation`` (the CLI flags and the keyword arguments of
:func:`rankest.saturation.pipeline.run_saturation`, declared once, :mod:`rankest.options`), its
defaults and checks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Union

from rankest.errors import UserError
from rankest.options import checkpoint_every_option, option, positive_int, resume_option, shared_option
from rankest.runtime.run import check_checkpoint_options
from rankest.saturation.params import config_counts

INPUTS = "inputs"
ANALYSIS = "analysis"
STREAM = "streamed evaluation (--teachers)"

FIT_AT = ("final", "best")
PARAM_KINDS = ("total", "non_embedding")


def _split(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = value.split(",")
    return [v.strip() for v in value if str(v).strip()]


def _parse_params(value) -> dict[str, Any]:
    """``NAME=COUNT,…`` (COUNT like 160e6) or ``NAME=config.json`` (a GPT-NeoX config, counted) →
    {name: count or {"total", "non_embedding"}}."""
    if isinstance(value, dict):
        return dict(value)
    out: dict[str, Any] = {}
    for item in _split(value):
        name, sep, count = (x.strip() for x in item.partition("="))
        if sep and count.endswith(".json"):
            out[name] = config_counts(count)
            continue
        try:
            out[name] = float(count)
        except ValueError:
            sep = ""
        if not sep or out.get(name, 0) <= 0:
            raise UserError(f"--params {item!r}: give NAME=COUNT with a positive count (e.g. pythia-160m=162e6) or "
                            "NAME=config.json")
    return out


@dataclass
class SaturationConfig:
    """Every option of ``saturation``."""

    COMMAND: ClassVar[str] = "saturation"

    corpus: Union[str, list, None] = shared_option("corpus")
    tokens: Optional[int] = shared_option("tokens")
    seq_len: int = shared_option("seq_len")
    positions: str = shared_option("positions")
    sample: str = shared_option("sample")
    batch_size: int = shared_option("batch_size")
    device: Any = shared_option("device")
    dtype: Any = shared_option("dtype")
    seed: int = shared_option("seed")
    out: Optional[str] = shared_option("out")
    overwrite: bool = shared_option("overwrite")
    quiet: bool = shared_option("quiet")
    evals: Union[str, list, None] = option(None, nargs="+", metavar="DIR|FILE", group=INPUTS,
                                           help="lm-evaluation-harness result files (either layout), or folders of "
                                                "them: one file per model and checkpoint")
    map: Optional[str] = option(None, metavar="FILE.json", group=INPUTS,
                                help="JSON {\"<file>\": \"MODEL@STEP\"} naming files whose config and name do not")
    teachers: Union[str, list, None] = option(None, metavar="A,B,…", group=STREAM,
                                              help="models to evaluate with rankest itself over --corpus (short "
                                                   "names or folders), each at every --revisions")
    revisions: Union[str, list, None] = option(None, metavar="stepX,…", group=STREAM,
                                               help="checkpoints of every --teachers model (Hub revisions or "
                                                    "sub-folders of a local teacher folder), named stepN")
    diagnostics: bool = option(False, group=STREAM,
                               help="also measure the head's singular spectrum, the token-frequency share of its top "
                                    "directions and the last layer's anisotropy on the same batches")
    checkpoint_every: Optional[int] = checkpoint_every_option(unit="N", what="batches")
    resume: bool = resume_option(run="streamed evaluation")
    metric: str = option(None, metavar="TASK:METRIC", group=ANALYSIS,
                         help="what to analyse: TASK:METRIC of the evaluation files (lambada_openai:ppl, "
                              "lambada_openai:acc, …; default lambada_openai:ppl) or nll, ppl, acc of --teachers "
                              "(default nll)")
    direction: str = option("auto", choices=("auto", "lower", "higher"), group=ANALYSIS,
                            help="whether lower or higher values are better (auto: lower for perplexities, NLL and "
                                 "losses)")
    fit_on: Union[str, list, None] = option(None, metavar="A,B,…", group=ANALYSIS,
                                            help="models the scaling law is fitted on (default: those that do not "
                                                 "saturate)")
    fit_at: str = option("final", choices=FIT_AT, group=ANALYSIS,
                         help="fit the law on each model's final or best checkpoint (default final)")
    param_count: str = option("total", choices=PARAM_KINDS, group=ANALYSIS,
                              help="parameter count N of the law: total or non_embedding (both are reported)")
    params: Union[str, dict, None] = option(None, metavar="NAME=COUNT,…", group=ANALYSIS,
                                            help="parameter counts of models that are neither Pythia nor evaluated "
                                                 "here: NAME=COUNT, or NAME=config.json of a GPT-NeoX model")
    confidence: float = option(0.9, type=float, group=ANALYSIS, help="level of the bootstrap intervals (default 0.9)")
    bootstrap: int = option(1000, type=positive_int, group=ANALYSIS, help="bootstrap resamples (default 1000)")
    onset_sigma: float = option(2.0, type=float, group=ANALYSIS,
                                help="a checkpoint is worse than the best when it exceeds it by this many standard "
                                     "errors (default 2)")
    onset_points: int = option(2, type=positive_int, group=ANALYSIS,
                               help="checkpoints the final worse stretch must hold for a saturation (default 2)")
    cache_dir: Optional[str] = option(None, cli=False, help="Hugging Face hub cache folder of the checkpoints")

    @classmethod
    def from_kwargs(cls, kwargs: dict) -> "SaturationConfig":
        unknown = set(kwargs) - set(cls.__dataclass_fields__)
        if unknown:
            raise TypeError(f"saturation: unknown options {sorted(unknown)}")
        cfg = cls(**kwargs)
        cfg.evals = [cfg.evals] if isinstance(cfg.evals, str) else list(cfg.evals or [])
        cfg.teachers, cfg.revisions, cfg.fit_on = _split(cfg.teachers), _split(cfg.revisions), _split(cfg.fit_on)
        cfg.params = _parse_params(cfg.params)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if not self.evals and not self.teachers:
            raise UserError("saturation needs inputs: --evals DIR|FILES (lm-evaluation-harness results) and/or "
                            "--teachers A,B --revisions stepX,stepY")
        if self.teachers and not self.revisions:
            raise UserError("--teachers needs --revisions stepX,stepY: the checkpoints to evaluate")
        if self.revisions and not self.teachers:
            raise UserError("--revisions names checkpoints of --teachers; give --teachers too")
        if self.diagnostics and not self.teachers:
            raise UserError("--diagnostics measures the models rankest evaluates itself; add --teachers")
        if not 0 < float(self.confidence) < 1:
            raise UserError(f"--confidence must lie strictly between 0 and 1, got {self.confidence}")
        if float(self.onset_sigma) < 0:
            raise UserError(f"--onset-sigma must be non-negative, got {self.onset_sigma}")
        check_checkpoint_options(self, unit="batches")
