"""`NeuralTarget`: a causal language model's next-token distributions over a corpus.

    corpus → packed windows (W, L + 1) → seeded row plan → batches of B windows
      → teacher features at the sampled positions (n, d) → head logits (n, V)
      → ``ops.transform_rows``: target-space rows (n, V') and row statistics

Unit j is batch j of the plan (B windows). The logits are computed at the sampled positions
only, never for the whole window; the factor route takes the features instead of the rows
(``needs == "features"``) and the rows are then never written. With ``diagnostics`` every
layer's hidden states come from the same forward pass and feed the per-layer anisotropy sums
(:class:`~rankest.diagnostics.in_estimate.EstimateDiagnostics`), whose state joins checkpoints.
"""

from __future__ import annotations

import weakref
from typing import Any, Optional

import torch

from rankest import ops
from rankest.accumulate.base import Accumulator, Chunk
from rankest.accumulate.factor import Factor, centred_head_gram
from rankest.diagnostics.in_estimate import EstimateDiagnostics
from rankest.errors import UserError
from rankest.sources import teachers
from rankest.sources.corpus import windows_for
from rankest.sources.rows import iter_batches, plan_rows, rows_fingerprint, windows_needed
from rankest.targets.base import Target


# {teacher: (weight and bias identity, n_cols, G_W)}: the centred head Gram of each loaded teacher.
_HEAD_GRAMS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def head_gram(teacher, n_cols: int) -> torch.Tensor:
    """:func:`~rankest.accumulate.factor.centred_head_gram` of ``teacher``'s head, computed once
    per loaded teacher (V'·d² fp64 flops: 0.35 s for SmolLM2's 49,152 × 576 head on 2 cores, a
    third of a batch's forward) and recomputed when the head's tensors change (their storage or
    in-place version). (d', d') float64 on the head's device."""
    weight, bias = teacher.head()
    key = tuple((t.data_ptr(), t._version, tuple(t.shape)) for t in (weight, bias) if t is not None) + (int(n_cols),)
    hit = _HEAD_GRAMS.get(teacher)
    if hit is None or hit[0] != key:
        hit = (key, centred_head_gram(weight, bias, n_cols))
        _HEAD_GRAMS[teacher] = hit
    return hit[1]


def row_dtype_for(teacher, gram_precision: str) -> torch.dtype:
    """dtype of the target rows handed to the accumulators.

    fp64 teachers give fp64 rows (the exact-route tests); ``fast`` on a GPU gives bf16 rows, so
    the Gram/sketch products run on tensor cores with fp32 accumulation (an exact product of two
    bf16 numbers) and the fp64 carry; otherwise fp32 rows.
    """
    if teacher.dtype == torch.float64:
        return torch.float64
    if gram_precision == "fast" and teacher.device.type == "cuda":
        return torch.bfloat16
    return torch.float32


class NeuralTarget(Target):
    """A loaded teacher over packed windows and a row plan (module docstring).

    Parameters
    ----------
    teacher : rankest.sources.teachers.Teacher
    windows : (W, L + 1) int64 packed windows
    plan : rankest.sources.rows.RowPlan of the rows
    batch_size : int — windows per unit
    space : str — target space of the rows
    row_dtype : torch.dtype of the rows (:func:`row_dtype_for`)
    diagnostics : bool — also accumulate every layer's anisotropy on the same forward passes
    check_head : bool — check on the first windows that logits = head(features) (factor route)
    """

    unit = "tok"

    def __init__(self, teacher, windows: torch.Tensor, plan, *, batch_size: int, space: str, row_dtype: torch.dtype,
                 diagnostics: bool = False, check_head: bool = True) -> None:
        self.teacher, self.windows, self.plan = teacher, windows, plan
        self.batch_size, self.space, self.row_dtype = int(batch_size), space, row_dtype
        self.name, self.source = teacher.name, teacher.source
        self.n_cols, self.n_rows, self.device = teacher.n_cols, plan.n_rows, teacher.device
        self.n_units = -(-plan.windows.numel() // self.batch_size)
        self._rows_before = plan.rows_before()
        self.linear, self.linear_err = None, None
        self._first_features = None  # batch 0's features, from the forward that checked the head
        self.diagnostics = EstimateDiagnostics(teacher) if diagnostics else None
        if check_head:  # the first batch decides, before anything is accumulated
            first = next(iter_batches(windows, plan, self.batch_size))
            with torch.inference_mode():
                if self.diagnostics is None:  # one forward: batch 0's features and the check
                    self._first_features, self.linear, self.linear_err = teachers.features_with_head_check(
                        teacher, first.input_ids)
                else:  # batch 0 needs every layer's hidden states: check on a prefix
                    self.linear, self.linear_err = teachers.check_linear_head(teacher, first.input_ids.to(self.device))

    @classmethod
    def from_options(cls, cfg, *, device: str) -> "NeuralTarget":
        """Load ``cfg.teacher`` (a name, folder or loaded Teacher) and pack ``cfg.corpus`` into the
        windows and row plan of ``cfg`` (tokens, seq_len, positions, sample, seed, batch_size,
        space, gram_precision, diagnostics, and the loading options)."""
        teacher, docs = teachers.teacher_and_documents(cfg.teacher, cfg.corpus, revision=cfg.revision, device=device,
                                                       dtype=cfg.dtype, seq_len=cfg.seq_len, quiet=cfg.quiet,
                                                       device_map=cfg.device_map)
        windows = windows_for(cfg.corpus, docs, teacher.tokenizer, cfg.seq_len,
                              max_windows=windows_needed(cfg.tokens, cfg.seq_len, cfg.positions),
                              progress=not cfg.quiet)
        plan = plan_rows(len(windows), cfg.seq_len, positions=cfg.positions, tokens=cfg.tokens, seed=cfg.seed,
                         sample=cfg.sample)
        return cls(teacher, windows, plan, batch_size=cfg.batch_size, space=cfg.space,
                   row_dtype=row_dtype_for(teacher, cfg.gram_precision), diagnostics=cfg.diagnostics,
                   check_head=cfg.space == "clr")

    # ---- the plan ----------------------------------------------------------------------------
    def rows_before(self, j: int) -> int:
        return int(self._rows_before[min(j * self.batch_size, self.plan.windows.numel())])

    def derived(self) -> dict[str, Any]:
        return {"n_cols": self.n_cols, "teacher_dtype": str(self.teacher.dtype).replace("torch.", ""),
                "n_rows": self.n_rows, "rows_sha256": rows_fingerprint(self.windows, self.plan)}

    def head(self):
        return self.teacher.head()

    def accumulator(self, route: str, *, precision: str, space: str) -> Optional[Accumulator]:
        """The factor route's accumulator, with the teacher's head Gram computed once per loaded
        teacher (:func:`head_gram`); the generic one for the other routes."""
        if route != "factor":
            return None
        weight, bias = self.head()
        return Factor(weight, bias, self.n_cols, precision=precision, device=self.device,
                      g_w=head_gram(self.teacher, self.n_cols))

    def extra_accumulators(self) -> list[Accumulator]:
        return [] if self.diagnostics is None else [self.diagnostics.acc]

    # ---- rows --------------------------------------------------------------------------------
    def chunk(self, j: int, needs: str) -> Chunk:
        batch = next(iter_batches(self.windows, self.plan, self.batch_size, start=j * self.batch_size))
        teacher = self.teacher
        ids = batch.input_ids.to(teacher.device, non_blocking=True)
        mask = batch.mask.to(teacher.device)
        if j == 0 and self._first_features is not None:
            h_all, self._first_features = self._first_features, None
        elif self.diagnostics is None:
            h_all = teacher.features(ids)
        else:
            h_all = self.diagnostics.forward(ids, mask)
        h = h_all[mask]
        targets = batch.targets.to(teacher.device)[mask]
        write_rows = needs != "features"
        rows, stats = ops.transform_rows(teacher.logits(h), targets, teacher.n_cols, self.space, write_rows,
                                         self.row_dtype)
        if not bool(torch.isfinite(stats[:, 0]).all()):
            raise UserError(f"the teacher produced NaN/Inf logits in batch {j} (windows "
                            f"{batch.windows[:4].tolist()}…); try --dtype fp32 or check the model weights.")
        return Chunk(stats=stats, rows=rows if write_rows else None, features=h)

    # ---- results -----------------------------------------------------------------------------
    def meta(self) -> dict[str, Any]:
        t = self.teacher
        out = {"teacher": t.name, "teacher_source": t.source, "linear_head_check_rel_err": self.linear_err,
               "hidden_size": t.hidden_size, "logit_width": t.logit_width,
               "dtype": str(t.dtype).replace("torch.", ""), "device": str(t.device),
               "device_map": t.provenance()["device_map"]}
        if self.diagnostics is not None:
            out.update(self.diagnostics.summary())
        return out

    def write(self, out, *, config: dict, prov: dict) -> None:
        """The diagnostics' own files (anisotropy.*, head_spectrum.*) beside the results."""
        if self.diagnostics is not None:
            self.diagnostics.write(out, config=config, prov=prov)

