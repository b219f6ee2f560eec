import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

from rankest.errors import UserError
from rankest.heads.families import parse_families
from rankest.options import (check_numbers, checkpoint_every_option, option, positive_int, resume_option,
                             shared_option)
from rankest.runtime.run import check_checkpoint_options

INITS = ("normal", "scaled", "svd")


OBJECTIVES = ("ce", "kl")


#: Validation rows below which loss and accuracy are too noisy to report.
MIN_VAL_ROWS = 100


#: Multipliers of the rank's default LR tried by ``lr_search``.
LR_SEARCH_FACTORS = (0.5, 1.0, 2.0)

#: Title of the --help section of heads' own options.
HEADS = "heads"


# ---- configuration ---------------------------------------------------------------------------
@dataclass
class HeadsConfig:
    """Every option of ``heads``: the CLI flags (``--val-tokens`` is ``val_tokens``) and the keyword
    arguments of :func:`rankest.fit_heads`, declared once (:mod:`rankest.options`)."""

    teacher: Any = shared_option("teacher")  # Python: also a loaded rankest.sources.teachers.Teacher
    revision: Optional[str] = shared_option("revision")
    corpus: Union[str, list, None] = shared_option("corpus")  # Python: also a (W, seq_len + 1) tensor of windows
    tokens: Optional[int] = shared_option("tokens")  # training rows (None: every row of the training split)
    seq_len: int = shared_option("seq_len")
    positions: str = shared_option("positions")
    sample: str = shared_option("sample")
    ranks: Union[str, Sequence] = option("32,64,128,256,512,1024,2048,full", group=HEADS,
                                         help="ranks r of the heads, comma-separated, 'full' = min(d, V'); larger "
                                              "ranks become full (default 32,64,128,256,512,1024,2048,full)")
    init: str = option("normal", choices=INITS, group=HEADS,
                       help="normal: N(0,1) coefficients (the paper's, default); scaled: variance-preserving; "
                            "svd: best rank-r approximation of the teacher's head in the feature metric")
    objective: str = option("ce", choices=OBJECTIVES, group=HEADS,
                            help="ce: next-token cross-entropy (the paper's, default); kl: distil the teacher's "
                                 "distribution")
    lr: Optional[float] = option(None, type=float, group=HEADS,
                                 help="peak learning rate of every head (default: the paper's by rank)")
    lr_search: bool = option(False, group=HEADS, help="try 0.5×, 1×, 2× the paper's LR per rank on a held-out "
                                                      "slice of the training rows")
    # steps: more than one pass over the training rows recomputes the features on the fly (once
    # per pass for all heads) unless cache_features is given
    steps: Optional[int] = option(None, type=positive_int, group=HEADS,
                                  help="optimiser steps (default: one pass over the training rows)")
    val_tokens: int = option(4096, type=positive_int, group=HEADS,
                             help="held-out validation rows, whole windows never trained on (default 4096)")
    batch_size: int = shared_option("batch_size")  # windows per optimiser step (the paper: 256 sequences)
    gram_rows: Optional[int] = option(None, cli=False, help="rows of the feature metric (default max(4096, 4d))")
    weight_decay: float = option(0.01, cli=False,
                                 help="AdamW weight decay of the heads' factors (biases are not decayed)")
    cache_features: Optional[str] = option(None, metavar="FILE.h5", group=HEADS,
                                           help="compute the teacher's features once into this HDF5 file, or reuse "
                                                "it if it exists (refused when written for another teacher, "
                                                "tokenizer or rows)")
    family: Optional[str] = option(None, metavar="LIST", group=HEADS,
                                   help="head families trained beside the rank sweep, on the same batches: linear, "
                                        "mos:K (mixture of K softmaxes), sigsoftmax, mlp:H (hidden width H), "
                                        "comma-separated, e.g. linear,mos:4,sigsoftmax,mlp:64 (default: none)")
    seeds: int = option(1, type=positive_int, group=HEADS,
                        help="replicates (init seeds) of every family head: loss ± a 95%% interval, and the knee's "
                             "interval (default 1)")
    match_params: bool = option(False, group=HEADS,
                                help="size every family's heads to the parameter count of the linear head of each "
                                     "rank (default: every family at the ranks themselves)")
    knee_threshold: float = option(0.05, type=float, group=HEADS,
                                   help="the knee of loss vs rank: the rank beyond which the loss improves by less "
                                        "than this many nats per doubling (default 0.05)")
    rank_rows: int = option(1024, type=positive_int, group=HEADS,
                            help="validation rows of each family head's output-rank measurement (default 1024)")
    device: str = shared_option("device")
    dtype: str = shared_option("dtype")
    device_map: Optional[str] = shared_option("device_map")  # spread the teacher over the visible GPUs
    seed: int = shared_option("seed")
    out: Optional[str] = shared_option("out")
    overwrite: bool = shared_option("overwrite")
    quiet: bool = shared_option("quiet")
    checkpoint_every: Optional[int] = checkpoint_every_option(unit="STEPS", what="optimiser steps")
    resume: bool = resume_option(run="sweep")

    def validate(self) -> None:
        check_numbers(self)
        check_checkpoint_options(self, unit="steps")
        if self.init not in INITS:
            raise UserError(f"--init must be one of {', '.join(INITS)}, got {self.init!r}.")
        if self.objective not in OBJECTIVES:
            raise UserError(f"--objective must be ce (next-token cross-entropy) or kl (distil the teacher), "
                            f"got {self.objective!r}.")
        if self.lr is not None and not (float(self.lr) > 0 and math.isfinite(float(self.lr))):
            raise UserError(f"--lr must be a positive finite number, got {self.lr}.")
        if self.lr is not None and self.lr_search:
            raise UserError("--lr fixes the learning rate and --lr-search searches for one; pass only one of them.")
        for name in ("seq_len", "batch_size", "val_tokens"):
            if int(getattr(self, name)) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(self, name)}.")
        if self.steps is not None and int(self.steps) < 1:
            raise UserError(f"--steps must be a positive integer, got {self.steps}.")
        if self.tokens is not None and int(self.tokens) < 1:
            raise UserError(f"--tokens must be a positive integer or all, got {self.tokens}.")
        if self.family is not None:
            parse_families(self.family)
        if int(self.seeds) < 1 or int(self.rank_rows) < 1:
            raise UserError("--seeds and --rank-rows must be positive integers.")
        if not (float(self.knee_threshold) > 0 and math.isfinite(float(self.knee_threshold))):
            raise UserError(f"--knee-threshold must be a positive number of nats per doubling, "
                            f"got {self.knee_threshold}.")
        if (int(self.seeds) > 1 or self.match_params) and self.family is None:
            raise UserError("--seeds and --match-params apply to --family heads; add e.g. --family linear,mos:4.")
        if self.gram_rows is not None and int(self.gram_rows) < 1:
            raise UserError(f"gram_rows must be a positive integer, got {self.gram_rows}.")
