"""Representation diagnostics: anisotropy of every layer and the spectrum of the output head.

Godey, de la Clergerie & Sagot (2024), arXiv 2404.07647, §4 link the saturation of small
language models to degenerate representations:

* **anisotropy** of a layer's token representations H = {h_1 … h_n} (Ethayarajh 2019), the mean
  pairwise cosine similarity over distinct pairs (the paper's Fig. 2)::

      A(H) = 1/(n² − n) · Σ_{i≠j} ĥ_i·ĥ_j = (‖Σ_i ĥ_i‖² − n) / (n² − n),   ĥ = h / ‖h‖

  (Σ_{i,j} ĥ_i·ĥ_j = ‖Σĥ‖² and the n diagonal terms are 1). It is exact from the fp64 sum
  of the unit vectors alone: O(n·d) time, O(d) memory, never the n×n matrix.
* **head spectrum**: the singular values of the LM head W' (its V' real-vocabulary rows, d
  columns), σ_i/σ_0 (Fig. 4), and the *singular entropy* KL(σ̂ ‖ uniform) = log k − H(σ̂) with
  σ̂ = σ/Σσ over the k = min(V', d) singular values (Fig. 5; 0 for a flat spectrum, log k for a
  single spike). The σ²-normalised variant (p = σ²/Σσ², the share of energy) is reported beside
  it under its own name.

Which representation each depth is (transformers ``output_hidden_states``, checked at run time
and recorded as ``last_is_head_input``): depth 0 is the embedding output (the input of the
first block); depth l/L the output of block l; for GPT-NeoX (Pythia) and Llama (SmolLM2) in
transformers ≥ 5 the last entry is *after the final norm* — the head's input, the paper's
"last layer" — rather than the raw output of block L. Depth = l / L.

Both run as commands over any list of checkpoints (``python -m rankest anisotropy`` /
``head-spectrum``, one checkpoint loaded at a time, see :mod:`rankest.revisions`) and inside
``estimate --diagnostics`` on the estimate's own batches (:class:`EstimateDiagnostics`).

    python -m rankest anisotropy --tokens 4096 --out runs/aniso
    python -m rankest head-spectrum --teacher pythia-70m --revisions step1000,step143000 --out runs/hs

References: Ethayarajh (2019), "How contextual are contextualized word representations?",
EMNLP, §3 (anisotropy as mean cosine similarity); Roy & Vetterli (2007) (effective rank).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import numpy as np
import torch

from rankest import ops
from rankest.accumulate.base import Accumulator, eigh_lower, svdvals
from rankest.errors import UserError
from rankest.spectrum import Spectrum

__all__ = [
    "Anisotropy",
    "singular_entropy_kl",
    "head_spectrum_metrics",
    "TOP_RATIOS",
    "run_anisotropy",
    "run_head_spectrum",
    "EstimateDiagnostics",
]

#: σ_i/σ_0 is kept for the first TOP_RATIOS singular values (the paper's Fig. 4 heat map).
TOP_RATIOS = 100


# ---- anisotropy ------------------------------------------------------------------------------
class Anisotropy(Accumulator):
    """Streaming, mergeable per-layer anisotropy, mean norm and first-principal-direction share.

    State per layer l (width d_l; layers may differ in width): the fp64 sums Σĥ (d_l,), Σh
    (d_l,), Σ‖h‖, the count of non-zero rows, and — with ``pca`` — the fp64 Gram Σ h hᵀ
    (d_l × d_l, lower triangle, :func:`rankest.ops.gram_update`). Every piece is a plain sum
    over rows, so ``merge`` adds and the result does not depend on the chunking.

    Zero vectors have no direction: they are left out of the anisotropy (n counts the non-zero
    rows of the layer) but kept in the mean norm and the covariance.

    Parameters
    ----------
    widths : sequence of int
        d_l of each representation, embeddings first (L + 1 entries for L blocks).
    pca : bool
        Keep the per-layer Gram for the variance share of the first principal direction.
        Memory 8·Σ d_l² bytes (SmolLM2-135M: 31 × 576² → 82 MB; Pythia-6.9B: 33 × 4096² → 4.4 GB).
    device : torch.device or str
    """

    name = "anisotropy"
    fixed_state_keys = ("widths",)

    def __init__(self, widths: Sequence[int], *, pca: bool = True, device="cpu") -> None:
        super().__init__()
        if len(widths) < 1:
            raise ValueError("Anisotropy needs at least one layer")
        self.widths = [int(w) for w in widths]
        self.pca = bool(pca)
        f64 = dict(dtype=torch.float64, device=device)
        self.unit_sum = [torch.zeros(w, **f64) for w in self.widths]
        self.vec_sum = [torch.zeros(w, **f64) for w in self.widths]
        self.gram = [torch.zeros(w, w, **f64) for w in self.widths] if self.pca else []
        # [Σ‖h‖, number of non-zero rows] per layer.
        self.counts = torch.zeros(len(self.widths), 2, **f64)

    @property
    def n_layers(self) -> int:
        return len(self.widths)

    def update(self, layers: Sequence[torch.Tensor]) -> None:
        """Add n rows of every layer.

        layers : sequence of (n, d_l) tensors (any float dtype), the same n rows in every layer.
        """
        if len(layers) != self.n_layers:
            raise ValueError(f"expected {self.n_layers} layers, got {len(layers)}")
        n = int(layers[0].shape[0])
        for l, h in enumerate(layers):
            if h.dim() != 2 or h.shape[1] != self.widths[l] or h.shape[0] != n:
                raise ValueError(f"layer {l}: expected ({n}, {self.widths[l]}), got {tuple(h.shape)}")
            x = h.to(device=self.unit_sum[l].device, dtype=torch.float64)
            norm = torch.linalg.vector_norm(x, dim=1)
            nonzero = norm > 0
            # Σĥ = (1/‖h‖)ᵀ·H as one matrix-vector product (no n×d copy of unit vectors); a zero
            # row gets weight 0 and contributes nothing.
            inv = torch.where(nonzero, 1.0 / torch.where(nonzero, norm, 1.0), 0.0)
            self.unit_sum[l] += inv @ x
            self.vec_sum[l] += x.sum(dim=0)
            self.counts[l, 0] += norm.sum()
            self.counts[l, 1] += nonzero.sum()
            if self.pca:
                ops.gram_update(self.gram[l], x, "fp64")
        self.n_rows += n

    def _tensors(self) -> dict[str, torch.Tensor]:
        out = {"counts": self.counts}
        for l in range(self.n_layers):
            out[f"unit_sum_{l}"] = self.unit_sum[l]
            out[f"vec_sum_{l}"] = self.vec_sum[l]
            if self.pca:
                out[f"gram_{l}"] = self.gram[l]
        return out

    def merge(self, other: "Anisotropy") -> None:
        self._check_merge(other)
        if other.widths != self.widths or other.pca != self.pca:
            raise ValueError("cannot merge anisotropy accumulators of different layer widths or pca settings")
        theirs = other._tensors()
        for key, mine in self._tensors().items():
            mine += theirs[key].to(mine.device)
        self.n_rows += other.n_rows

    def nbytes(self) -> int:
        """Bytes of the state where it lives (without copying it to the host, as state() would)."""
        return sum(t.numel() * t.element_size() for t in self._tensors().values())

    def state(self) -> dict[str, np.ndarray]:
        out = {k: v.cpu().numpy() for k, v in self._tensors().items()}
        out["widths"] = np.asarray(self.widths, dtype=np.int64)
        out["n_rows"] = np.asarray(self.n_rows)
        return out

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        if [int(w) for w in np.asarray(state["widths"])] != self.widths:
            raise ValueError("the saved anisotropy state has other layer widths")
        for key, mine in self._tensors().items():
            mine.copy_(torch.as_tensor(np.asarray(state[key])))
        self.n_rows = int(np.asarray(state["n_rows"]))

    def finalize(self) -> dict[str, np.ndarray]:
        """Per-layer results (embeddings first), without changing the state.

        Returns
        -------
        dict with (L + 1,) float64 arrays ``anisotropy`` (A(H), NaN for a layer with < 2
        non-zero rows), ``depth`` (l / L), ``mean_norm`` (mean ‖h‖), ``pc1_variance_share``
        (λ_max / trace of the covariance Σhhᵀ/n − μμᵀ, NaN without ``pca``), ``width`` (d_l)
        and ``n_rows``.
        """
        if self.n_rows < 2:
            raise UserError(f"anisotropy needs at least 2 representations per layer, got {self.n_rows}; "
                            "raise --tokens")
        n_layers = self.n_layers
        aniso = np.full(n_layers, np.nan)
        share = np.full(n_layers, np.nan)
        counts = self.counts.cpu().numpy()
        for l in range(n_layers):
            m = counts[l, 1]
            if m >= 2:
                s2 = float(torch.dot(self.unit_sum[l], self.unit_sum[l]))
                aniso[l] = (s2 - m) / (m * m - m)
            if self.pca:
                share[l] = self._pc1_share(l)
        depth = np.arange(n_layers, dtype=np.float64) / max(n_layers - 1, 1)
        return {
            "anisotropy": aniso,
            "depth": depth,
            "mean_norm": counts[:, 0] / self.n_rows,
            "pc1_variance_share": share,
            "width": np.asarray(self.widths, dtype=np.int64),
            "n_rows": np.asarray(self.n_rows, dtype=np.int64),
        }

    def _pc1_share(self, l: int) -> float:
        # Covariance from the raw moments in fp64: C = G/n − μμᵀ. The cancellation costs
        # ≈ 1e-16·‖μ‖²/var relative — negligible unless the spread is 1e-8 of the mean's norm.
        n = float(self.n_rows)
        mu = self.vec_sum[l].cpu() / n
        # Only the lower triangle of the Gram is defined (gram_update); eigh_lower reads only it.
        lam, _ = eigh_lower(self.gram[l].cpu() / n - torch.outer(mu, mu))
        lam = lam.clamp_min(0)
        total = float(lam.sum())
        return float(lam[-1]) / total if total > 0 else float("nan")


# ---- head spectrum ---------------------------------------------------------------------------
def singular_entropy_kl(sigma: np.ndarray, *, power: int = 1) -> float:
    """KL(p ‖ uniform) = log k − H(p) in nats, with p = σ^power / Σσ^power over k values.

    ``power=1`` is the paper's singular entropy (Godey et al. 2024, §4, Fig. 5); ``power=2``
    weighs by energy. 0 for a flat spectrum, log k for a single non-zero value (0·log 0 = 0).
    """
    s = np.asarray(sigma, dtype=np.float64).ravel()
    if s.size == 0:
        raise ValueError("singular_entropy_kl needs at least one singular value")
    if np.any(s < 0) or not np.all(np.isfinite(s)):
        raise ValueError("singular values must be finite and non-negative")
    w = s ** power
    total = w.sum()
    if total == 0:
        return float("nan")
    p = w[w > 0] / total
    return float(math.log(s.size) + np.sum(p * np.log(p)))


def head_spectrum_metrics(weight: torch.Tensor, n_cols: int, *, top: int = TOP_RATIOS) -> dict[str, Any]:
    """Singular spectrum of an LM head's real-vocabulary rows and the paper's measures of it.

    Parameters
    ----------
    weight : (V, d) tensor
        The LM head (rows = vocabulary, possibly padded beyond V').
    n_cols : int
        V': only rows ``[:n_cols]`` belong to real tokens; padded rows are dropped.
    top : int
        How many ratios σ_i/σ_0 to keep.

    Returns
    -------
    dict, keys prefixed ``head_`` (INTERFACES.md): ``head_sigma`` (k = min(V', d), descending,
    fp64 SVD of the fp64 matrix), ``head_sigma_ratio`` (σ_i/σ_0, i < top), ``head_singular_entropy_kl``
    (p = σ/Σσ), ``head_singular_entropy_kl_sq`` (p = σ²/Σσ²), ``head_singular_entropy_max`` (log k),
    ``head_effective_rank``, ``head_stable_rank``, ``head_w_error`` (W-error of the head's own rank-d
    truncation for d = 1 … k, weight space), ``head_rank_at``, ``head_n_rows`` (V'), ``head_n_cols`` (d).
    The bias, if any, is not part of W and is not included.
    """
    if weight is None or weight.dim() != 2:
        raise UserError("the teacher's LM head is not a matrix; head-spectrum needs a linear output head")
    if not 1 <= n_cols <= weight.shape[0]:
        raise UserError(f"the head has {weight.shape[0]} rows but {n_cols} real vocabulary columns were asked for")
    w = weight[:n_cols].detach().to(torch.float64)
    sigma = svdvals(w)
    # The Spectrum's own metric implementations (one copy of each formula): effective rank,
    # stable rank, the W-error curve as suffix sums of σ².
    spec = Spectrum(sigma=sigma, energy=float(np.sum(sigma[::-1] ** 2)), n_rows=int(n_cols),
                    n_cols=int(weight.shape[1]), space="head", route="svd")
    s = spec.sigma
    ratio = s[:top] / s[0] if s.size and s[0] > 0 else np.zeros(min(top, s.size))
    return {
        "head_sigma": s,
        "head_sigma_ratio": ratio,
        "head_singular_entropy_kl": singular_entropy_kl(s, power=1),
        "head_singular_entropy_kl_sq": singular_entropy_kl(s, power=2),
        "head_singular_entropy_max": math.log(s.size),
        "head_effective_rank": spec.effective_rank,
        "head_stable_rank": spec.stable_rank,
        "head_w_error": spec.w_error(),
        "head_rank_at": {k: v for k, v in spec.metrics()["rank_at"].items()},
        "head_n_rows": int(n_cols),
        "head_n_cols": int(weight.shape[1]),
    }


def teacher_head_spectrum(teacher, *, top: int = TOP_RATIOS) -> dict[str, Any]:
    """:func:`head_spectrum_metrics` of a loaded teacher's head over its V' real tokens."""
    weight, bias = teacher.head()  # UserError when the model has no output embeddings
    out = head_spectrum_metrics(weight, teacher.n_cols, top=top)
    out["head_has_bias"] = bias is not None
    return out


# ---- anisotropy of a loaded teacher ---------------------------------------------------------
def teacher_anisotropy(teacher, windows: torch.Tensor, plan, *, batch_size: int = 8, pca: bool = True,
                       quiet: bool = False, desc: str = "anisotropy") -> dict[str, Any]:
    """Run the teacher over the planned rows and return :meth:`Anisotropy.finalize` plus
    ``last_is_head_input`` (whether the last representation equals the head's input)."""
    from tqdm.auto import tqdm

    from rankest.sources.corpus import iter_batches

    acc: Optional[Anisotropy] = None
    last_is_head_input = None
    bar = tqdm(total=plan.n_rows, unit="tok", unit_scale=True, desc=desc, disable=quiet, dynamic_ncols=True)
    with torch.inference_mode():
        for batch in iter_batches(windows, plan, batch_size):
            ids = batch.input_ids.to(teacher.device)
            features, layers = teacher.hidden_states(ids)
            mask = batch.mask.to(teacher.device)
            if acc is None:
                acc = Anisotropy([h.shape[-1] for h in layers], pca=pca, device=teacher.device)
                last_is_head_input = bool(torch.equal(layers[-1], features))
            acc.update([h[mask] for h in layers])
            bar.update(int(mask.sum()))
    bar.close()
    if acc is None:
        raise UserError("the corpus gave no rows for the anisotropy; raise --tokens or use a bigger corpus")
    out: dict[str, Any] = acc.finalize()
    out["last_is_head_input"] = last_is_head_input
    return out


# ---- commands (Python API of `anisotropy` and `head-spectrum`) --------------------------------
_COMMON = dict(teacher=None, revision=None, revisions=None, device="auto", dtype="auto", device_map=None, out=None,
               overwrite=False, resume=False, quiet=False, cache_dir=None)


def _options(kwargs: dict, extra: dict, command: str) -> dict:
    allowed = {**_COMMON, **extra}
    unknown = set(kwargs) - set(allowed)
    if unknown:
        raise TypeError(f"{command}: unknown options {sorted(unknown)}")
    opts = {**allowed, **kwargs}
    if opts["revision"] is not None and opts["revisions"]:
        raise UserError("give either --revision or --revisions, not both")
    if opts["revisions"] is None and opts["revision"] is not None:
        opts["revisions"] = [opts["revision"]]
    if isinstance(opts["revisions"], str):
        opts["revisions"] = [r for r in (x.strip() for x in opts["revisions"].split(",")) if r]
    return opts


def run_anisotropy(**kwargs) -> dict[str, dict[str, Any]]:
    """Per-layer anisotropy of a teacher, or of each of its checkpoints (``rankest.anisotropy``).

    Keyword arguments: ``teacher`` (name, folder or loaded Teacher; default the embedded one),
    ``revisions`` (list or comma-separated; Hub revisions or local folders) or ``revision``,
    ``corpus``, ``tokens`` (rows, default 16384), ``seq_len``, ``positions``, ``sample``,
    ``seed``, ``batch_size``, ``pca`` (default True), ``device``, ``dtype``, ``out`` (run
    folder: anisotropy.h5/.json, report.md section, anisotropy.png), ``overwrite``, ``resume``,
    ``quiet``.

    Returns
    -------
    {revision label: dict} with the arrays of :meth:`Anisotropy.finalize` (``anisotropy``,
    ``depth``, ``mean_norm``, ``pc1_variance_share``, ``width``, ``n_rows``),
    ``last_is_head_input`` and ``source``, in sweep order.
    """
    from rankest.sources.corpus import DEFAULT_CORPUS, check_seq_len, load_documents, pack_windows, plan_rows

    opts = _options(kwargs, dict(corpus=None, tokens=16384, seq_len=256, positions="all", sample="windows",
                                 seed=0, batch_size=8, pca=True), "anisotropy")
    if opts["tokens"] is not None and int(opts["tokens"]) < 2:
        raise UserError(f"anisotropy needs at least 2 representations (--tokens ≥ 2), got {opts['tokens']}")
    if int(opts["seq_len"]) < 1 or int(opts["batch_size"]) < 1:
        raise UserError("--seq-len and --batch-size must be positive integers")
    corpus = opts["corpus"] or DEFAULT_CORPUS
    docs = load_documents(corpus)  # a typo in --corpus fails before any model is loaded

    def compute(teacher) -> dict[str, Any]:
        check_seq_len(int(opts["seq_len"]), teacher.context_length)
        tokens = opts["tokens"]
        per_window = int(opts["seq_len"]) if opts["positions"] == "all" else 1
        max_windows = None if tokens is None else math.ceil(max(8 * int(tokens), 2**20) / per_window)
        windows = pack_windows(docs, teacher.tokenizer, int(opts["seq_len"]), max_windows=max_windows,
                               progress=not opts["quiet"])
        plan = plan_rows(len(windows), int(opts["seq_len"]), positions=opts["positions"], tokens=tokens,
                         seed=int(opts["seed"]), sample=opts["sample"])
        return teacher_anisotropy(teacher, windows, plan, batch_size=int(opts["batch_size"]), pca=opts["pca"],
                                  quiet=opts["quiet"], desc=f"anisotropy {teacher.name}")

    config = {k: opts[k] for k in ("tokens", "seq_len", "positions", "sample", "seed", "pca")}
    config["corpus"] = corpus if isinstance(corpus, str) else ",".join(map(str, corpus))
    return _sweep("anisotropy", opts, compute, config)


def run_head_spectrum(**kwargs) -> dict[str, dict[str, Any]]:
    """Singular spectrum of the LM head of a teacher or of each checkpoint (``rankest.head_spectrum``).

    Keyword arguments: ``teacher``, ``revisions`` / ``revision``, ``top`` (ratios kept, default
    100), ``device``, ``dtype``, ``out`` (head_spectrum.h5/.json, report.md section, PNGs),
    ``overwrite``, ``resume``, ``quiet``.

    Returns
    -------
    {revision label: dict of :func:`head_spectrum_metrics` + ``source``}, in sweep order.
    """
    opts = _options(kwargs, dict(top=TOP_RATIOS), "head-spectrum")
    if int(opts["top"]) < 1:
        raise UserError(f"top must be a positive integer, got {opts['top']}")
    return _sweep("head_spectrum", opts, lambda t: teacher_head_spectrum(t, top=int(opts["top"])),
                  {"top": int(opts["top"])})


def _sweep(kind: str, opts: dict, compute, config: dict) -> dict[str, dict[str, Any]]:
    from rankest.report.diagnostics import write_diagnostics_report
    from rankest.sources.revisions import resolve_checkpoints, sweep_checkpoints
    from rankest.sources.teachers import DEFAULT_TEACHER

    teacher = opts["teacher"] if opts["teacher"] is not None else DEFAULT_TEACHER
    checkpoints = resolve_checkpoints(teacher, opts["revisions"], cache_dir=opts["cache_dir"])
    config = {**config, "teacher": getattr(teacher, "name", str(teacher)),
              "revisions": [c.label for c in checkpoints], "device": str(opts["device"]), "dtype": str(opts["dtype"]),
              "device_map": opts["device_map"]}
    results = sweep_checkpoints(kind, checkpoints, compute, out=opts["out"], config=config,
                                device=opts["device"], dtype=opts["dtype"], device_map=opts["device_map"],
                                overwrite=opts["overwrite"],
                                resume=opts["resume"], quiet=opts["quiet"], cache_dir=opts["cache_dir"])
    if opts["out"] is not None:
        write_diagnostics_report(opts["out"], **{kind: results}, teacher=config["teacher"])
    return results


# ---- inside `estimate --diagnostics` ---------------------------------------------------------
class EstimateDiagnostics:
    """Anisotropy and head spectrum on the estimate's own batches (no extra forward pass).

    The estimate asks the teacher for every layer's hidden states in the same forward that gives
    its features (:meth:`rankest.teachers.Teacher.hidden_states`), feeds the sampled rows of each
    layer here, and at the end :meth:`finish` writes anisotropy.* and head_spectrum.* into the
    run folder under their own keys (:meth:`write`); :meth:`summary` gives the few keys the
    estimate's results.json carries (``anisotropy``, ``depth``, ``head_singular_entropy_kl``, …).
    """

    def __init__(self, teacher, *, pca: bool = True) -> None:
        self.teacher = teacher
        self.pca = pca
        # The layers' widths (and whether the last is the head's input) from a one-token forward,
        # so that the accumulator exists before the first batch: a checkpoint, a resume and the
        # processes of a torchrun job (all summing the same layout) need it from the start.
        features, layers = teacher.hidden_states(torch.zeros(1, 1, dtype=torch.long))
        self.acc = Anisotropy([h.shape[-1] for h in layers], pca=pca, device=teacher.device)
        self.last_is_head_input = bool(torch.equal(layers[-1], features))
        self._results: Optional[tuple[dict[str, Any], dict[str, Any]]] = None

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """One forward: returns the (B, L, d) features and accumulates the masked rows of every layer."""
        features, layers = self.teacher.hidden_states(ids)
        self.acc.update([h[mask] for h in layers])
        return features

    def results(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(anisotropy result, head spectrum result), computed once."""
        if self._results is None:
            aniso: dict[str, Any] = self.acc.finalize()
            aniso["last_is_head_input"] = self.last_is_head_input
            aniso["source"] = self.teacher.source
            head = teacher_head_spectrum(self.teacher)
            head["source"] = self.teacher.source
            self._results = (aniso, head)
        return self._results

    def summary(self) -> dict[str, Any]:
        """The keys the estimate adds to its own results (results.json): INTERFACES.md names."""
        aniso, head = self.results()
        return {
            "anisotropy": aniso["anisotropy"].tolist(), "depth": aniso["depth"].tolist(),
            "head_singular_entropy_kl": head["head_singular_entropy_kl"],
            "head_singular_entropy_kl_sq": head["head_singular_entropy_kl_sq"],
            "head_effective_rank": head["head_effective_rank"],
        }

    def write(self, out, *, config: dict, prov: dict) -> None:
        """anisotropy.{h5,json}, head_spectrum.{h5,json}, the PNGs and the report.md sections in
        the run folder ``out`` (after the estimate's own report.md, whose content is kept)."""
        from rankest.report.diagnostics import write_diagnostics_report
        from rankest.sources.revisions import write_results

        aniso, head = self.results()
        label = self.teacher.revision or self.teacher.name
        write_results(out, "anisotropy", {label: aniso}, config=config, prov=prov)
        write_results(out, "head_spectrum", {label: head}, config=config, prov=prov)
        write_diagnostics_report(out, anisotropy={label: aniso}, head_spectrum={label: head},
                                 teacher=self.teacher.name)
