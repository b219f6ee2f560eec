"""Head families beyond the linear bottleneck, each a map from features h (n, d) to log-probs (n, V').

* ``linear``: z = A·B·h (+ b), log p = log_softmax(z) — the rank-r head of the paper; the
  log-prob matrix over any rows has clr rank ≤ r (≤ r + 1 with a bias).
* ``mos:K``: Mixture of Softmaxes (Yang, Dai, Salakhutdinov & Cohen 2018, "Breaking the Softmax
  Bottleneck"): p = Σ_k π_k(h)·softmax(A·tanh(P_k·h + c_k) (+ b)), gate π = softmax(G·h + g).
  Every component is a rank-r map of its own projected context, the decoder A (V'×r) is shared
  (as in Yang et al.); the log of a mixture is not a low-rank matrix, so the clr rank of its
  log-prob matrix can exceed r and d.
* ``sigsoftmax``: Kanai, Fujiwara, Yamanaka & Adachi 2018: p_i ∝ exp(z_i)·σ(z_i) with z = A·B·h
  (+ b); log p = g − logsumexp(g), g = z + log σ(z), an elementwise non-linearity of the logits.
* ``mlp:H``: z = A·B·gelu(W·h + c) (+ b): a non-linear map d → H before the rank-r factor; its
  logits are still rank r (the bottleneck is after the non-linearity), a contrast to MoS.

Each family's parameter count is affine in the rank, count(r) = c0 + c1·r (:meth:`HeadFamily.costs`),
so :func:`rank_for_params` inverts it: ``--match-params`` gives every family the largest rank
whose count does not exceed the linear head's of the same nominal rank.

Init: ``linear`` follows ``--init`` (normal / scaled / svd, as the rank sweep); the non-linear
families start from a variance-preserving init (weights N(0, 1/fan_in), biases 0) whatever
``--init``, since neither N(0, 1) nor the teacher's truncation is a meaningful start for them.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from rankest.errors import UserError

#: Families and the size argument each takes (None: no argument).
FAMILY_ARGS = {"linear": None, "mos": "K", "sigsoftmax": None, "mlp": "H"}


@dataclass(frozen=True)
class FamilySpec:
    """One ``--family`` entry: ``mos:4`` is FamilySpec("mos", 4)."""

    name: str
    arg: Optional[int] = None

    @property
    def label(self) -> str:
        return self.name if self.arg is None else f"{self.name}:{self.arg}"


def parse_families(spec) -> list[FamilySpec]:
    """``"linear,mos:4,sigsoftmax,mlp:64"`` → FamilySpecs (duplicates dropped, order kept)."""
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec)]
    out: list[FamilySpec] = []
    for item in items:
        name, _, arg = item.partition(":")
        name = name.strip().lower()
        if name not in FAMILY_ARGS:
            raise UserError(f"--family entry {item!r} is not one of linear, mos:K, sigsoftmax, mlp:H; "
                            f"use e.g. --family linear,mos:4,sigsoftmax,mlp:64.")
        want = FAMILY_ARGS[name]
        if (want is None) != (arg == ""):
            form = name if want is None else f"{name}:{want}"
            raise UserError(f"--family entry {item!r} should be written {form}; use e.g. --family linear,mos:4.")
        value = None
        if want is not None:
            try:
                value = int(arg)
            except ValueError:
                value = 0
            if value < 1:
                raise UserError(f"--family entry {item!r}: {want} must be a positive integer, e.g. {name}:4.")
        fs = FamilySpec(name, value)
        if fs not in out:
            out.append(fs)
    if not out:
        raise UserError("--family is empty; give e.g. --family linear,mos:4,sigsoftmax,mlp:64.")
    return out


def head_seed(seed: int, family: str, rank: int, replicate: int) -> int:
    """Init seed of one head: a function of (seed, family, rank, replicate) only, so a head starts
    the same in a sweep of any other heads and alone."""
    return (int(seed) * 1_000_003 + zlib.crc32(family.encode()) * 104_729 + int(rank) * 7919
            + int(replicate) * 15_485_863) % (2**63 - 1)


class HeadFamily(torch.nn.Module):
    """Base class: ``forward(h)`` (n, d) → (n, V') log-probabilities in the parameters' dtype.

    Parameters
    ----------
    d, n_cols : feature width and V'.
    rank : r, the width of the factor A (V'×r) every family ends with.
    bias : whether the head has a full-length logit bias (the teacher's head has one).
    arg : the family's size argument (K components, H hidden units), or None.
    """

    family = "base"
    #: How many V'-wide logit rows one feature row costs in :meth:`forward` (sets the chunk size).
    width = 1

    def __init__(self, d: int, n_cols: int, rank: int, *, bias: bool, arg: Optional[int] = None) -> None:
        super().__init__()
        self.d, self.n_cols, self.rank, self.arg = int(d), int(n_cols), int(rank), arg
        self.A = torch.nn.Parameter(torch.zeros(n_cols, rank, dtype=torch.float64))
        self.b = torch.nn.Parameter(torch.zeros(n_cols, dtype=torch.float64)) if bias else None

    @classmethod
    def costs(cls, d: int, n_cols: int, *, bias: bool, arg: Optional[int] = None) -> tuple[int, int]:
        """(c0, c1) with parameter count c0 + c1·r."""
        raise NotImplementedError

    @classmethod
    def count(cls, d: int, n_cols: int, rank: int, *, bias: bool, arg: Optional[int] = None) -> int:
        c0, c1 = cls.costs(d, n_cols, bias=bias, arg=arg)
        return c0 + c1 * int(rank)

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def weights(self) -> list[torch.nn.Parameter]:
        """Matrices (weight-decayed); the biases and gates' offsets are the rest of :meth:`parameters`."""
        return [p for p in self.parameters() if p.dim() >= 2]

    def reset(self, gen: torch.Generator, init: str, svd: Optional[tuple] = None,
              teacher_bias: Optional[torch.Tensor] = None) -> None:
        """Variance-preserving init: every matrix N(0, 1/fan_in), vectors 0 (drawn in fp64)."""
        with torch.no_grad():
            for p in self.parameters():
                if p.dim() >= 2:
                    p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * p.shape[-1] ** -0.5)
                else:
                    p.zero_()

    def _add_bias(self, z: torch.Tensor) -> torch.Tensor:
        return z if self.b is None else z + self.b


class LinearHead(HeadFamily):
    """z = A·(B·h) (+ b); log_softmax(z). Init as the rank sweep (:class:`~rankest.heads.sweep.HeadSweep`)."""

    family = "linear"

    def __init__(self, d, n_cols, rank, *, bias, arg=None):
        super().__init__(d, n_cols, rank, bias=bias, arg=arg)
        self.B = torch.nn.Parameter(torch.zeros(rank, d, dtype=torch.float64))

    @classmethod
    def costs(cls, d, n_cols, *, bias, arg=None):
        return (n_cols if bias else 0), n_cols + d

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self._add_bias((h @ self.B.T) @ self.A.T)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.logits(h), dim=-1)

    def reset(self, gen, init, svd=None, teacher_bias=None):
        with torch.no_grad():
            if init == "svd":
                a, b = svd
                if self.b is not None and teacher_bias is not None:
                    self.b.copy_(teacher_bias)
            else:
                sa, sb = (1.0, 1.0) if init == "normal" else (self.rank ** -0.5, self.d ** -0.5)
                a = torch.randn(self.n_cols, self.rank, generator=gen, dtype=torch.float64) * sa
                b = torch.randn(self.rank, self.d, generator=gen, dtype=torch.float64) * sb
                if self.b is not None:
                    self.b.zero_()
            self.A.copy_(a)
            self.B.copy_(b)


class SigSoftmaxHead(LinearHead):
    """Sigsoftmax of the rank-r logits z = A·B·h (+ b): log p = g − logsumexp(g), g = z + log σ(z)."""

    family = "sigsoftmax"

    def forward(self, h):
        z = self.logits(h)
        g = z + F.logsigmoid(z)
        return g - torch.logsumexp(g, dim=-1, keepdim=True)

    reset = HeadFamily.reset


class MLPHead(HeadFamily):
    """z = A·B·gelu(W·h + c) (+ b), W: H×d, B: r×H."""

    family = "mlp"

    def __init__(self, d, n_cols, rank, *, bias, arg=None):
        super().__init__(d, n_cols, rank, bias=bias, arg=arg)
        self.W = torch.nn.Parameter(torch.zeros(arg, d, dtype=torch.float64))
        self.c = torch.nn.Parameter(torch.zeros(arg, dtype=torch.float64))
        self.B = torch.nn.Parameter(torch.zeros(rank, arg, dtype=torch.float64))

    @classmethod
    def costs(cls, d, n_cols, *, bias, arg=None):
        return arg * (d + 1) + (n_cols if bias else 0), n_cols + arg

    def forward(self, h):
        u = F.gelu(h @ self.W.T + self.c)
        return torch.log_softmax(self._add_bias((u @ self.B.T) @ self.A.T), dim=-1)


class MoSHead(HeadFamily):
    """log p = logsumexp_k(log π_k + log_softmax(A·tanh(P_k·h + c_k) (+ b))), π = softmax(G·h + g)."""

    family = "mos"

    def __init__(self, d, n_cols, rank, *, bias, arg=None):
        super().__init__(d, n_cols, rank, bias=bias, arg=arg)
        self.width = int(arg)
        self.G = torch.nn.Parameter(torch.zeros(arg, d, dtype=torch.float64))
        self.g = torch.nn.Parameter(torch.zeros(arg, dtype=torch.float64))
        self.P = torch.nn.Parameter(torch.zeros(arg * rank, d, dtype=torch.float64))
        self.c = torch.nn.Parameter(torch.zeros(arg * rank, dtype=torch.float64))

    @classmethod
    def costs(cls, d, n_cols, *, bias, arg=None):
        return arg * (d + 1) + (n_cols if bias else 0), arg * (d + 1) + n_cols

    def forward(self, h):
        k = self.width
        ctx = torch.tanh(h @ self.P.T + self.c).reshape(h.shape[0], k, self.rank)  # (n, K, r)
        comp = torch.log_softmax(self._add_bias(ctx @ self.A.T), dim=-1)  # (n, K, V')
        gate = torch.log_softmax(h @ self.G.T + self.g, dim=-1)  # (n, K)
        return torch.logsumexp(gate[:, :, None] + comp, dim=1)


FAMILIES = {cls.family: cls for cls in (LinearHead, MoSHead, SigSoftmaxHead, MLPHead)}


def family_class(spec: FamilySpec) -> type[HeadFamily]:
    return FAMILIES[spec.name]


def make_head(spec: FamilySpec, d: int, n_cols: int, rank: int, *, bias: bool) -> HeadFamily:
    """An (uninitialised) head of family ``spec`` and rank r; call :meth:`HeadFamily.reset`."""
    return family_class(spec)(d, n_cols, rank, bias=bias, arg=spec.arg)


def rank_for_params(spec: FamilySpec, target: int, d: int, n_cols: int, *, bias: bool) -> int:
    """The largest rank whose parameter count is ≤ ``target`` (at least 1)."""
    c0, c1 = family_class(spec).costs(d, n_cols, bias=bias, arg=spec.arg)
    return max(1, math.floor((target - c0) / c1))
