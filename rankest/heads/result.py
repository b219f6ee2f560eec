"""`HeadsResult`: the losses of a heads sweep, and heads.h5 / heads.json beside its report."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from rankest.io.files import to_json
from rankest.io.h5 import checked_dataset, mark, open_checked, write_h5
from rankest.io.results import write_text_atomic
from rankest.report.heads import write_heads_report

#: The format mark of heads.h5.
FORMAT = "rankest.heads"

#: Schema of heads.h5: 2 adds ``init_loss`` and the ``--family`` table (``families``, with the
#: datasets ``family_train_loss`` and ``family_w_error``); files of schema 1 are still read.
SCHEMA_VERSION = 2


# ---- results -----------------------------------------------------------------------------------
@dataclass
class HeadsResult:
    """Validation loss / accuracy of every rank-r head, the reference and the truncations.

    Lists are aligned with ``ranks`` (ascending; ``labels`` says which is ``full``). Losses are
    mean next-token cross-entropies in nats over the validation rows; perplexity = exp(loss).
    """

    ranks: list[int]
    labels: list[str]
    lr: list[float]
    val_loss: list[float]
    val_accuracy: list[float]
    val_perplexity: list[float]
    reference: dict[str, float]  # the teacher's own head on the validation rows
    truncation_loss: list[float]
    truncation_accuracy: list[float]
    head_w_error_weight: list[float]
    truncation_loss_feature: list[float]
    truncation_accuracy_feature: list[float]
    head_w_error_feature: list[float]
    w_error_weight_curve: np.ndarray  # (d,) W-error of W at every rank 1..d
    w_error_feature_curve: np.ndarray  # (d,) W-error of H·W_cᵀ at every rank 1..d
    train_loss: np.ndarray  # (steps, heads) mean training loss of each step's batch, before the step
    val_kl: Optional[list[float]] = None
    lr_search: Optional[dict] = None
    init_loss: Optional[list[float]] = None  # validation loss of every head at its init
    #: The --family table (rankest.heads.family_fit.family_table) with its arrays ``train_loss``
    #: (steps, family heads) and ``w_error`` (family heads, k): None without --family.
    families: Optional[dict] = None
    meta: dict = field(default_factory=dict)

    FAMILY_ARRAYS = ("train_loss", "w_error")

    KEYS = ("ranks", "labels", "lr", "val_loss", "val_accuracy", "val_perplexity", "val_kl", "reference",
            "truncation_loss", "truncation_accuracy", "head_w_error_weight", "truncation_loss_feature",
            "truncation_accuracy_feature", "head_w_error_feature", "lr_search", "init_loss")

    def summary(self) -> dict[str, Any]:
        """The JSON summary (heads.json)."""
        out = {k: getattr(self, k) for k in self.KEYS}
        if self.families is not None:
            out["families"] = {k: v for k, v in self.families.items() if k not in self.FAMILY_ARRAYS}
        out["final_train_loss"] = self.train_loss[-1].tolist() if len(self.train_loss) else None
        out.update({k: v for k, v in self.meta.items() if k not in ("config", "provenance")})
        out["config"] = self.meta.get("config")
        out["provenance"] = self.meta.get("provenance")
        return out

    def save(self, path) -> None:
        """heads.h5: arrays as datasets, the summary as a JSON attribute."""
        with write_h5(Path(path)) as f:
            mark(f, FORMAT, SCHEMA_VERSION)
            for k in ("ranks", "lr", "val_loss", "val_accuracy", "val_perplexity", "truncation_loss",
                      "truncation_accuracy", "head_w_error_weight", "truncation_loss_feature",
                      "truncation_accuracy_feature", "head_w_error_feature", "w_error_weight_curve",
                      "w_error_feature_curve", "train_loss"):
                checked_dataset(f, k, getattr(self, k))
            if self.val_kl is not None:
                checked_dataset(f, "val_kl", self.val_kl)
            for k in self.FAMILY_ARRAYS if self.families is not None else ():
                checked_dataset(f, f"family_{k}", np.asarray(self.families[k], dtype=np.float64))
            f.attrs["summary"] = to_json(self.summary())

    @classmethod
    def load(cls, path) -> "HeadsResult":
        """Read heads.h5; a missing, foreign, newer or damaged file is refused with a sentence."""
        with open_checked(path, fmt=FORMAT, version=SCHEMA_VERSION, what="rankest heads results file",
                          fix="give the heads.h5 of a finished heads run, or run `rankest heads` again") as f:
            s = json.loads(f.attrs["summary"])
            arrays = {k: np.asarray(f[k][...]) for k in ("w_error_weight_curve", "w_error_feature_curve",
                                                         "train_loss")}
            families = s.get("families")
            if families is not None:
                families = {**families, **{k: np.asarray(f[f"family_{k}"][...]) for k in cls.FAMILY_ARRAYS}}
        kw = {k: s.get(k) for k in cls.KEYS}
        meta = {k: v for k, v in s.items() if k not in cls.KEYS and k not in ("final_train_loss", "families")}
        return cls(**kw, **arrays, families=families, meta=meta)


def write_heads_run(out: Path, result: HeadsResult) -> dict:
    """heads.h5 + heads.json + the report (heads.md, and report.md when the folder has none)."""
    out = Path(out)
    result.save(out / "heads.h5")
    summary = result.summary()
    write_text_atomic(out / "heads.json", to_json(summary) + "\n")
    write_heads_report(out, result)
    return summary
