"""From curves to findings: each model's best, onset and distance from the scaling law.

A *curve* is one model's metric across its checkpoints, with its parameter counts. The law
(:mod:`rankest.saturation.lawfit`) is fitted on the final (``--fit-at best``: best) checkpoints
of the models of ``--fit-on`` — by default those that do not saturate
(:mod:`rankest.saturation.onset`) — and every model is compared with it.

**Deviation** (relative, as Godey et al. 2024 state it, §3, Fig. 1): for a model of size N with
value v and the law's prediction L(N),

    deviation = s·(v − L(N)) / |L(N)|,   s = +1 when lower is better, −1 otherwise

so a positive deviation is always *worse than the law* (the paper: small Pythias' final
checkpoints are about 8% worse, their best about 4%). Its interval maps the bootstrap interval
of L(N) through the same formula.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from rankest.errors import UserError
from rankest.saturation.lawfit import PowerLawFit, fit_power_law
from rankest.saturation.onset import Onset, detect_onset

__all__ = ["Curve", "analyse", "deviation", "PAPER"]

#: Godey et al. (2024), §3 / Fig. 1: the small Pythias' relative gap to the scaling law of the larger
#: ones, averaged over the evaluation tasks.
PAPER = {"deviation_final": 0.08, "deviation_best": 0.04, "source": "Godey et al. 2024, arXiv 2404.07647, §3"}


@dataclass
class Curve:
    """One model's metric over its checkpoints (steps ascending) and its sizes."""

    model: str
    steps: np.ndarray
    values: np.ndarray
    stderr: Optional[np.ndarray]  # None when the inputs give none
    params: dict[str, int]
    source: str  # "lm-eval" | "rankest"
    diagnostics: dict[str, Any] = field(default_factory=dict)  # per checkpoint arrays, --diagnostics


def deviation(value: float, predicted, lower_is_better: bool):
    """s·(v − L)/|L| (module docstring): positive is worse than the law."""
    p = np.asarray(predicted, dtype=np.float64)
    s = 1.0 if lower_is_better else -1.0
    return s * (value - p) / np.abs(p)


def _at(curve: Curve, step: int) -> tuple[float, Optional[float]]:
    i = int(np.flatnonzero(curve.steps == step)[0])
    return float(curve.values[i]), None if curve.stderr is None else float(curve.stderr[i])


def analyse(curves: dict[str, Curve], *, lower_is_better: bool, fit_on: list[str], fit_at: str, param_count: str,
            confidence: float, n_boot: int, seed: int, onset_sigma: float, onset_points: int) -> dict[str, Any]:
    """Onsets, the fit and every model's deviation (models ordered by size).

    Returns
    -------
    (record, fit): the record of saturation.json (without config and provenance) and the
    :class:`PowerLawFit`.
    """
    curves = dict(sorted(curves.items(), key=lambda kv: (kv[1].params[param_count], kv[0])))  # by size
    onsets: dict[str, Onset] = {}
    for name, c in curves.items():
        onsets[name] = detect_onset(c.steps, c.values, None if c.stderr is None else list(c.stderr),
                                    lower_is_better=lower_is_better, sigma=onset_sigma, min_points=onset_points)
    unknown = [m for m in fit_on if m not in curves]
    if unknown:
        raise UserError(f"--fit-on names {', '.join(unknown)}, not among the models ({', '.join(curves)}); use their "
                        "names as the report lists them")
    chosen = fit_on or [m for m in curves if not onsets[m].saturated]
    if len(chosen) < 3:
        raise UserError(f"only {len(chosen)} model(s) to fit the scaling law on ({', '.join(chosen) or 'none'} do not "
                        "saturate); name at least 3 with --fit-on")
    pts = [_at(curves[m], onsets[m].final_step if fit_at == "final" else onsets[m].best_step) for m in chosen]
    se = [p[1] for p in pts]
    fit: PowerLawFit = fit_power_law([curves[m].params[param_count] for m in chosen], [p[0] for p in pts],
                                     se if all(s is not None and s > 0 for s in se) else None,
                                     n_boot=n_boot, confidence=confidence, seed=seed)
    models: dict[str, Any] = {}
    for name, c in curves.items():
        o = onsets[name]
        n = c.params[param_count]
        pred = float(fit.predict([n])[0])
        lo, hi = (float(v[0]) for v in fit.predict_interval([n]))
        rec = {"source": c.source, "params_total": c.params["total"], "params_non_embedding": c.params["non_embedding"],
               "n_params": n, "steps": c.steps.tolist(), "values": c.values.tolist(),
               "stderr": None if c.stderr is None else c.stderr.tolist(),
               "final": o.final, "final_step": o.final_step, "best": o.best, "best_step": o.best_step,
               "onset_step": o.onset_step, "saturated": o.saturated, "noise": o.noise, "noise_source": o.noise_source,
               "in_fit": name in chosen, "predicted": pred, "predicted_interval": [lo, hi]}
        for key, v in (("final", o.final), ("best", o.best)):
            d = deviation(v, [pred, lo, hi], lower_is_better)
            rec[f"deviation_{key}"] = float(d[0])
            rec[f"deviation_{key}_interval"] = [float(min(d[1:])), float(max(d[1:]))]
        rec.update(c.diagnostics)
        models[name] = rec
    outside = [m for m in models if not models[m]["in_fit"]]
    mean = {f"mean_deviation_{k}_outside_fit": (float(np.mean([models[m][f"deviation_{k}"] for m in outside]))
                                                if outside else None) for k in ("final", "best")}
    return {"lower_is_better": lower_is_better, "fit_on": chosen, "fit_on_default": not fit_on, "fit_at": fit_at,
            "param_count": param_count, "fit": fit.summary(), "models": models,
            "saturated": [m for m in models if models[m]["saturated"]], **mean,
            "paper": PAPER if all(m.startswith("pythia-") for m in curves) else None}, fit
