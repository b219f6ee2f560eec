"""``python -m rankest saturation``: the command's steps.

1. check the options (:class:`~rankest.saturation.config.SaturationConfig`) and open the run
   folder (:class:`rankest.runtime.run.Run`; ``--resume`` reads its checkpoint);
2. read the evaluation files (:mod:`rankest.saturation.evals`) and / or evaluate the
   checkpoints of ``--teachers`` (:mod:`rankest.saturation.stream`, checkpointed, torchrun);
3. one curve per model with its parameter counts (:mod:`rankest.saturation.params`, or the
   loaded model's ``numel``);
4. onsets, the law, deviations (:mod:`rankest.saturation.analysis`);
5. ``saturation.json``, ``saturation.h5``, ``saturation.md`` and the PNGs
   (:mod:`rankest.report.saturation`), then the checkpoint is removed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np

from rankest.errors import UserError
from rankest.io.files import now_iso, to_json, write_text_atomic
from rankest.io.results import provenance
from rankest.options import keyword_options
from rankest.report.saturation import write_saturation_report
from rankest.runtime import distributed
from rankest.runtime.run import Run, run_config
from rankest.saturation.analysis import Curve, analyse
from rankest.saturation.config import SaturationConfig
from rankest.saturation.evals import collect_metric, eval_paths, lower_is_better, parse_metric, read_eval_file, read_map
from rankest.saturation.params import param_counts
from rankest.saturation.result import DIAGNOSTIC_KEYS, write_saturation_h5
from rankest.saturation.stream import StreamedEval, resolve_stream
from rankest.sources.corpus import DEFAULT_CORPUS, load_documents

__all__ = ["run_saturation", "STREAM_METRICS"]

#: Metrics of rankest's own streamed evaluation.
STREAM_METRICS = ("nll", "ppl", "acc")


def _eval_curves(cfg, task: str, metric: str) -> dict[str, Curve]:
    mapping = read_map(cfg.map) if cfg.map else None
    files = [read_eval_file(p, mapping) for p in eval_paths(cfg.evals)]
    curves = {}
    for model, points in collect_metric(files, task, metric).items():
        steps = np.array(list(points), dtype=np.int64)
        se = [points[s][1] for s in points]
        curves[model] = Curve(model, steps, np.array([points[s][0] for s in points]),
                              np.array(se, dtype=float) if all(x is not None for x in se) else None,
                              param_counts(model, given=cfg.params), "lm-eval")
    return curves


def _stream_curves(results: list[dict], metric: str, given: dict) -> dict[str, Curve]:
    by_model: dict[str, list[dict]] = {}
    for r in results:
        by_model.setdefault(r["model"], []).append(r)
    curves = {}
    for model, rs in by_model.items():
        rs = sorted(rs, key=lambda r: r["step"])
        steps = np.array([r["step"] for r in rs], dtype=np.int64)
        if len(set(steps.tolist())) != len(steps):
            raise UserError(f"two revisions of {model} name the same step; name each checkpoint stepN once")
        params = (param_counts(model, given=given) if model in given
                  else {"total": rs[-1]["params_total"], "non_embedding": rs[-1]["params_non_embedding"]})
        diag = {k: [np.asarray(r[k]).tolist() for r in rs] for k in DIAGNOSTIC_KEYS if k in rs[0]}
        diag.update({k: [r[k] for r in rs] for k in ("n_rows", "nll", "ppl", "acc", "entropy")})
        curves[model] = Curve(model, steps, np.array([r[metric] for r in rs]),
                              np.array([r[f"{metric}_stderr"] for r in rs]), params, "rankest", diag)
    return curves


@keyword_options(SaturationConfig)
def run_saturation(**kwargs) -> Optional[dict[str, Any]]:
    """Saturation of a suite of models across checkpoints against a scaling law (module docstring).

    Returns
    -------
    The record of saturation.json (None on a torchrun process other than rank 0).
    """
    cfg = SaturationConfig.from_kwargs(kwargs)
    spec = cfg.metric or ("lambada_openai:ppl" if cfg.evals else "nll")
    task, metric = parse_metric(spec)
    if cfg.evals and task is None:
        raise UserError(f"--metric {spec} names no task; evaluation files need TASK:METRIC, e.g. lambada_openai:{spec}")
    if cfg.teachers and metric not in STREAM_METRICS:
        raise UserError(f"--metric {spec}: rankest's own evaluation of --teachers measures {', '.join(STREAM_METRICS)}; "
                        "choose one of them")
    low = lower_is_better(metric, cfg.direction)
    # Only rankest's own evaluation of --teachers runs under torchrun; evaluation files need no collectives.
    with distributed.joined(cfg.device, join=bool(cfg.teachers)) as (world, device):
        cfg.device = device
        return _saturation(cfg, world, spec, task, metric, low)


def _saturation(cfg: SaturationConfig, world, spec: str, task: Optional[str], metric: str,
                low: bool) -> Optional[dict[str, Any]]:
    """The body of :func:`run_saturation` for one process of ``world``."""
    config = run_config(cfg)
    run = Run.open("saturation", out=cfg.out, resume=cfg.resume, overwrite=cfg.overwrite,
                   results_file="saturation.json", config=config, world=world, every=cfg.checkpoint_every)
    prov = provenance()
    prov["started"] = now_iso()
    curves: dict[str, Curve] = _eval_curves(cfg, task, metric) if cfg.evals else {}
    if cfg.teachers:
        checkpoints = resolve_stream(cfg.teachers, cfg.revisions, cfg.cache_dir)
        docs = load_documents(cfg.corpus or DEFAULT_CORPUS)
        opts = {k: getattr(cfg, k) for k in ("tokens", "seq_len", "positions", "sample", "seed", "batch_size",
                                             "device", "dtype", "diagnostics", "quiet")}
        results = StreamedEval(checkpoints, docs, opts, run, world).compute()
        if not world.main:
            return None
        both = set(curves) & {r["model"] for r in results}
        if both:
            raise UserError(f"{', '.join(sorted(both))} come from both --evals and --teachers; give each model once")
        curves.update(_stream_curves(results, metric, cfg.params))
    record, fit = analyse(curves, lower_is_better=low, fit_on=cfg.fit_on, fit_at=cfg.fit_at,
                          param_count=cfg.param_count, confidence=float(cfg.confidence), n_boot=int(cfg.bootstrap),
                          seed=int(cfg.seed), onset_sigma=float(cfg.onset_sigma), onset_points=int(cfg.onset_points))
    record = {"metric": spec, "task": task, **record}
    prov["finished"] = now_iso()

    def write(folder: Path) -> None:
        full = {**record, "config": config, "provenance": prov}
        write_text_atomic(folder / "saturation.json", to_json(full) + "\n")
        write_saturation_h5(folder / "saturation.h5", record, fit, config, prov)
        write_saturation_report(folder, record, fit)

    run.finish(write)
    return record
