import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

from rankest.errors import UserError
from rankest.runtime.run import check_checkpoint_options

INITS = ("normal", "scaled", "svd")


OBJECTIVES = ("ce", "kl")


#: Validation rows below which loss and accuracy are too noisy to report.
MIN_VAL_ROWS = 100


#: Multipliers of the rank's default LR tried by ``lr_search``.
LR_SEARCH_FACTORS = (0.5, 1.0, 2.0)


# ---- configuration ---------------------------------------------------------------------------
@dataclass
class HeadsConfig:
    """Every option of ``heads`` (the CLI flags under the same names)."""

    teacher: Any = None
    revision: Optional[str] = None
    corpus: Union[str, list, None] = None
    tokens: Optional[int] = 16384  # training rows (None: every row of the training split)
    val_tokens: int = 4096  # validation rows
    seq_len: int = 256
    positions: str = "all"
    sample: str = "windows"
    ranks: Union[str, Sequence] = "32,64,128,256,512,1024,2048,full"
    init: str = "normal"
    objective: str = "ce"
    lr: Optional[float] = None
    lr_search: bool = False
    steps: Optional[int] = None  # default: one pass over the training rows; more passes recompute the
    # features on the fly (once per pass for all heads) unless cache_features is given
    batch_size: int = 8  # windows per optimiser step (the paper: 256 sequences)
    gram_rows: Optional[int] = None  # rows of the feature metric (default max(4096, 4d))
    weight_decay: float = 0.01
    cache_features: Optional[str] = None
    device: str = "auto"
    dtype: str = "auto"
    device_map: Optional[str] = None  # spread the teacher over the visible GPUs (teachers.load_teacher)
    seed: int = 0
    out: Optional[str] = None
    overwrite: bool = False
    quiet: bool = False
    checkpoint_every: Optional[int] = None  # optimiser steps between checkpoints (DIR/checkpoint.h5)
    resume: bool = False

    def validate(self) -> None:
        check_checkpoint_options(self, unit="steps")
        if self.init not in INITS:
            raise UserError(f"--init must be one of {', '.join(INITS)}, got {self.init!r}.")
        if self.objective not in OBJECTIVES:
            raise UserError(f"--objective must be ce (next-token cross-entropy) or kl (distil the teacher), "
                            f"got {self.objective!r}.")
        if self.lr is not None and not (float(self.lr) > 0 and math.isfinite(float(self.lr))):
            raise UserError(f"--lr must be a positive number, got {self.lr}.")
        if self.lr is not None and self.lr_search:
            raise UserError("--lr fixes the learning rate and --lr-search searches for one; pass only one of them.")
        for name in ("seq_len", "batch_size", "val_tokens"):
            if int(getattr(self, name)) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(self, name)}.")
        if self.steps is not None and int(self.steps) < 1:
            raise UserError(f"--steps must be a positive integer, got {self.steps}.")
        if self.tokens is not None and int(self.tokens) < 1:
            raise UserError(f"--tokens must be a positive integer or all, got {self.tokens}.")
        if self.gram_rows is not None and int(self.gram_rows) < 1:
            raise UserError(f"gram_rows must be a positive integer, got {self.gram_rows}.")
