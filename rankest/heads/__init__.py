"""``heads``: rank-constrained linear heads W = A·B fitted on a frozen teacher's features.

The options (:mod:`~rankest.heads.config`), the sweep of every head on shared batches
(:mod:`~rankest.heads.sweep`), the truncations of the teacher's head
(:mod:`~rankest.heads.truncation`), evaluation (:mod:`~rankest.heads.evaluate`), features on
the fly or cached (:mod:`~rankest.heads.features`), the result file (:mod:`~rankest.heads.result`)
and the command's steps (:mod:`~rankest.heads.pipeline`).
"""

from rankest.heads.config import HeadsConfig
from rankest.heads.evaluate import evaluate_head, evaluate_heads
from rankest.heads.pipeline import run_heads
from rankest.heads.result import HeadsResult, write_heads_run
from rankest.heads.sweep import HeadSpec, HeadSweep, lr_factor, paper_lr, parse_ranks
from rankest.heads.truncation import feature_sqrt, feature_truncations, head_moments, weight_truncations

__all__ = ["HeadsConfig", "HeadsResult", "HeadSpec", "HeadSweep", "run_heads", "write_heads_run", "parse_ranks",
           "paper_lr", "lr_factor", "evaluate_head", "evaluate_heads", "feature_sqrt", "feature_truncations",
           "head_moments", "weight_truncations"]
