"""The ``--family`` part of ``heads``: which heads to build, and the table of what they reached.

For every family × rank of the sweep × replicate a head is built (:func:`family_specs`): at the
rank itself, or with ``--match-params`` at the largest rank of the family whose parameter count
does not exceed the linear head's of that rank. After training, :func:`family_table` gathers
per head the validation loss, accuracy, the gap to the teacher's own loss, the loss at its init,
its parameter count and the rank of its own output distribution (:mod:`rankest.heads.output_rank`),
and per family × rank the mean ± 95 % interval over replicates and per family the knee of loss vs
rank (:mod:`rankest.heads.intervals`).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

from rankest.heads.families import FamilySpec, family_class, parse_families, rank_for_params
from rankest.heads.family_sweep import FamilyHeadSpec
from rankest.heads.intervals import knee, mean_interval
from rankest.heads.output_rank import output_rank_summary, output_spectrum
from rankest.spectrum import Spectrum


def family_specs(families: Sequence[FamilySpec], ranks: Sequence[int], labels: Sequence[str], lrs: Sequence[float],
                 *, seeds: int, match_params: bool, d: int, n_cols: int, bias: bool) -> list[FamilyHeadSpec]:
    """Every family × rank × replicate head, the LR of its nominal rank (the sweep's)."""
    out = []
    for fam in families:
        for r, lab, lr in zip(ranks, labels, lrs):
            own = r
            if match_params:
                target = family_class(FamilySpec("linear")).count(d, n_cols, r, bias=bias)
                own = rank_for_params(fam, target, d, n_cols, bias=bias)
            out += [FamilyHeadSpec(fam, lab, r, own, s, lr) for s in range(seeds)]
    return out


def families_of(spec) -> Optional[list[FamilySpec]]:
    return None if spec is None else parse_families(spec)


def output_spectra(sweep, rows, n_cols: int, teacher_log_probs) -> tuple[list[Spectrum], Spectrum]:
    """The clr spectrum of every head's log-prob matrix on ``rows``, and the teacher's own."""
    chunk = sweep.chunk
    specs = [output_spectrum(head, rows.to(sweep.dtype), n_cols, chunk=chunk) for head in sweep.heads]
    return specs, output_spectrum(teacher_log_probs, rows.to(sweep.dtype), n_cols, chunk=chunk)


def family_table(specs: Sequence[FamilyHeadSpec], n_params: Sequence[int], evals: Sequence[dict],
                 init_evals: Sequence[dict], reference: dict, spectra: Sequence[Spectrum], teacher_spectrum: Spectrum,
                 *, knee_threshold: float, seed: int) -> dict:
    """The JSON-able families table: ``heads`` (one entry per trained head), ``groups`` (per
    family × rank: mean ± interval over replicates) and ``knees`` (per family)."""
    heads = []
    for sp, n, e, e0, spec in zip(specs, n_params, evals, init_evals, spectra):
        heads.append({"family": sp.family.label, "label": sp.label, "nominal_rank": sp.nominal_rank,
                      "rank": sp.rank, "replicate": sp.replicate, "lr": sp.lr, "n_params": int(n),
                      "val_loss": e["loss"], "val_accuracy": e["accuracy"], "val_kl": e.get("kl"),
                      "gap_to_teacher": e["loss"] - reference["loss"], "init_loss": e0["loss"],
                      "output_rank": output_rank_summary(spec)})
    groups, knees = [], {}
    for fam in dict.fromkeys(h["family"] for h in heads):
        mine = [h for h in heads if h["family"] == fam]
        labels = list(dict.fromkeys(h["label"] for h in mine))
        curve = []
        for lab in labels:
            g = [h for h in mine if h["label"] == lab]
            loss, half = mean_interval([h["val_loss"] for h in g])
            kl = [h["val_kl"] for h in g if h["val_kl"] is not None]
            nr = [h["output_rank"]["numerical_rank"] for h in g]
            tr = [h["output_rank"]["resolved_rank"] for h in g]
            groups.append({"family": fam, "label": lab, "nominal_rank": g[0]["nominal_rank"], "rank": g[0]["rank"],
                           "n_params": g[0]["n_params"], "seeds": len(g), "val_loss": loss, "val_loss_ci95": half,
                           "val_accuracy": float(np.mean([h["val_accuracy"] for h in g])),
                           "gap_to_teacher": loss - reference["loss"],
                           "val_kl": float(np.mean(kl)) if kl else None,
                           "val_kl_ci95": mean_interval(kl)[1] if kl else None,
                           "output_numerical_rank": float(np.mean(nr)), "output_numerical_rank_min": int(min(nr)),
                           "output_numerical_rank_max": int(max(nr)), "output_resolved_rank": float(np.mean(tr)),
                           "output_resolved_rank_min": int(min(tr)), "output_resolved_rank_max": int(max(tr))})
            curve.append([h["val_loss"] for h in g])
        ranks = [next(h["nominal_rank"] for h in mine if h["label"] == lab) for lab in labels]
        knees[fam] = knee(ranks, np.array(curve).T, knee_threshold, seed=seed)
    return {"heads": heads, "groups": groups, "knees": knees, "rank_rows": teacher_spectrum.n_rows,
            "teacher_output_rank": output_rank_summary(teacher_spectrum)}


def worse_than_init(labels: Sequence[str], evals: Sequence[dict], init_evals: Sequence[dict]) -> list[str]:
    """'label (init → trained)' for every head whose validation loss training raised above its init's."""
    return [f"{lab} ({e0['loss']:.3f} → {e['loss']:.3f})" for lab, e, e0 in zip(labels, evals, init_evals)
            if math.isfinite(e0["loss"]) and e["loss"] > e0["loss"]]
