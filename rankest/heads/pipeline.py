"""`heads`: rank-constrained linear heads W = A·B fitted on a frozen teacher's final features.

    python -m rankest heads --ranks 8,32,128,full --steps 200 --init svd --out runs/heads
    python -m rankest heads --teacher pythia-1b --corpus wikitext-103 --tokens 2000000 \\
        --ranks 32,64,128,256,512,1024,2048,full --batch-size 64 --cache-features feats.h5 --out runs/p1b

What it measures (Godey, de la Clergerie & Sagot 2024, arXiv 2404.07647, §4.2, Fig. 6, 8, 9):
how much next-token loss a linear head of rank r costs on top of a frozen model. Every head
maps the teacher's final hidden state h (after its final norm, shape (d,)) to logits over the
V' real vocabulary columns: z = A_r (B_r h) (+ b), A_r: V'×r, B_r: r×d.

Data flow:
  corpus → packed windows → seeded split of windows into validation / training (no context of
  the validation split is ever trained on) → teacher features, computed once per batch under
  ``torch.inference_mode`` (or read from an HDF5 cache, ``cache_features``) → ONE optimiser
  step of EVERY head of the sweep on the same batch (the paper paid the teacher forward once per
  rank; here it is paid once for the whole sweep) → validation loss / accuracy / perplexity per
  head, beside the teacher's own head (reference row) and the zero-training truncations of the
  teacher's head (paper Fig. 8) → ``heads.h5``, ``heads.json``, report.

Two truncations of the teacher's head W (V'×d, real rows only) are evaluated at every rank of
the sweep, each with its W-error:

* weight space (the paper's Fig. 8): W_r = W·V_r·V_rᵀ from the SVD of W;
  ``head_w_error_weight`` = sqrt(Σ_{i>r} σ_i(W)²) / ‖W‖_F, loss ``truncation_loss``.
* feature metric (the ``svd`` init): the best rank-r approximation of the centred logit matrix
  H·W_cᵀ (W_c = W − 1·w̄ᵀ, columns centred over V'; softmax ignores the per-row shift h·w̄).
  With the fp64 feature Gram G = HᵀH = L·Lᵀ (L from eigh with its eigenvalues floored at
  d·eps·λ_max, never Cholesky: a LayerNorm or fewer rows than d leave H rank-deficient),
  ‖H·W_cᵀ − H·W_rᵀ‖_F = ‖(W_c − W_r)·L‖_F, so W_r = [W_c·L]_r · L⁻¹ with
  [·]_r the truncated SVD (Eckart–Young in the metric of G). ``head_w_error_feature`` =
  sqrt(Σ_{i>r} s_i²)/sqrt(Σ s_i²), s = σ(W_c·L) — the W-error of the teacher's ``clr`` matrix on
  these rows (the factor route of ``estimate``); loss ``truncation_loss_feature``.
G is accumulated over the first training rows (``gram_rows``), never the validation split.

A head bias, when the teacher has one, is kept as a full-length trainable vector beside A·B
(initialised to the teacher's for ``svd``) and untouched by the truncations.

Long runs (issue 8): ``--checkpoint-every STEPS`` / SIGINT / SIGTERM write DIR/checkpoint.h5
(:mod:`rankest.checkpoint`: every head, AdamW's states, the step, the LRs, RNG states, config)
and ``--resume`` continues bit for bit; under ``torchrun`` each process trains on a disjoint
shard of every batch with the heads' gradients all-reduced before each step
(:mod:`rankest.distributed`), so the result does not depend on the number of processes.

    python -m rankest heads --out runs/heads --checkpoint-every 100 [--resume]
    torchrun --nproc_per_node=2 -m rankest heads --device cpu --out runs/heads
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from rankest.io.checkpoint import check_checkpoint_options
from rankest.sources.corpus import corpus_name
from rankest.errors import UserError

INITS = ("normal", "scaled", "svd")
OBJECTIVES = ("ce", "kl")
#: Validation rows below which loss and accuracy are too noisy to report.
MIN_VAL_ROWS = 100
#: Multipliers of the rank's default LR tried by ``lr_search``.
LR_SEARCH_FACTORS = (0.5, 1.0, 2.0)
#: Elements of one logit chunk (rows × V'): bounds memory per head independently of the batch.
CHUNK_ELEMENTS = 1 << 23
#: Format tag of the feature cache.
CACHE_FORMAT = "rankest.features"
CACHE_VERSION = 1


# ---- ranks and learning rates --------------------------------------------------------------
def parse_ranks(spec: Union[str, int, Sequence[Union[int, str]]], full: int) -> tuple[list[int], list[str]]:
    """``"32,64,full"`` → ranks ``[32, 64, full]`` and labels ``["32", "64", "full"]``.

    Parameters
    ----------
    spec : str, int or sequence
        Comma-separated positive integers and ``full``.
    full : int
        min(d, V'): the largest rank a head of this teacher can have.

    Ranks above ``full`` become ``full`` with a warning; duplicates are dropped; the result is
    ascending. Ranks ≤ 0 or non-numeric entries raise :class:`UserError`.
    """
    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s).strip() for s in
                                                                                  ([spec] if isinstance(spec, int)
                                                                                   else spec)]
    if not items or all(not s for s in items):
        raise UserError("--ranks is empty; give comma-separated positive integers and/or full, e.g. 32,64,full.")
    ranks: set[int] = set()
    capped = []
    for s in items:
        if s.lower() == "full":
            ranks.add(full)
            continue
        try:
            r = int(s)
        except ValueError:
            raise UserError(f"--ranks entry {s!r} is not a positive integer or 'full'; "
                            f"use e.g. --ranks 32,64,128,full.") from None
        if r <= 0:
            raise UserError(f"--ranks entry {r} is not positive; a head needs rank ≥ 1 (use e.g. 32,64,full).")
        if r > full:
            capped.append(r)
            r = full
        ranks.add(r)
    if capped:
        warnings.warn(f"ranks {', '.join(map(str, capped))} exceed min(d, V') = {full}: "
                      f"trained as the full-rank head instead", stacklevel=2)
    out = sorted(ranks)
    return out, [("full" if r == full else str(r)) for r in out]


def paper_lr(rank: int) -> float:
    """Peak LR by rank from the paper's Fig. 9 (Pythia-410M): r ≤ 32: 2e-2; ≤ 256: 1e-2;
    ≤ 512: 7e-3; ≤ 1024: 5e-3; above: 2e-3 (the paper lists ≥ 1536; ranks in between take the
    lower value)."""
    if rank <= 32:
        return 2e-2
    if rank <= 256:
        return 1e-2
    if rank <= 512:
        return 7e-3
    if rank <= 1024:
        return 5e-3
    return 2e-3


def lr_factor(step: int, steps: int, *, warmup_frac: float = 0.01, min_ratio: float = 0.1) -> float:
    """Pythia's schedule as a multiplier of the peak LR at optimiser step ``step`` (0-based):
    linear warm-up over max(1, ⌈1% of steps⌉) steps, then cosine decay to ``min_ratio`` (Pythia's
    min_lr = 10% of lr) at the last step."""
    warm = max(1, math.ceil(warmup_frac * steps))
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, steps - 1 - warm)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _head_seed(seed: int, rank: int) -> int:
    """Init seed of the rank-r head: a function of (seed, r) only, so a head starts the same in a
    sweep and alone."""
    return (int(seed) * 1_000_003 + int(rank) * 7919) % (2**63 - 1)


# ---- truncations of the teacher's head -------------------------------------------------------
def feature_sqrt(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """L (d×d) with L·Lᵀ = G (floored) and its inverse L⁻¹, from eigh in fp64.

    Eigenvalues below τ = d·eps·λ_max are raised to τ. Directions the metric rows do not span
    (fewer rows than d, or a LayerNorm with β = 0 leaving H of rank d − 1, ARCHITECTURE.md) then
    weigh ≈ 1e-13 of the rest: every truncation below the span's rank is the feature-metric one to
    that precision, they come last, and the full-rank head is W_c itself — new rows with a
    component outside the span keep the teacher's logits.
    """
    g = gram.double()
    g = 0.5 * (g + g.T)
    evals, q = torch.linalg.eigh(g)
    top = evals.max()
    if not bool(top > 0):  # no features at all: the Euclidean metric
        top = torch.ones((), dtype=g.dtype, device=g.device)
    root = evals.clamp_min(top * g.shape[0] * torch.finfo(torch.float64).eps).sqrt()
    return q * root, (q / root).T


def head_gram(weight: torch.Tensor, *, block: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """WᵀW (d×d, fp64) and the column mean w̄ (d,) of a head, over blocks of rows.

    Products in fp64 for an fp64 head, else fp32 blocks summed in fp64 (the Gram route's
    precision: singular values below ≈ 1e-3·σ_1 lose relative accuracy, which moves a W-error by
    far less than it shows). One V'×d×d product serves both truncations.
    """
    work = torch.float64 if weight.dtype == torch.float64 else torch.float32
    d = weight.shape[1]
    wtw = torch.zeros(d, d, dtype=torch.float64, device=weight.device)
    total = torch.zeros(d, dtype=torch.float64, device=weight.device)
    for lo in range(0, weight.shape[0], block):
        c = weight[lo:lo + block].to(work)
        wtw += (c.T @ c).double()
        total += c.double().sum(0)
    return 0.5 * (wtw + wtw.T), total / weight.shape[0]


def feature_truncations(weight: torch.Tensor, gram: torch.Tensor, ranks: Sequence[int], *,
                        gram_w: Optional[tuple[torch.Tensor, torch.Tensor]] = None
                        ) -> tuple[dict[int, tuple[torch.Tensor, torch.Tensor]], np.ndarray]:
    """Best rank-r heads of the centred head W_c in the feature metric, as factors (A, B).

    Parameters
    ----------
    weight : (V', d) the teacher's head on the real columns.
    gram : (d, d) the feature Gram HᵀH (or its mean over rows) of the metric rows, fp64.
    ranks : the ranks wanted.
    gram_w : :func:`head_gram` of ``weight``, when already computed.

    Returns
    -------
    factors : {r: (A (V'×r), B (r×d))} with A·B = [W_c·L]_r·L⁻¹ (the Eckart–Young truncation in the
        metric of G), balanced: with M = W_c·L = U·S·Vᵀ, A = M·V_r·S_r^{-1/2} = W_c·(L·V_r·S_r^{-1/2})
        and B = S_r^{1/2}·V_rᵀ·L⁻¹. Column i of A (row i of B) does not depend on r, so one V'×d×r_max
        product makes every rank. A in fp64 for an fp64 head, else fp32; B in fp64.
    w_error : (d,) float64, w_error[i-1] = W-error of the logit matrix H·W_cᵀ at rank i.
    """
    work = torch.float64 if weight.dtype == torch.float64 else torch.float32
    wtw, mean = gram_w if gram_w is not None else head_gram(weight)
    wcwc = wtw - weight.shape[0] * torch.outer(mean, mean)  # W_cᵀW_c without forming W_c
    L, Lp = feature_sqrt(gram.to(wtw.device))
    s2, v = torch.linalg.eigh(L.T @ wcwc @ L)  # MᵀM (k×k): right singular vectors of M, ascending
    s2, v = s2.flip(0).clamp_min(0), v.flip(1)
    w_err = _suffix_w_error(s2.cpu().numpy(), weight.shape[1])
    s = s2.sqrt()
    r_max = min(max(ranks), s.numel())
    sk = s[:r_max]
    inv = torch.where(sk > 0, sk.clamp_min(1e-300).rsqrt(), torch.zeros_like(sk))
    c = (L @ v[:, :r_max]) * inv  # (d, r_max)
    a_all = (weight.to(work) - mean.to(work)) @ c.to(work)  # W_c·C, columns M·v_i / sqrt(s_i)
    b_all = sk.sqrt()[:, None] * (v[:, :r_max].T @ Lp)
    return {r: _pad(a_all, b_all, r) for r in ranks}, w_err


def _pad(a_all: torch.Tensor, b_all: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first r factor columns / rows; zeros past the rank of the metric (nothing to carry)."""
    k = min(r, a_all.shape[1])
    a, b = a_all[:, :k], b_all[:k]
    if k < r:
        a = torch.cat([a, a.new_zeros(a.shape[0], r - k)], 1)
        b = torch.cat([b, b.new_zeros(r - k, b.shape[1])], 0)
    return a, b


def weight_truncations(weight: torch.Tensor, ranks: Sequence[int], *,
                       gram_w: Optional[tuple[torch.Tensor, torch.Tensor]] = None
                       ) -> tuple[dict[int, tuple[torch.Tensor, torch.Tensor]], np.ndarray]:
    """Rank-r truncations of the head matrix W itself (the paper's Fig. 8), as factors.

    Returns {r: (W·V_r (V'×r), V_rᵀ (r×d))} (V = right singular vectors of W, from eigh of the
    fp64 WᵀW; A in W's working precision as in :func:`feature_truncations`) and w_error (d,):
    sqrt(Σ_{i>r} σ_i²)/‖W‖_F.
    """
    work = torch.float64 if weight.dtype == torch.float64 else torch.float32
    wtw, _ = gram_w if gram_w is not None else head_gram(weight)
    s2, v = torch.linalg.eigh(wtw)
    s2, v = s2.flip(0).clamp_min(0), v.flip(1)
    w_err = _suffix_w_error(s2.cpu().numpy(), weight.shape[1])
    r_max = max(ranks)
    a_all = weight.to(work) @ v[:, :r_max].to(work)
    return {r: _pad(a_all, v[:, :r_max].T, r) for r in ranks}, w_err


def _suffix_w_error(s2: np.ndarray, d: int) -> np.ndarray:
    """W-error(i) for i = 1..d from squared singular values (zeros beyond their count)."""
    s2 = np.concatenate([np.asarray(s2, dtype=np.float64), np.zeros(max(0, d - len(s2)))])[:d]
    total = s2.sum()
    tail = np.concatenate([np.cumsum(s2[::-1])[::-1][1:], [0.0]])
    return np.sqrt(np.clip(tail, 0, None) / total) if total > 0 else np.zeros(d)


# ---- evaluation ------------------------------------------------------------------------------
def _chunk_rows(n_cols: int) -> int:
    return max(16, CHUNK_ELEMENTS // max(1, n_cols))


def _logits(h: torch.Tensor, a: torch.Tensor, b: Optional[torch.Tensor], bias: Optional[torch.Tensor]) -> torch.Tensor:
    """(n, d) features → (n, V') logits of the head A·B (+ bias); b None means A is the full (V'×d) W."""
    z = h @ a.T if b is None else (h @ b.T) @ a.T
    return z if bias is None else z + bias


@torch.no_grad()
def evaluate_head(h: torch.Tensor, targets: torch.Tensor, a: torch.Tensor, b: Optional[torch.Tensor] = None,
                  bias: Optional[torch.Tensor] = None, *, teacher_weight: Optional[torch.Tensor] = None,
                  teacher_bias: Optional[torch.Tensor] = None) -> dict[str, float]:
    """Mean next-token cross-entropy (nats), top-1 accuracy (and KL to the teacher when its head is
    given) of a head over rows, computed in chunks of rows so memory stays O(chunk × V').

    h : (n, d) features; targets : (n,) int64 in [0, V'); a : (V', r) and b : (r, d), or a : (V', d)
    and b None for a dense head; bias : (V',) or None. Arithmetic in a's dtype.
    """
    sums = _eval_sums(h, targets, a, b, bias, teacher_weight=teacher_weight, teacher_bias=teacher_bias)
    return _eval_means(sums, h.shape[0], kl=teacher_weight is not None)


@torch.no_grad()
def _eval_sums(h: torch.Tensor, targets: torch.Tensor, a: torch.Tensor, b: Optional[torch.Tensor] = None,
               bias: Optional[torch.Tensor] = None, *, teacher_weight: Optional[torch.Tensor] = None,
               teacher_bias: Optional[torch.Tensor] = None) -> np.ndarray:
    """[Σ cross-entropy, Σ correct, Σ KL] over the rows (zeros for no rows): the sums that
    :func:`evaluate_head` divides, and that the processes of a torchrun job add up first."""
    dt = a.dtype
    step = _chunk_rows(a.shape[0])
    ce = correct = kl = 0.0
    for lo in range(0, h.shape[0], step):
        hc = h[lo:lo + step].to(dt)
        tc = targets[lo:lo + step].to(a.device)
        z = _logits(hc, a, b, bias)
        logq = torch.log_softmax(z, dim=-1)
        ce += float(-logq.gather(1, tc[:, None]).sum())
        correct += float((z.argmax(dim=-1) == tc).sum())
        if teacher_weight is not None:
            logp = torch.log_softmax(_logits(hc, teacher_weight.to(dt), None, teacher_bias), dim=-1)
            kl += float(F.kl_div(logq, logp, log_target=True, reduction="sum"))
    return np.array([ce, correct, kl])


def _eval_means(sums: np.ndarray, n: int, *, kl: bool) -> dict[str, float]:
    out = {"loss": float(sums[0]) / n, "accuracy": float(sums[1]) / n}
    if kl:
        out["kl"] = float(sums[2]) / n
    return out


def evaluate_heads(heads: Sequence[tuple], h: torch.Tensor, targets: torch.Tensor, *, world=None,
                   n_rows: Optional[int] = None, teacher_weight: Optional[torch.Tensor] = None,
                   teacher_bias: Optional[torch.Tensor] = None) -> list[dict[str, float]]:
    """:func:`evaluate_head` of several heads ``(a, b, bias)`` on this process's rows; under
    torchrun (``world`` active) the sums of every process are added (one all-reduce) and divided
    by ``n_rows``, the global row count, so every process gets the global means."""
    from rankest.runtime import distributed

    sums = np.array([_eval_sums(h, targets, *head, teacher_weight=teacher_weight, teacher_bias=teacher_bias)
                     for head in heads]).reshape(len(heads), 3)
    if world is not None:
        sums = distributed.all_sum(world, sums)
    n = h.shape[0] if n_rows is None else int(n_rows)
    return [_eval_means(s, n, kl=teacher_weight is not None) for s in sums]


# ---- the sweep: every head, one optimiser step per shared batch ------------------------------
@dataclass
class HeadSpec:
    """One head of a sweep: rank, peak LR and label (``"32"``, ``"full"``)."""

    rank: int
    lr: float
    label: str


class HeadSweep:
    """Heads W_i = A_i·B_i (+ b_i) of different ranks trained side by side on shared batches.

    Each head has its own parameters and AdamW param group (its own LR; AdamW is elementwise,
    so one optimiser over all heads equals one optimiser per head). :meth:`step` walks the batch
    in row chunks — outer loop over chunks, inner over heads — so the features (and, for
    ``kl``, the teacher's log-probs) of a chunk are read once for all heads and memory is one
    chunk's logits, whatever the batch. Shapes differ by rank, so each head is its own pair of
    GEMMs (n×r×d, n×r×V'), the size of work a single-rank run does too.

    Parameters
    ----------
    specs : heads to train.
    n_cols, d : V' and the feature width.
    init : ``normal`` (N(0,1) coefficients, the paper's), ``scaled`` (A ~ N(0, 1/r),
        B ~ N(0, 1/d): logits of the features' scale) or ``svd`` (``svd_factors`` below).
    steps : total optimiser steps (the LR schedule's length).
    svd_factors : {rank: (A, B)} for ``svd``.
    bias : the teacher's head bias over V' (or None: heads have no bias).
    world : a torchrun job (:mod:`rankest.distributed`): each process steps on its shard of the
        batch's rows, and the gradients are summed over the processes before every AdamW step.
    """

    def __init__(self, specs: Sequence[HeadSpec], *, n_cols: int, d: int, init: str, seed: int, steps: int,
                 device: torch.device, dtype: torch.dtype = torch.float32, svd_factors: Optional[dict] = None,
                 bias: Optional[torch.Tensor] = None, objective: str = "ce", weight_decay: float = 0.01,
                 betas: tuple[float, float] = (0.9, 0.95), world=None) -> None:
        self.specs = list(specs)
        self.world = world
        self.objective = objective
        self.steps = int(steps)
        self.n_cols = n_cols
        self.A: list[torch.nn.Parameter] = []
        self.B: list[torch.nn.Parameter] = []
        self.b: list[Optional[torch.nn.Parameter]] = []
        groups = []
        for spec in self.specs:
            r = spec.rank
            if init == "svd":
                a, b = svd_factors[r]
            else:
                gen = torch.Generator().manual_seed(_head_seed(seed, r))
                sa, sb = (1.0, 1.0) if init == "normal" else (r ** -0.5, d ** -0.5)
                a = torch.randn(n_cols, r, generator=gen, dtype=torch.float64) * sa
                b = torch.randn(r, d, generator=gen, dtype=torch.float64) * sb
            # Copies: the same svd factors may start several heads (the LR search).
            pa = torch.nn.Parameter(a.to(device=device, dtype=dtype).clone(memory_format=torch.contiguous_format))
            pb = torch.nn.Parameter(b.to(device=device, dtype=dtype).clone(memory_format=torch.contiguous_format))
            pbias = None
            if bias is not None:
                start = bias if init == "svd" else torch.zeros_like(bias)
                pbias = torch.nn.Parameter(start.to(device=device, dtype=dtype).clone())
            self.A.append(pa)
            self.B.append(pb)
            self.b.append(pbias)
            groups.append({"params": [pa, pb], "lr": spec.lr, "weight_decay": weight_decay})
            if pbias is not None:  # no decay on biases (GPT-NeoX convention)
                groups.append({"params": [pbias], "lr": spec.lr, "weight_decay": 0.0})
        self.optimizer = torch.optim.AdamW(groups, betas=betas, weight_decay=weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, self.steps))
        self.dtype = dtype

    def state_bytes(self) -> int:
        """Parameters + gradients + AdamW's two moments, in bytes."""
        n = sum(p.numel() for p in self.A + self.B) + sum(p.numel() for p in self.b if p is not None)
        return 4 * n * torch.finfo(self.dtype).bits // 8

    def params(self) -> list[torch.nn.Parameter]:
        """Every parameter, in the optimiser's order (the checkpoint's and the all-reduce's order)."""
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def step(self, h: torch.Tensor, targets: torch.Tensor, teacher_weight: Optional[torch.Tensor] = None,
             teacher_bias: Optional[torch.Tensor] = None, *, n_rows: Optional[int] = None) -> np.ndarray:
        """One optimiser step of every head on the rows (h (n, d), targets (n,)); returns each
        head's mean training loss on them (before the step).

        Under torchrun, ``h`` is this process's shard of the batch and ``n_rows`` the batch's
        global row count: each shard's summed loss is divided by it and the gradients are
        all-reduced (summed), so every process takes the step of the global mean loss."""
        n = h.shape[0] if n_rows is None else int(n_rows)
        chunk = _chunk_rows(self.n_cols)
        losses = np.zeros(len(self.specs))
        self.optimizer.zero_grad(set_to_none=True)
        for lo in range(0, n, chunk):
            hc = h[lo:lo + chunk].to(self.dtype)
            tc = targets[lo:lo + chunk]
            logp = None
            if self.objective == "kl":
                with torch.no_grad():
                    logp = torch.log_softmax(_logits(hc, teacher_weight.to(self.dtype), None, teacher_bias), -1)
            for i in range(len(self.specs)):
                z = _logits(hc, self.A[i], self.B[i], self.b[i])
                if logp is None:
                    loss = F.cross_entropy(z, tc, reduction="sum")
                else:
                    loss = F.kl_div(torch.log_softmax(z, -1), logp, log_target=True, reduction="sum")
                (loss / n).backward()
                losses[i] += float(loss.detach()) / n
        if self.world is not None and self.world.active:
            from rankest.runtime import distributed

            params = self.params()
            for p in params:  # a process without rows this step still joins the sum (with zeros)
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            distributed.all_sum_(self.world, [p.grad for p in params])
            losses = distributed.all_sum(self.world, losses)
        self.optimizer.step()
        self.scheduler.step()
        return losses

    def evaluate(self, h: torch.Tensor, targets: torch.Tensor, *, n_rows: Optional[int] = None,
                 **teacher) -> list[dict[str, float]]:
        """Every head on the rows (this process's shard under torchrun; ``n_rows`` the global count)."""
        heads = [(self.A[i].detach(), self.B[i].detach(), None if self.b[i] is None else self.b[i].detach())
                 for i in range(len(self.specs))]
        return evaluate_heads(heads, h, targets, world=self.world, n_rows=n_rows, **teacher)

    # ---- checkpoints: the whole training state as arrays, restored bit for bit ------------------
    def state(self) -> dict[str, np.ndarray]:
        """Parameters (``p{j}``), AdamW's moments and step counts (``exp_avg{j}``, ``exp_avg_sq{j}``,
        ``adam_step{j}``) of parameter j in :meth:`params` order, and the scheduler's step."""
        out: dict[str, np.ndarray] = {"scheduler_step": np.asarray(self.scheduler.last_epoch, dtype=np.int64)}
        for j, p in enumerate(self.params()):
            out[f"p{j}"] = p.detach().cpu().numpy().copy()
            st = self.optimizer.state.get(p, {})
            for key, name in (("exp_avg", "exp_avg"), ("exp_avg_sq", "exp_avg_sq"), ("step", "adam_step")):
                if key in st:
                    out[f"{name}{j}"] = torch.as_tensor(st[key]).detach().cpu().numpy().copy()
        return out

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        """Restore :meth:`state` into a sweep built with the same specs: the next :meth:`step`
        is the one the saved sweep would have taken (same parameters, moments and LR)."""
        params = self.params()
        if sum(1 for k in state if k.startswith("p") and k[1:].isdigit()) != len(params):
            raise UserError("the checkpoint holds another set of heads than this run builds; delete it and start afresh.")
        # AdamW keeps its step count as a CPU scalar tensor, on the parameter's device when fused/capturable.
        on_device = {id(p): bool(g.get("fused") or g.get("capturable"))
                     for g in self.optimizer.param_groups for p in g["params"]}
        with torch.no_grad():
            for j, p in enumerate(params):
                p.copy_(torch.from_numpy(np.asarray(state[f"p{j}"])).to(p.device, p.dtype))
                if f"exp_avg{j}" in state:
                    self.optimizer.state[p] = {
                        "step": torch.from_numpy(np.array(state[f"adam_step{j}"])).to(
                            p.device if on_device[id(p)] else "cpu"),
                        "exp_avg": torch.from_numpy(np.array(state[f"exp_avg{j}"])).to(p.device, p.dtype),
                        "exp_avg_sq": torch.from_numpy(np.array(state[f"exp_avg_sq{j}"])).to(p.device, p.dtype)}
        # The LR LambdaLR would have set after that many steps: base_lr · factor(step), as it computes it.
        s = int(state["scheduler_step"])
        self.scheduler.last_epoch = s
        for g, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            g["lr"] = base * lr_factor(s, self.steps)
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]


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


# ---- features: on the fly or from the HDF5 cache -------------------------------------------
@dataclass
class _Split:
    """Rows of one split: packed windows, their plan, and the batch boundaries in rows."""

    windows: torch.Tensor
    plan: Any
    batch_size: int

    @property
    def n_batches(self) -> int:
        return math.ceil(self.plan.windows.numel() / self.batch_size)

    def offsets(self) -> np.ndarray:
        """(n_batches + 1,) first row of every batch, in plan order."""
        before = self.plan.rows_before().numpy()
        idx = np.minimum(np.arange(self.n_batches + 1) * self.batch_size, len(before) - 1)
        return before[idx]

    def batch(self, k: int):
        from rankest.sources.corpus import Batch

        lo = k * self.batch_size
        idx = self.plan.windows[lo:lo + self.batch_size]
        block = self.windows[idx]
        return Batch(block[:, :-1], block[:, 1:], self.plan.positions[lo:lo + self.batch_size], idx, lo)


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's vocabulary (token → id): features from another tokenizer are refused."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()


def _teacher_features(teacher, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, d) features (a normal tensor, usable by autograd) and (rows,) targets of a batch."""
    with torch.inference_mode():
        ids = batch.input_ids.to(teacher.device, non_blocking=True)
        mask = batch.mask.to(teacher.device)
        h = teacher.features(ids)[mask]
        t = batch.targets.to(teacher.device)[mask]
    return h.clone(), t.clone()  # clone outside inference mode: inference tensors cannot enter autograd


def _shard(n: int, world) -> tuple[int, int]:
    """This process's contiguous part [lo, hi) of n items (all of them for one process)."""
    if world is None or not world.active:
        return 0, n
    return n * world.rank // world.size, n * (world.rank + 1) // world.size


class _Source:
    """The training or validation rows, batch by batch: from the teacher, or from the cache.

    With ``world`` (a torchrun job), :meth:`batch` gives this process's disjoint shard of the
    batch — a contiguous part of its windows (on the fly: the teacher runs on those only) or of
    its cached rows — while ``offsets`` and :meth:`rows` stay global, so the batches and the
    global means never depend on the number of processes."""

    def __init__(self, split: _Split, teacher=None, cache: Optional[tuple] = None, world=None):
        self.split, self.teacher, self.cache, self.world = split, teacher, cache, world
        self.offsets = split.offsets() if cache is None else cache[2]
        self.n_batches = len(self.offsets) - 1
        self.memo: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.seconds = 0.0  # time spent producing features

    def batch(self, k: int, keep: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        if k in self.memo:
            return self.memo[k] if keep else self.memo.pop(k)
        t0 = time.perf_counter()
        if self.cache is None:
            batch = self.split.batch(k)
            if self.world is not None and self.world.active:
                a, b = _shard(batch.windows.numel(), self.world)
                batch = type(batch)(batch.input_ids[a:b], batch.targets[a:b], batch.mask[a:b], batch.windows[a:b],
                                    batch.start + a)
            if batch.windows.numel() == 0:  # more processes than windows in this batch: no rows here
                t = self.teacher
                out = (torch.zeros(0, t.hidden_size, dtype=t.dtype, device=t.device),
                       torch.zeros(0, dtype=torch.long, device=t.device))
            else:
                out = _teacher_features(self.teacher, batch)
        else:
            feats, targs, offsets, device = self.cache
            lo, hi = int(offsets[k]), int(offsets[k + 1])
            a, b = _shard(hi - lo, self.world)
            lo, hi = lo + a, lo + b
            out = (torch.from_numpy(feats[lo:hi]).to(device), torch.from_numpy(targs[lo:hi]).to(device))
        if self.teacher is not None and self.teacher.device.type == "cuda":
            torch.cuda.synchronize(self.teacher.device)
        self.seconds += time.perf_counter() - t0
        if keep:
            self.memo[k] = out
        return out

    def rows(self, k: int) -> int:
        """Global row count of batch k (over every process)."""
        return int(self.offsets[k + 1] - self.offsets[k])

    def all_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [self.batch(k) for k in range(self.n_batches)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _cache_attrs(cfg: HeadsConfig, teacher, corpus_name: str) -> dict[str, Any]:
    return {"teacher": teacher.name, "teacher_source": teacher.source, "revision": str(cfg.revision),
            "hidden_size": teacher.hidden_size, "n_cols": teacher.n_cols,
            "tokenizer": tokenizer_fingerprint(teacher.tokenizer), "teacher_dtype": str(teacher.dtype),
            "corpus": corpus_name, "seq_len": cfg.seq_len, "positions": cfg.positions, "sample": cfg.sample,
            "tokens": -1 if cfg.tokens is None else int(cfg.tokens), "val_tokens": int(cfg.val_tokens),
            "seed": cfg.seed, "batch_size": cfg.batch_size}


_IDENTITY_KEYS = ("teacher", "revision", "hidden_size", "n_cols", "tokenizer")


def _check_cache(path: Path, want: dict[str, Any]) -> None:
    """Refuse a cache written for another teacher or tokenizer, or for other rows."""
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise UserError(f"--cache-features {path} is not a readable HDF5 file ({e}); delete it or choose "
                        f"another path.") from e
    with f:
        if f.attrs.get("format") != CACHE_FORMAT:
            raise UserError(f"--cache-features {path} is not a rankest feature cache; choose another path.")
        have = {k: f.attrs[k] for k in want if k in f.attrs}
    have = {k: (v.item() if hasattr(v, "item") else v) for k, v in have.items()}
    for key in _IDENTITY_KEYS:
        if str(have.get(key)) != str(want[key]):
            what = "tokenizer" if key == "tokenizer" else ("teacher" if key in ("teacher", "revision") else key)
            raise UserError(f"the feature cache {path} was written for a different {what} "
                            f"({key} = {have.get(key)!s:.40} there, {want[key]!s:.40} here); delete it or pass "
                            f"another --cache-features path.")
    diff = [k for k in want if k not in _IDENTITY_KEYS and k != "teacher_source" and str(have.get(k)) != str(want[k])]
    if diff:
        raise UserError(f"the feature cache {path} holds other rows ({', '.join(f'{k} = {have.get(k)} there, {want[k]} here' for k in diff)}); "
                        f"delete it, pass another --cache-features path, or rerun with the same options.")


def _write_cache(path: Path, attrs: dict, train: _Source, val: _Source, quiet: bool) -> None:
    """One pass of the teacher over both splits into an HDF5 file (fp32 features, fp64 for an fp64
    teacher; int64 targets; the row offsets of every batch, so the cached batches are the same)."""
    import h5py
    from tqdm.auto import tqdm

    from rankest.io.results import atomic_path

    n_train, n_val = int(train.offsets[-1]), int(val.offsets[-1])
    d = attrs["hidden_size"]
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            for k, v in attrs.items():
                f.attrs[k] = v
            f.attrs["format"] = CACHE_FORMAT
            f.attrs["version"] = CACHE_VERSION
            bar = tqdm(total=n_train + n_val, unit="tok", unit_scale=True, desc="caching features", disable=quiet)
            for name, src, n in (("train", train, n_train), ("val", val, n_val)):
                # fp32 holds bf16/fp16/fp32 features exactly; an fp64 teacher keeps fp64.
                fdt = "f8" if attrs["teacher_dtype"] == str(torch.float64) else "f4"
                fd = f.create_dataset(f"{name}_features", (n, d), dtype=fdt, chunks=(min(n, 1024), d))
                td = f.create_dataset(f"{name}_targets", (n,), dtype="i8")
                f.create_dataset(f"{name}_offsets", data=src.offsets.astype(np.int64))
                for k in range(src.n_batches):
                    h, t = src.batch(k)
                    lo, hi = int(src.offsets[k]), int(src.offsets[k + 1])
                    fd[lo:hi] = h.to(torch.float64 if fdt == "f8" else torch.float32).cpu().numpy()
                    td[lo:hi] = t.cpu().numpy()
                    bar.update(hi - lo)
            bar.close()


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
    meta: dict = field(default_factory=dict)

    KEYS = ("ranks", "labels", "lr", "val_loss", "val_accuracy", "val_perplexity", "val_kl", "reference",
            "truncation_loss", "truncation_accuracy", "head_w_error_weight", "truncation_loss_feature",
            "truncation_accuracy_feature", "head_w_error_feature", "lr_search")

    def summary(self) -> dict[str, Any]:
        """The JSON summary (heads.json)."""
        out = {k: getattr(self, k) for k in self.KEYS}
        out["final_train_loss"] = self.train_loss[-1].tolist() if len(self.train_loss) else None
        out.update({k: v for k, v in self.meta.items() if k not in ("config", "provenance")})
        out["config"] = self.meta.get("config")
        out["provenance"] = self.meta.get("provenance")
        return out

    def save(self, path) -> None:
        """heads.h5: arrays as datasets, the summary as a JSON attribute."""
        import h5py

        from rankest.io.results import SCHEMA_VERSION, atomic_path
        from rankest.spectrum import to_json

        with atomic_path(Path(path)) as tmp:
            with h5py.File(tmp, "w") as f:
                f.attrs["format"] = "rankest.heads"
                f.attrs["schema_version"] = SCHEMA_VERSION
                for k in ("ranks", "lr", "val_loss", "val_accuracy", "val_perplexity", "truncation_loss",
                          "truncation_accuracy", "head_w_error_weight", "truncation_loss_feature",
                          "truncation_accuracy_feature", "head_w_error_feature", "w_error_weight_curve",
                          "w_error_feature_curve", "train_loss"):
                    f.create_dataset(k, data=np.asarray(getattr(self, k)))
                if self.val_kl is not None:
                    f.create_dataset("val_kl", data=np.asarray(self.val_kl))
                f.attrs["summary"] = to_json(self.summary())

    @classmethod
    def load(cls, path) -> "HeadsResult":
        import h5py

        path = Path(path)
        if not path.is_file():
            raise UserError(f"no heads results file at {path}.")
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") != "rankest.heads":
                raise UserError(f"{path} is not a rankest heads file.")
            s = json.loads(f.attrs["summary"])
            arrays = {k: np.asarray(f[k][...]) for k in ("w_error_weight_curve", "w_error_feature_curve",
                                                         "train_loss")}
        kw = {k: s.get(k) for k in cls.KEYS}
        meta = {k: v for k, v in s.items() if k not in cls.KEYS and k != "final_train_loss"}
        return cls(**kw, **arrays, meta=meta)


# ---- the pipeline --------------------------------------------------------------------------------
def _split_windows(n_windows: int, cfg: HeadsConfig, per_window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded split of the packed windows into (validation, training) indices: whole windows,
    so no validation context is ever a training row."""
    n_val_w = math.ceil(int(cfg.val_tokens) / per_window)
    n_val_rows = min(int(cfg.val_tokens), n_val_w * per_window)
    if n_val_rows < MIN_VAL_ROWS:
        raise UserError(f"the validation split would hold {n_val_rows} rows ({n_val_w} windows × up to "
                        f"{per_window} positions), fewer than the {MIN_VAL_ROWS} needed to measure loss and "
                        f"accuracy; raise --val-tokens to at least {MIN_VAL_ROWS}.")
    if n_val_w >= n_windows:
        raise UserError(f"the corpus gives {n_windows} windows of {cfg.seq_len + 1} tokens, but the validation "
                        f"split alone needs {n_val_w} ({cfg.val_tokens} rows) and training at least one more; "
                        f"lower --val-tokens or --seq-len, or use a bigger corpus.")
    gen = torch.Generator().manual_seed(_head_seed(cfg.seed, -1))
    perm = torch.randperm(n_windows, generator=gen)
    return perm[:n_val_w], perm[n_val_w:]


def run_heads(**kwargs) -> Optional[HeadsResult]:
    """Fit rank-constrained heads on a frozen teacher (the Python API of ``rankest heads``).

    Keyword arguments are the fields of :class:`HeadsConfig` (``teacher`` may be a loaded
    :class:`~rankest.teachers.Teacher`; ``corpus`` may be a (W, seq_len + 1) tensor of
    pre-tokenised windows). Returns a :class:`HeadsResult`; writes heads.h5, heads.json and the
    report into ``out`` when given. Under torchrun (``WORLD_SIZE`` > 1) every process trains on
    its shard of each batch; rank 0 alone writes and returns the result (the others: None).
    """
    from rankest.runtime import distributed
    from rankest.sources.corpus import DEFAULT_CORPUS
    from rankest.sources.teachers import DEFAULT_TEACHER

    unknown = set(kwargs) - set(HeadsConfig.__dataclass_fields__)
    if unknown:
        raise TypeError(f"unknown options: {sorted(unknown)}")
    cfg = HeadsConfig(**kwargs)
    cfg.teacher = DEFAULT_TEACHER if cfg.teacher is None else cfg.teacher
    cfg.corpus = DEFAULT_CORPUS if cfg.corpus is None else cfg.corpus
    cfg.validate()
    if isinstance(cfg.ranks, str):  # syntax errors before anything is loaded
        parse_ranks(cfg.ranks, 1 << 30)
    world, run_device = distributed.setup(cfg.device)
    try:
        return _heads(cfg, world, run_device)
    finally:
        distributed.shutdown(world)


def _heads(cfg: HeadsConfig, world, run_device: str) -> Optional[HeadsResult]:
    """The body of :func:`run_heads` for one process of ``world``."""
    from rankest.runtime import distributed
    from rankest.sources.corpus import plan_rows, windows_for
    from rankest.estimator.pipeline import check_linear_head
    from rankest.io.results import now_iso, provenance
    from rankest.sources.teachers import teacher_and_documents

    run_config = _heads_run_config(cfg)
    ckpt_box: dict[str, Any] = {}  # rank 0's checkpoint, when resuming
    position = distributed.on_main(world, lambda: _prepare_out(cfg, run_config, ckpt_box)) if cfg.out else None
    out = Path(cfg.out) if cfg.out and world.main else None
    cache_path = Path(cfg.cache_features) if cfg.cache_features else None
    if cache_path is not None and cache_path.exists() and not cache_path.is_file():
        raise UserError(f"--cache-features {cache_path} is not a file; pass a file path such as feats.h5.")
    started, t0 = now_iso(), time.perf_counter()
    teacher, docs = teacher_and_documents(cfg.teacher, cfg.corpus, revision=cfg.revision, device=run_device,
                                          dtype=cfg.dtype, seq_len=cfg.seq_len, quiet=cfg.quiet,
                                          device_map=cfg.device_map)
    d, n_cols = teacher.hidden_size, teacher.n_cols
    full = min(d, n_cols)
    ranks, labels = parse_ranks(cfg.ranks, full)
    weight, bias = teacher.head()
    weight = weight[:n_cols]  # real vocabulary columns only (V'), consistently everywhere
    bias = None if bias is None else bias[:n_cols]
    head_dtype = torch.float64 if teacher.dtype == torch.float64 else torch.float32
    device = teacher.device
    corpus_label = corpus_name(cfg.corpus)

    # Windows and the seeded validation / training split.
    from rankest.sources.corpus import _position_mask

    per_window = int(_position_mask(cfg.positions, cfg.seq_len).sum())
    need = (cfg.tokens or 0) + cfg.val_tokens
    max_windows = None if cfg.tokens is None else math.ceil(max(8 * need, 2**20) / per_window)
    windows = windows_for(cfg.corpus, docs, teacher.tokenizer, cfg.seq_len, max_windows=max_windows,
                          progress=not cfg.quiet and world.main)
    val_idx, train_idx = _split_windows(len(windows), cfg, per_window)
    val_plan = plan_rows(len(val_idx), cfg.seq_len, positions=cfg.positions, tokens=min(cfg.val_tokens, len(val_idx) * per_window),
                         seed=cfg.seed + 1)
    train_plan = plan_rows(len(train_idx), cfg.seq_len, positions=cfg.positions, tokens=cfg.tokens, seed=cfg.seed,
                           sample=cfg.sample)
    train_split = _Split(windows[train_idx], train_plan, cfg.batch_size)
    val_split = _Split(windows[val_idx], val_plan, cfg.batch_size)

    # What the data and teacher resolved to: a checkpoint of other rows or another model is refused.
    steps = int(cfg.steps) if cfg.steps else train_split.n_batches
    derived = _heads_derived(teacher, labels, steps, train_split, val_split)
    if position is not None:
        from rankest.io.checkpoint import check_same_run

        ck = ckpt_box.get("ckpt")
        distributed.on_main(world, lambda: check_same_run(ck.derived, derived, ck.path, "data or teacher"))

    # Can the teacher serve the objective? kl distils head(features), which must be the model's own
    # distribution; checked on a prefix of the first validation windows.
    linear, lin_err = None, None
    if cache_path is not None:
        attrs = _cache_attrs(cfg, teacher, corpus_label)

        def make_cache():  # rank 0 checks or writes the cache; the others wait for it
            if cache_path.is_file():
                _check_cache(cache_path, attrs)
                return
            with torch.inference_mode():
                lin, err = check_linear_head(teacher, val_split.batch(0).input_ids.to(device))
            attrs["linear_head"] = int(lin)
            attrs["linear_head_rel_err"] = err
            _write_cache(cache_path, attrs, _Source(train_split, teacher), _Source(val_split, teacher),
                         cfg.quiet or not world.main)

        distributed.on_main(world, make_cache)
        import h5py

        fh = h5py.File(cache_path, "r")
        linear, lin_err = bool(fh.attrs.get("linear_head", 1)), float(fh.attrs.get("linear_head_rel_err", 0.0))
        train_src = _Source(train_split, cache=(fh["train_features"], fh["train_targets"],
                                                fh["train_offsets"][...], device), world=world)
        val_src = _Source(val_split, cache=(fh["val_features"], fh["val_targets"], fh["val_offsets"][...], device),
                          world=world)
    else:
        fh = None
        with torch.inference_mode():
            linear, lin_err = check_linear_head(teacher, val_split.batch(0).input_ids.to(device))
        train_src, val_src = _Source(train_split, teacher, world=world), _Source(val_split, teacher, world=world)
    if not linear:
        if cfg.objective == "kl":
            raise UserError(f"--objective kl distils the teacher's head applied to its features, but this "
                            f"teacher's logits differ from that (relative error {lin_err:.1e}: soft-capping or "
                            f"logit scaling?); use --objective ce.")
        warnings.warn(f"the teacher's logits are not its head applied to its features (relative error "
                      f"{lin_err:.1e}); the reference row and the truncations use the head", stacklevel=2)

    ckpt = _Checkpointing(world=world, out=out, enabled=bool(cfg.out), every=cfg.checkpoint_every,
                          config=run_config, derived=derived, position=position, ckpt=ckpt_box.get("ckpt"))
    try:
        result = _fit(cfg, teacher, weight, bias, ranks, labels, train_src, val_src, head_dtype, device, world,
                      ckpt)
    finally:
        if fh is not None:
            fh.close()
    if not world.main:
        return None
    result.meta.update({
        "teacher": teacher.name, "teacher_source": teacher.source, "revision": cfg.revision, "corpus": corpus_label,
        "hidden_size": d, "n_cols": n_cols, "logit_width": teacher.logit_width, "init": cfg.init,
        "objective": cfg.objective, "seed": cfg.seed, "linear_head_check_rel_err": lin_err,
        "features": "cache:" + str(cache_path) if cache_path else "on the fly",
        "dtype": str(teacher.dtype).replace("torch.", ""), "device": str(device),
        "device_map": teacher.provenance()["device_map"],
        "seconds_total": time.perf_counter() - t0, "world_size": world.size,
    })
    if out is not None:
        from rankest.io.checkpoint import CHECKPOINT_NAME, remove_checkpoint

        prov = provenance(device)
        prov.update({"started": started, "finished": now_iso()})
        config = {f.name: getattr(cfg, f.name) for f in fields(cfg)
                  if f.name not in ("out", "overwrite", "quiet", "resume", "checkpoint_every")}
        config.update(teacher=teacher.name, corpus=corpus_label, ranks=",".join(labels))
        result.meta["config"] = config
        result.meta["provenance"] = prov
        write_heads_run(out, result)
        # heads.h5 now holds everything the checkpoint did: a finished run folder has none.
        remove_checkpoint(out / CHECKPOINT_NAME)
        result.meta["out"] = str(out)
    return result


# ---- checkpoints of a sweep -------------------------------------------------------------------------
#: Options that do not change the result (where and how the run executes): a sweep may resume
#: with other values of these.
HEADS_NOT_COMPARED = ("out", "overwrite", "quiet", "resume", "checkpoint_every", "device", "device_map")


def _heads_run_config(cfg: HeadsConfig) -> dict:
    """The options a checkpoint must share with the sweep that resumes it (JSON-able)."""
    from rankest.io.checkpoint import run_config

    out = run_config(cfg, skip=HEADS_NOT_COMPARED)
    if not isinstance(out.get("ranks"), str):
        out["ranks"] = ",".join(map(str, out["ranks"]))
    return out


def _heads_derived(teacher, labels, steps: int, train: _Split, val: _Split) -> dict:
    """What the teacher and data resolved to, with a sha256 of both splits' rows."""
    from rankest.estimator.pipeline import _rows_fingerprint

    return {"n_cols": teacher.n_cols, "hidden_size": teacher.hidden_size,
            "teacher_dtype": str(teacher.dtype).replace("torch.", ""), "ranks": ",".join(labels), "steps": steps,
            "train_rows_sha256": _rows_fingerprint(train.windows, train.plan),
            "val_rows_sha256": _rows_fingerprint(val.windows, val.plan)}


def _prepare_out(cfg: HeadsConfig, run_config: dict, box: dict) -> Optional[dict]:
    """Rank 0: prepare the run folder; when resuming, read and check the checkpoint (into
    ``box["ckpt"]``) and return its position (None when starting afresh)."""
    from rankest.io.checkpoint import open_run_folder

    ck = open_run_folder(cfg.out, resume=cfg.resume, overwrite=cfg.overwrite, results_file="heads.h5",
                         command="heads", run="sweep", run_config=run_config)
    if ck is None:
        return None
    box["ckpt"] = ck
    return ck.position


@dataclass
class _Checkpointing:
    """Checkpoints of the training loop: every ``every`` steps and on SIGINT/SIGTERM, rank 0 writes
    DIR/checkpoint.h5 (every process holds the same heads after each all-reduced step)."""

    world: Any
    out: Optional[Path]  # the run folder on rank 0; None on the others and without --out
    enabled: bool  # a run folder exists: signals are caught and checkpointed
    every: Optional[int]
    config: dict
    derived: dict
    position: Optional[dict] = None  # every process: where the checkpoint stopped (None: fresh)
    ckpt: Any = None  # rank 0: the Checkpoint read

    @property
    def start_step(self) -> int:
        return 0 if self.position is None else int(self.position["step"])

    def restore(self, sweep: "HeadSweep", history: np.ndarray) -> None:
        """Load the checkpoint's heads, AdamW states and loss history on every process."""
        from rankest.runtime import distributed
        from rankest.io.checkpoint import set_rng_state

        states = self.ckpt.states if self.world.main else None
        sweep_state = distributed.broadcast_arrays(self.world, None if states is None else states["sweep"])
        sweep.load_state(sweep_state)
        done = distributed.broadcast(self.world, None if states is None else states["history"]["train_loss"])
        history[:len(done)] = done
        if self.world.main:
            set_rng_state(self.ckpt.rng, sweep.A[0].device)

    def save(self, sweep: "HeadSweep", history: np.ndarray, step: int, extra: dict) -> None:
        """Collective: rank 0 writes; a failed write stops every process."""
        from rankest.runtime import distributed
        from rankest.io.checkpoint import CHECKPOINT_NAME, CheckpointWriteError, rng_state, write_checkpoint

        message = None
        if self.world.main:
            try:
                write_checkpoint(self.out / CHECKPOINT_NAME, config=self.config, derived=self.derived,
                                 convergence={}, rng=rng_state(sweep.A[0].device),
                                 states={"sweep": sweep.state(), "history": {"train_loss": history[:step]}},
                                 position={"command": "heads", "step": step, "world_size": self.world.size,
                                           **extra})
            except UserError as e:
                if not self.world.active:
                    raise
                message = str(e)
        message = distributed.broadcast(self.world, message)
        if message is not None:
            raise CheckpointWriteError(message)


def _feature_gram(train_src: _Source, gram_rows: int, d: int, device, world) -> tuple[torch.Tensor, int]:
    """fp64 HᵀH of the first training batches holding ≥ ``gram_rows`` rows (summed over the
    processes' shards); the batches stay in the source's memo for training."""
    from rankest.runtime import distributed

    n_train = int(train_src.offsets[-1])
    gram = torch.zeros(d, d, dtype=torch.float64, device=device)
    n_gram, k = 0, 0
    while n_gram < min(gram_rows, n_train) and k < train_src.n_batches:
        h, _ = train_src.batch(k, keep=True)
        hd = h.double()
        gram += hd.T @ hd
        n_gram += train_src.rows(k)
        k += 1
    distributed.all_sum_(world, [gram])
    return gram, n_gram


def _fit(cfg: HeadsConfig, teacher, weight, bias, ranks, labels, train_src: _Source, val_src: _Source,
         head_dtype, device, world, ckpt: _Checkpointing) -> HeadsResult:
    from tqdm.auto import tqdm

    from rankest.runtime import distributed
    from rankest.io.checkpoint import CHECKPOINT_NAME, Interrupted, StopOnSignal

    d = weight.shape[1]
    n_train = int(train_src.offsets[-1])
    n_val = int(val_src.offsets[-1])
    steps = int(cfg.steps) if cfg.steps else train_src.n_batches
    teacher_kw = ({"teacher_weight": weight.to(head_dtype), "teacher_bias": None if bias is None else bias.to(head_dtype)}
                  if cfg.objective == "kl" else {})

    # Validation features once (the split is small and every head is evaluated on it); this
    # process's shard of them under torchrun.
    if n_val < MIN_VAL_ROWS:
        raise UserError(f"the validation split holds {n_val} rows, fewer than the {MIN_VAL_ROWS} needed "
                        f"to measure loss and accuracy; raise --val-tokens or use a bigger corpus.")
    val_h, val_t = val_src.all_rows()

    # The feature metric: fp64 Gram of the first training rows (kept for training, not recomputed).
    gram_rows = int(cfg.gram_rows) if cfg.gram_rows else max(4096, 4 * d)
    gram, n_gram = _feature_gram(train_src, gram_rows, d, device, world)
    if n_gram < d:
        warnings.warn(f"the feature metric comes from {n_gram} training rows, fewer than d = {d}: truncations past "
                      f"rank {n_gram} follow the head's own metric; raise --tokens for a full-rank metric",
                      stacklevel=2)
    t_trunc = time.perf_counter()
    # The mean second moment G/n, not the sum: the minimiser is the same, and the balanced factors
    # then have the scale of the logits whatever the number of rows (it matters to AdamW's steps).
    gram_w = head_gram(weight)
    feat_f, w_err_feat = feature_truncations(weight, gram / max(1, n_gram), ranks, gram_w=gram_w)
    weight_f, w_err_weight = weight_truncations(weight, ranks, gram_w=gram_w)

    def cast(a, b, bi=None):
        return (a.to(device, head_dtype), None if b is None else b.to(device, head_dtype),
                None if bi is None else bi.to(head_dtype))

    # The reference and both truncations at every rank: one evaluation, one all-reduce.
    evs = evaluate_heads([cast(weight, None, bias)] + [cast(*weight_f[r], bias) for r in ranks]
                         + [cast(*feat_f[r], bias) for r in ranks], val_h, val_t, world=world, n_rows=n_val,
                         **teacher_kw)
    reference, trunc_w, trunc_f = evs[0], evs[1:1 + len(ranks)], evs[1 + len(ranks):]
    reference["perplexity"] = math.exp(reference["loss"])
    t_trunc = time.perf_counter() - t_trunc

    # Peak LR per head: --lr, the paper's table, or a short search on a held-out training slice
    # (a resumed sweep takes the LRs its checkpoint was trained with).
    lrs = [float(cfg.lr) if cfg.lr else paper_lr(r) for r in ranks]
    search = None
    if ckpt.position is not None:
        lrs, search = [float(x) for x in ckpt.position["lrs"]], ckpt.position.get("lr_search")
    elif cfg.lr_search:
        lrs, search = _lr_search(cfg, ranks, labels, train_src, d, weight.shape[0], feat_f, bias, head_dtype,
                                 device, teacher_kw, world)
    specs = [HeadSpec(r, lr, lab) for r, lr, lab in zip(ranks, lrs, labels)]
    sweep = HeadSweep(specs, n_cols=weight.shape[0], d=d, init=cfg.init, seed=cfg.seed, steps=steps, device=device,
                      dtype=head_dtype, svd_factors=feat_f, bias=bias, objective=cfg.objective,
                      weight_decay=cfg.weight_decay, world=world)
    del feat_f, weight_f

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    history = np.zeros((steps, len(specs)))
    s0 = ckpt.start_step
    if s0 > 0:
        ckpt.restore(sweep, history)
        for k in [k for k in train_src.memo if s0 >= train_src.n_batches or k < s0]:
            del train_src.memo[k]  # kept by the Gram for steps already taken
    t_heads = 0.0
    bar = tqdm(total=steps, initial=s0, unit="step", desc=f"heads ×{len(specs)}", disable=cfg.quiet or not world.main,
               dynamic_ncols=True)
    every = ckpt.every
    # SIGINT/SIGTERM: checkpoint at the end of the current step, then stop (only with a run folder).
    with StopOnSignal(enabled=ckpt.enabled) as stop:
        for s in range(s0, steps):
            k = s % train_src.n_batches
            h, t = train_src.batch(k)
            t1 = time.perf_counter()
            history[s] = sweep.step(h, t, n_rows=train_src.rows(k), **teacher_kw)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t_heads += time.perf_counter() - t1
            bar.update(1)
            bar.set_postfix(loss=f"{history[s].mean():.3f}")
            stopping = ckpt.enabled and distributed.any_true(world, stop.signum is not None)
            done = s + 1
            if done < steps and (stopping or (every and done % every == 0)):
                ckpt.save(sweep, history, done, {"steps": steps, "lrs": lrs, "lr_search": search})
            if stopping and done < steps:
                bar.close()
                raise Interrupted(f"stopped after step {done} of {steps}; the checkpoint "
                                  f"{Path(cfg.out) / CHECKPOINT_NAME} holds it: rerun the same command with "
                                  f"--resume to continue", stop.signum or 15)
    bar.close()
    train_src.memo.clear()
    evals = sweep.evaluate(val_h, val_t, n_rows=n_val, **teacher_kw)

    import resource

    mem = {"head_state_bytes": sweep.state_bytes(),
           "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if device.type == "cuda":
        mem["peak_device_bytes"] = int(torch.cuda.max_memory_allocated(device))
    n_steps_here = max(1, steps - s0)
    res = HeadsResult(
        ranks=list(ranks), labels=list(labels), lr=lrs,
        val_loss=[e["loss"] for e in evals], val_accuracy=[e["accuracy"] for e in evals],
        val_perplexity=[math.exp(min(e["loss"], 700.0)) for e in evals], reference=reference,
        truncation_loss=[e["loss"] for e in trunc_w], truncation_accuracy=[e["accuracy"] for e in trunc_w],
        head_w_error_weight=[float(w_err_weight[r - 1]) for r in ranks],
        truncation_loss_feature=[e["loss"] for e in trunc_f],
        truncation_accuracy_feature=[e["accuracy"] for e in trunc_f],
        head_w_error_feature=[float(w_err_feat[r - 1]) for r in ranks],
        w_error_weight_curve=w_err_weight, w_error_feature_curve=w_err_feat, train_loss=history,
        val_kl=[e["kl"] for e in evals] if cfg.objective == "kl" else None, lr_search=search,
        meta={"steps": steps, "n_train_rows": n_train, "n_val_rows": n_val, "gram_rows": n_gram,
              "rows_per_step": n_train / max(1, train_src.n_batches), "batch_size": cfg.batch_size,
              "epochs": steps / max(1, train_src.n_batches),
              "seconds_features": train_src.seconds + val_src.seconds, "seconds_heads": t_heads,
              "seconds_per_step": (train_src.seconds + t_heads) / n_steps_here,
              "seconds_heads_per_step": t_heads / n_steps_here, "seconds_truncation": t_trunc,
              "resumed_at_step": s0, **mem})
    return res


def _lr_search(cfg, ranks, labels, train_src: _Source, d, n_cols, feat_f, bias, head_dtype, device, teacher_kw,
               world=None):
    """Try LR_SEARCH_FACTORS × the paper's LR for every rank, all heads in one sweep, for a tenth
    of the run's steps on the first training batches; score each on the next batches (never
    trained on during the search, never the validation split). Returns (lrs, table). Under
    torchrun the search is sharded like the training (global means, all-reduced gradients)."""
    n_b = train_src.n_batches
    if n_b < 2:
        raise UserError("--lr-search needs at least 2 training batches (one to train, one held out); "
                        "raise --tokens or lower --batch-size.")
    steps = int(cfg.steps) if cfg.steps else n_b
    held = max(1, n_b // 5)
    search_steps = max(1, min(math.ceil(steps / 10), n_b - held))
    specs = [HeadSpec(r, paper_lr(r) * f, lab) for r, lab in zip(ranks, labels) for f in LR_SEARCH_FACTORS]
    sweep = HeadSweep(specs, n_cols=n_cols, d=d, init=cfg.init, seed=cfg.seed, steps=search_steps, device=device,
                      dtype=head_dtype, svd_factors=feat_f, bias=bias, objective=cfg.objective,
                      weight_decay=cfg.weight_decay, world=world)
    for s in range(search_steps):
        h, t = train_src.batch(s, keep=True)
        sweep.step(h, t, n_rows=train_src.rows(s), **teacher_kw)
    parts = [train_src.batch(k) for k in range(n_b - held, n_b)]
    hh, tt = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    n_held = sum(train_src.rows(k) for k in range(n_b - held, n_b))
    scores = sweep.evaluate(hh, tt, n_rows=n_held, **teacher_kw)
    key = "kl" if cfg.objective == "kl" else "loss"  # scored by the objective being trained
    table, lrs = {}, []
    for i, lab in enumerate(labels):
        block = specs[i * len(LR_SEARCH_FACTORS):(i + 1) * len(LR_SEARCH_FACTORS)]
        losses = scores[i * len(LR_SEARCH_FACTORS):(i + 1) * len(LR_SEARCH_FACTORS)]
        best = min(range(len(block)), key=lambda j: (not math.isfinite(losses[j][key]), losses[j][key]))
        lrs.append(block[best].lr)
        table[lab] = {f"{sp.lr:.3g}": e[key] for sp, e in zip(block, losses)}
    table["search_steps"] = search_steps
    table["held_out_rows"] = int(n_held)
    return lrs, table


def write_heads_run(out: Path, result: HeadsResult) -> dict:
    """heads.h5 + heads.json + the report (heads.md, and report.md when the folder has none)."""
    from rankest.report.heads import write_heads_report
    from rankest.io.results import write_text_atomic
    from rankest.spectrum import to_json

    out = Path(out)
    result.save(out / "heads.h5")
    summary = result.summary()
    write_text_atomic(out / "heads.json", to_json(summary) + "\n")
    write_heads_report(out, result)
    return summary
