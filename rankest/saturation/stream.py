"""rankest's own evaluation of checkpoints: NLL, perplexity and accuracy over a corpus, streamed.

For each model checkpoint of ``--teachers A,B --revisions stepX,stepY`` (every teacher at every
revision) the planned rows of the corpus (:func:`rankest.sources.rows.plan_rows`, the same row
plan as ``estimate``: same ``--tokens``, ``--seq-len``, ``--positions``, ``--sample``,
``--seed``) are run through the model batch by batch. Per row i with logits z_i restricted to
the V' real tokens and next token y_i:

    nll_i = logsumexp(z_i) − z_i[y_i],  correct_i = [argmax z_i = y_i],  H_i = entropy of softmax(z_i)

and the sums Σ nll, Σ nll², n, Σ correct, Σ H are accumulated in fp64 (Σ nll² gives the
standard error of the mean NLL, s = √(var/n), which treats rows as independent: rows of one
window are correlated, so it is a lower bound). Perplexity = exp(mean NLL).

With ``--diagnostics`` the same forward pass also gives the last layer's anisotropy
(:class:`rankest.accumulate.anisotropy.Anisotropy` on the head's input), and each checkpoint's
head gets its singular spectrum (:func:`rankest.diagnostics.head_spectrum.head_spectrum_metrics`)
and the **token-frequency share** of its top singular directions: for the left singular vector
u_j of the head W' (V'×d, ‖u_j‖ = 1), the mass Σ_{v ∈ F} u_jv² on the set F of the 1% (10%)
most frequent tokens of the evaluated rows' targets; a direction spread evenly has mass |F|/V'.

The run is one :class:`rankest.runtime.run.Run`: units are the batches of each checkpoint in
turn; ``--checkpoint-every`` and signals write ``checkpoint.h5`` with every sum so far and the
position (checkpoint k, next batch); ``--resume`` continues from it. Under torchrun the batches
of each round go to the processes (batch b to rank b mod P) and the sums are added onto rank 0.
"""

from __future__ import annotations

import gc
import re
from typing import Any, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from rankest.accumulate.anisotropy import Anisotropy
from rankest.diagnostics.head_spectrum import TOP_RATIOS, head_spectrum_metrics
from rankest.errors import UserError
from rankest.runtime import distributed
from rankest.sources import teachers
from rankest.sources.corpus import check_seq_len, pack_windows, plan_rows
from rankest.sources.revisions import resolve_checkpoints
from rankest.sources.rows import iter_batches, windows_needed

__all__ = ["StreamedEval", "row_sums", "frequency_shares", "param_counts_of_model", "step_of", "TOP_DIRECTIONS"]

#: Top singular directions of the head whose token-frequency share is measured.
TOP_DIRECTIONS = 8
#: Fractions of the vocabulary counted as "most frequent".
FREQ_FRACTIONS = (0.01, 0.10)
#: Rows per logits block (memory: rows × V' × 4 bytes).
_ROW_BLOCK = 512
#: Per checkpoint: Σ nll, Σ nll², n, Σ correct, Σ entropy.
_N_SUMS = 5
#: Per checkpoint, --diagnostics: last-layer anisotropy, singular entropy KL (σ, σ²), log k,
#: effective rank, stable rank.
_N_DIAG = 6


def step_of(label: str) -> int:
    """The training step a revision names (``step1000``, ``runs/ckpts/step1000``), for the step axis."""
    found = re.findall(r"step(\d+)", str(label))
    if not found:
        raise UserError(f"revision {label!r} names no step; name checkpoints stepN (e.g. step1000) so they can be "
                        "placed on the step axis")
    return int(found[-1])


def row_sums(logits: torch.Tensor, targets: torch.Tensor) -> np.ndarray:
    """[Σ nll, Σ nll², n, Σ correct, Σ entropy] of rows ``logits`` (n, V') with next tokens ``targets``."""
    z = logits.float()
    logz = torch.logsumexp(z, dim=-1)
    nll = (logz - z.gather(1, targets[:, None]).squeeze(1)).double()
    p = torch.softmax(z, dim=-1)
    entropy = (logz - (p * z).sum(-1)).double()
    correct = (z.argmax(-1) == targets).double()
    return np.array([float(nll.sum()), float((nll * nll).sum()), float(nll.numel()), float(correct.sum()),
                     float(entropy.sum())])


def frequency_shares(weight: torch.Tensor, counts: np.ndarray, *, top: int = TOP_DIRECTIONS) -> np.ndarray:
    """(top, len(FREQ_FRACTIONS)) mass of each top left singular vector of ``weight`` (V', d) on the
    most frequent tokens of ``counts`` (V',); the left vectors come from the d×d Gram (fp64):
    u_j = W v_j / σ_j."""
    w = weight.detach().to(torch.float64).cpu()
    lam, vecs = torch.linalg.eigh(w.T @ w)
    order = torch.argsort(lam, descending=True)[:top]
    sig = lam[order].clamp_min(0).sqrt()
    u = (w @ vecs[:, order]) / sig.clamp_min(1e-300)
    mass = (u * u).numpy()  # (V', top), columns sum to 1
    rank = np.argsort(-np.asarray(counts, dtype=np.float64), kind="stable")
    out = np.zeros((top, len(FREQ_FRACTIONS)))
    for c, frac in enumerate(FREQ_FRACTIONS):
        chosen = rank[: max(1, int(round(frac * len(rank))))]
        out[: mass.shape[1], c] = mass[chosen].sum(axis=0)
    return out


def param_counts_of_model(model) -> dict[str, int]:
    """Total and non-embedding parameters of a loaded model, from ``numel`` (tied weights once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    emb = {id(m.weight): m.weight.numel() for m in (model.get_input_embeddings(), model.get_output_embeddings())
           if m is not None}
    return {"total": int(total), "non_embedding": int(total - sum(emb.values()))}


class StreamedEval:
    """The evaluation of a list of checkpoints as one run (module docstring).

    ``checkpoints``: [(model name, revision label, Checkpoint)], in order; ``docs`` the corpus's
    documents; ``opts`` the command's options (tokens, seq_len, positions, sample, seed,
    batch_size, device, dtype, diagnostics, quiet).
    """

    def __init__(self, checkpoints: list, docs: list[str], opts: dict, run, world: distributed.World) -> None:
        self.checkpoints = checkpoints
        self.docs = docs
        self.opts = opts
        self.run = run
        self.world = world
        k = len(checkpoints)
        self.sums = np.zeros((k, _N_SUMS))
        self.diag = np.zeros((k, _N_DIAG))
        self.ratio = np.zeros((k, TOP_RATIOS))
        self.freq = np.zeros((k, TOP_DIRECTIONS, len(FREQ_FRACTIONS)))
        self.params = np.zeros((k, 2))
        self.aniso: Optional[Anisotropy] = None
        self.aniso_state: Optional[dict] = None

    # ---- state --------------------------------------------------------------------------------
    def state(self) -> dict[str, np.ndarray]:
        out = {"sums": self.sums, "diag": self.diag, "ratio": self.ratio, "freq": self.freq, "params": self.params}
        if self.aniso is not None:
            out.update({f"aniso_{k}": v for k, v in self.aniso.state().items()})
        return out

    def _save(self, k: int, next_batch: int) -> None:
        fixed = ("aniso_widths",)
        total = distributed.reduce_state(self.world, self.state(), fixed)
        self.run.save(position={"model": k, "next_batch": next_batch}, states={"saturation_eval": total})

    def _restore(self) -> tuple[int, int]:
        if self.run.position is None:
            return 0, 0
        saved = self.run.saved_states(["saturation_eval"])
        if saved is not None:  # rank 0 holds the sums so far; the others add from zero
            s = saved["saturation_eval"]
            self.sums, self.diag, self.ratio = s["sums"].copy(), s["diag"].copy(), s["ratio"].copy()
            self.freq, self.params = s["freq"].copy(), s["params"].copy()
            if "aniso_widths" in s:
                self.aniso_state = {k[len("aniso_"):]: v for k, v in s.items() if k.startswith("aniso_")}
        return int(self.run.position["model"]), int(self.run.position["next_batch"])

    # ---- one checkpoint -------------------------------------------------------------------------
    def _plan(self, teacher):
        o = self.opts
        check_seq_len(int(o["seq_len"]), teacher.context_length)
        windows = pack_windows(self.docs, teacher.tokenizer, int(o["seq_len"]),
                               max_windows=windows_needed(o["tokens"], int(o["seq_len"]), o["positions"]),
                               progress=False)
        plan = plan_rows(len(windows), int(o["seq_len"]), positions=o["positions"], tokens=o["tokens"],
                         seed=int(o["seed"]), sample=o["sample"])
        return windows, plan

    def _head_diagnostics(self, k: int, teacher, windows, plan) -> None:
        weight, _ = teacher.head()
        w = weight[: teacher.n_cols]
        m = head_spectrum_metrics(weight, teacher.n_cols)
        self.diag[k, 1:] = [m["head_singular_entropy_kl"], m["head_singular_entropy_kl_sq"],
                            m["head_singular_entropy_max"], m["head_effective_rank"], m["head_stable_rank"]]
        r = np.asarray(m["head_sigma_ratio"])
        self.ratio[k, : r.size] = r
        targets = windows[plan.windows][:, 1:][plan.positions]
        counts = np.bincount(targets.numpy().ravel(), minlength=teacher.n_cols)[: teacher.n_cols]
        self.freq[k] = frequency_shares(w, counts)

    def _evaluate(self, k: int, teacher, start: int) -> None:
        o = self.opts
        windows, plan = self._plan(teacher)
        n_batches = -(-plan.windows.numel() // int(o["batch_size"]))
        if self.world.main and start == 0:
            self.params[k] = list(param_counts_of_model(teacher.model).values())
            if o["diagnostics"]:
                self._head_diagnostics(k, teacher, windows, plan)
        if o["diagnostics"]:
            self.aniso = Anisotropy([teacher.hidden_size], pca=False, device=teacher.device)
            if self.aniso_state is not None and self.world.main:
                self.aniso.load_state(self.aniso_state)
            self.aniso_state = None
        bar = tqdm(total=n_batches - start, desc=f"eval {self.checkpoints[k][0]}@{self.checkpoints[k][1]}",
                   unit="batch", disable=o["quiet"] or not self.world.main, dynamic_ncols=True)
        P = self.world.size
        for u in self.run.units(start, n_batches, stride=P, save=lambda done: self._save(k, done),
                                stopped=lambda done: f"stopped at batch {done} of {n_batches} of checkpoint "
                                                     f"{k + 1} of {len(self.checkpoints)}"):
            b = u + self.world.rank
            if b < n_batches:  # batch b of the plan, made on demand (never the whole list)
                bs = int(o["batch_size"])
                self._batch(k, teacher, next(iter_batches(windows, plan, bs, start=b * bs)))
            bar.update(min(P, n_batches - u))
        bar.close()
        if o["diagnostics"]:
            total = distributed.reduce_state(self.world, self.aniso.state(), ("widths",))
            if self.world.main:
                self.aniso.load_state(total)
                self.diag[k, 0] = float(self.aniso.finalize()["anisotropy"][-1])
            self.aniso = None

    def _batch(self, k: int, teacher, batch) -> None:
        ids = batch.input_ids.to(teacher.input_device)
        mask = batch.mask.to(teacher.device)
        with torch.inference_mode():
            features = teacher.features(ids)
            h = features[mask]
            y = batch.targets.to(teacher.device)[mask]
            if self.aniso is not None:
                self.aniso.update([h])
            for lo in range(0, h.shape[0], _ROW_BLOCK):
                z = teacher.logits(h[lo: lo + _ROW_BLOCK])[:, : teacher.n_cols]
                self.sums[k] += row_sums(z, y[lo: lo + _ROW_BLOCK])

    # ---- the run -------------------------------------------------------------------------------
    def compute(self) -> list[dict[str, Any]]:
        """Evaluate every checkpoint not finished; rank 0 returns one result dict per checkpoint."""
        k0, b0 = self._restore()
        for k in range(k0, len(self.checkpoints)):
            model, label, ckpt = self.checkpoints[k]
            with teachers.quiet_loading(self.opts["quiet"]):
                teacher = ckpt.target if ckpt.loaded else teachers.load_teacher(
                    ckpt.target, revision=ckpt.revision, device=self.opts["device"], dtype=self.opts["dtype"])
            try:
                self._evaluate(k, teacher, b0 if k == k0 else 0)
            finally:
                if not ckpt.loaded:
                    del teacher
                    gc.collect()
            if k + 1 < len(self.checkpoints) and self.run.enabled:
                self._save(k + 1, 0)  # a finished checkpoint is never evaluated again
        totals = {name: distributed.reduce_state(self.world, {name: v})
                  for name, v in (("sums", self.sums), ("diag", self.diag), ("ratio", self.ratio),
                                  ("freq", self.freq), ("params", self.params))}
        if not self.world.main:
            return []
        return [self._result(i, {n: t[n][i] for n, t in totals.items()}) for i in range(len(self.checkpoints))]

    def _result(self, i: int, t: dict) -> dict[str, Any]:
        model, label, _ = self.checkpoints[i]
        s_nll, s_nll2, n, s_ok, s_h = t["sums"]
        mean = s_nll / n
        var = max(s_nll2 / n - mean * mean, 0.0)
        out = {"model": model, "revision": label, "step": step_of(label), "n_rows": int(n), "nll": mean,
               "nll_stderr": float(np.sqrt(var / max(n - 1, 1))), "ppl": float(np.exp(mean)),
               "acc": s_ok / n, "acc_stderr": float(np.sqrt(max(s_ok / n * (1 - s_ok / n), 0) / max(n - 1, 1))),
               "entropy": s_h / n, "params_total": int(t["params"][0]), "params_non_embedding": int(t["params"][1])}
        out["ppl_stderr"] = out["ppl"] * out["nll_stderr"]
        if self.opts["diagnostics"]:
            keys = ("last_layer_anisotropy", "head_singular_entropy_kl", "head_singular_entropy_kl_sq",
                    "head_singular_entropy_max", "head_effective_rank", "head_stable_rank")
            out.update({k: float(v) for k, v in zip(keys, t["diag"])})
            out["head_sigma_ratio"] = np.asarray(t["ratio"])
            out["freq_share_top1pct"] = np.asarray(t["freq"][:, 0])
            out["freq_share_top10pct"] = np.asarray(t["freq"][:, 1])
        return out


def resolve_stream(teacher_names: list[str], revisions: list[str], cache_dir=None) -> list:
    """[(model, revision label, Checkpoint)] of every teacher at every revision, checked first."""
    out = []
    for name in teacher_names:
        model = str(name).rstrip("/").split("/")[-1]
        for ckpt in resolve_checkpoints(name, revisions, cache_dir=cache_dir):
            step_of(ckpt.label)
            out.append((model, ckpt.label, ckpt))
    return out
