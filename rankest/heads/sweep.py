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

Long runs: ``--checkpoint-every STEPS`` / SIGINT / SIGTERM write DIR/checkpoint.h5
(:mod:`rankest.io.checkpoint`: every head, AdamW's states, the step, the LRs, RNG states, config)
and ``--resume`` continues bit for bit; under ``torchrun`` each process trains on a disjoint
shard of every batch with the heads' gradients all-reduced before each step
(:mod:`rankest.runtime.distributed`), so the result does not depend on the number of processes.

    python -m rankest heads --out runs/heads --checkpoint-every 100 [--resume]
    torchrun --nproc_per_node=2 -m rankest heads --device cpu --out runs/heads
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from rankest.errors import UserError
from rankest.heads.evaluate import _chunk_rows, _logits, evaluate_heads
from rankest.runtime import distributed


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


# ---- the sweep: every head, one optimiser step per shared batch ------------------------------
@dataclass
class HeadSpec:
    """One head of a sweep: rank, peak LR and label (``"32"``, ``"full"``)."""

    rank: int
    lr: float
    label: str


class AdamWHeads:
    """What every set of heads trained side by side shares: one AdamW over all of them (a param
    group per head and parameter kind: AdamW is elementwise, so one optimiser over all heads
    equals one per head), Pythia's LR schedule, the torchrun gradient sum, and the checkpoint
    state. Subclasses build ``self.optimizer`` with :meth:`_build_optimizer`."""

    world = None
    steps: int
    dtype: torch.dtype

    def _build_optimizer(self, groups: list[dict], weight_decay: float, betas: tuple[float, float]) -> None:
        self.optimizer = torch.optim.AdamW(groups, betas=betas, weight_decay=weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, self.steps))

    def params(self) -> list[torch.nn.Parameter]:
        """Every parameter, in the optimiser's order (the checkpoint's and the all-reduce's order)."""
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def state_bytes(self) -> int:
        """Parameters + gradients + AdamW's two moments, in bytes."""
        return 4 * sum(p.numel() for p in self.params()) * torch.finfo(self.dtype).bits // 8

    def _apply_step(self, losses: np.ndarray) -> np.ndarray:
        """Sum the gradients (and ``losses``) over a torchrun job, then one AdamW and schedule step."""
        if self.world is not None and self.world.active:
            params = self.params()
            for p in params:  # a process without rows this step still joins the sum (with zeros)
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            distributed.all_sum_(self.world, [p.grad for p in params])
            losses = distributed.all_sum(self.world, losses)
        self.optimizer.step()
        self.scheduler.step()
        return losses

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


class HeadSweep(AdamWHeads):
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
    world : a torchrun job (:mod:`rankest.runtime.distributed`): each process steps on its shard of the
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
        self.dtype = dtype
        self._build_optimizer(groups, weight_decay, betas)

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
        return self._apply_step(losses)

    def evaluate(self, h: torch.Tensor, targets: torch.Tensor, *, n_rows: Optional[int] = None,
                 **teacher) -> list[dict[str, float]]:
        """Every head on the rows (this process's shard under torchrun; ``n_rows`` the global count)."""
        heads = [(self.A[i].detach(), self.B[i].detach(), None if self.b[i] is None else self.b[i].detach())
                 for i in range(len(self.specs))]
        return evaluate_heads(heads, h, targets, world=self.world, n_rows=n_rows, **teacher)
