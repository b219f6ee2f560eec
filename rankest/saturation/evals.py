"""Evaluation result files of lm-evaluation-harness: one file per (model, checkpoint).

Two layouts are read:

* **older** (harness ≤ 0.3, the layout the Pythia suite publishes its per-checkpoint
  evaluations in): ``{"results": {task: {"acc": v, "acc_stderr": s, …}}, "versions": {…},
  "config": {"model_args": "pretrained=EleutherAI/pythia-160m,revision=step1000",
  "num_fewshot": 0, …}}``;
* **current** (harness ≥ 0.4): ``{"results": {task: {"alias": …, "acc,none": v,
  "acc_stderr,none": s, …}}, "configs": {task: {…}}, "n-shot": {task: k}, "config":
  {"model_args": "pretrained=…,revision=…" or a dict, …}, "model_name": …}``. The metric key is
  ``METRIC,FILTER``; the filter ``none`` is read unless ``--metric TASK:METRIC,FILTER`` says
  otherwise.

**Naming rule** (model and step of a file, first that applies):

1. ``--map FILE.json``: ``{"<file name or path>": "MODEL@STEP"}`` (or ``{"model": …, "step": …}``);
2. the file's config: ``pretrained=`` of ``config.model_args`` (or ``model_name``) for the model,
   ``revision=stepN`` for the step;
3. the file's path: ``<model>_stepN.json`` / ``<model>-stepN.json``, or ``<model>/stepN.json``
   (the folder names the model); a step is ``step`` followed by digits.

Model names lose an organisation prefix (``EleutherAI/``, or ``EleutherAI__`` in the folder
names the current harness writes) and Pythia's ``v1.1-`` / ``v0-``
infix (``pythia-v1.1-160m`` → ``pythia-160m``). Two files for the same model and step, or a
file whose name or step cannot be found, are refused with a sentence.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

from rankest.errors import UserError

__all__ = ["EvalFile", "read_eval_file", "collect_metric", "lower_is_better", "parse_metric", "eval_paths",
           "normalise_model", "read_map"]

#: Metrics where a lower value is better (all others: higher is better) when --direction is auto.
LOWER_IS_BETTER = ("ppl", "perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte", "nll", "loss",
                   "likelihood_difference")
#: Names the two layouts give the same metric (lambada's perplexity is "ppl" in the older one).
ALIASES = {"ppl": "perplexity", "perplexity": "ppl"}

_STEP = re.compile(r"step(\d+)")


@dataclass
class EvalFile:
    """One evaluation file: ``results`` {task: {metric: (value, stderr or None)}}, ``layout``
    ("older" or "current"), ``n_shot`` {task: k}, ``model``, ``step`` (after the naming rule)."""

    path: Path
    model: str
    step: int
    layout: str
    results: dict[str, dict[str, tuple[float, Optional[float]]]]
    n_shot: dict[str, Any]


def normalise_model(name: str) -> str:
    """``EleutherAI/pythia-v1.1-160m`` → ``pythia-160m`` (organisation and version infix dropped)."""
    name = str(name).strip().rstrip("/").split("/")[-1].split("__")[-1]  # the harness's ORG__NAME folders
    return re.sub(r"^pythia-v\d+(\.\d+)?-", "pythia-", name)


def _number(x) -> Optional[float]:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None  # "N/A" stderrs of the current layout
    return v if math.isfinite(v) else None


def _model_args(config: Mapping[str, Any]) -> dict[str, str]:
    args = config.get("model_args")
    if isinstance(args, Mapping):
        return {str(k): str(v) for k, v in args.items()}
    if isinstance(args, str):
        return dict(p.split("=", 1) for p in args.split(",") if "=" in p)
    return {}


def _parse_results(raw: Mapping[str, Any], layout: str) -> dict[str, dict[str, tuple[float, Optional[float]]]]:
    out: dict[str, dict[str, tuple[float, Optional[float]]]] = {}
    for task, metrics in raw.items():
        if not isinstance(metrics, Mapping):
            continue
        values: dict[str, tuple[float, Optional[float]]] = {}
        for key, value in metrics.items():
            name, _, filt = str(key).partition(",")
            if name.endswith("_stderr") or name == "alias" or _number(value) is None:
                continue
            full = f"{name},{filt}" if filt else name
            stderr_key = f"{name}_stderr,{filt}" if filt else f"{name}_stderr"
            values[full] = (float(value), _number(metrics.get(stderr_key)))
        out[str(task)] = values
    return out


def _from_path(path: Path) -> tuple[Optional[str], Optional[int]]:
    m = re.match(r"^(.*?)[_-]?step(\d+)", path.stem)
    if m:
        model = m.group(1) or path.parent.name
        return model, int(m.group(2))
    steps = [int(s) for part in path.parts[:-1] for s in _STEP.findall(part)]
    return None, steps[-1] if steps else None


def read_eval_file(path, mapping: Optional[Mapping[str, Any]] = None) -> EvalFile:
    """Read one lm-evaluation-harness result file (either layout) and name its model and step."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read the evaluation file {path} ({e}); pass lm-evaluation-harness JSON "
                        "result files") from None
    if not isinstance(data, Mapping) or not isinstance(data.get("results"), Mapping):
        raise UserError(f"{path} is not an lm-evaluation-harness result file (no \"results\" object); pass the "
                        "harness's JSON output")
    layout = "current" if ("configs" in data or "n-shot" in data
                           or any("," in k for t in data["results"].values() if isinstance(t, Mapping) for k in t)) \
        else "older"
    config = data.get("config") if isinstance(data.get("config"), Mapping) else {}
    args = _model_args(config)
    model = args.get("pretrained") or data.get("model_name")
    rev = _STEP.fullmatch(args.get("revision", ""))
    step: Optional[int] = int(rev.group(1)) if rev else None
    path_model, path_step = _from_path(path)
    model = model or path_model
    step = path_step if step is None else step
    named = _mapped(path, mapping)
    if named is not None:
        model, step = named
    if not model or step is None:
        raise UserError(f"cannot tell the model and step of {path} (neither its config nor its name says, e.g. "
                        "pythia-160m_step1000.json); name it so, or give --map FILE.json with "
                        "{\"<file>\": \"MODEL@STEP\"}")
    n_shot = dict(data.get("n-shot") or {})
    if not n_shot and "num_fewshot" in config:
        n_shot = {t: config["num_fewshot"] for t in data["results"]}
    return EvalFile(path, normalise_model(model), int(step), layout, _parse_results(data["results"], layout), n_shot)


def read_map(path) -> dict[str, Any]:
    """The ``--map`` file: {file name or path: "MODEL@STEP" or {"model", "step"}}."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read --map {path} ({e}); give a JSON object {{\"<file>\": \"MODEL@STEP\"}}") from None
    if not isinstance(data, Mapping):
        raise UserError(f"--map {path} must hold a JSON object {{\"<file>\": \"MODEL@STEP\"}}")
    return dict(data)


def _mapped(path: Path, mapping: Optional[Mapping[str, Any]]) -> Optional[tuple[str, int]]:
    if not mapping:
        return None
    for key in (str(path), path.name, path.stem):
        if key in mapping:
            entry = mapping[key]
            if isinstance(entry, str) and "@" in entry:
                model, step = entry.rsplit("@", 1)
            elif isinstance(entry, Mapping) and "model" in entry and "step" in entry:
                model, step = entry["model"], entry["step"]
            else:
                raise UserError(f"--map entry {key!r} must be \"MODEL@STEP\" or {{\"model\": …, \"step\": …}}")
            digits = str(step).removeprefix("step")
            if not digits.isdigit():
                raise UserError(f"--map entry {key!r} has step {step!r}; give a number or stepN")
            return str(model), int(digits)
    return None


def eval_paths(specs: Iterable[str]) -> list[Path]:
    """The JSON files of ``--evals DIR|FILES`` (a folder: every ``*.json`` under it, sorted)."""
    paths: list[Path] = []
    for spec in specs:
        p = Path(spec).expanduser()
        if p.is_dir():
            paths += sorted(q for q in p.rglob("*.json") if q.is_file())
        elif p.is_file():
            paths.append(p)
        else:
            raise UserError(f"--evals {spec}: no such file or folder; give lm-evaluation-harness result files or "
                            "a folder of them")
    if not paths:
        raise UserError(f"--evals {' '.join(map(str, specs))} holds no .json files; give lm-evaluation-harness "
                        "result files")
    return paths


def parse_metric(spec: str) -> tuple[Optional[str], str]:
    """``TASK:METRIC`` → (task, metric); a bare ``nll``, ``ppl`` or ``acc`` is rankest's own
    streamed evaluation (task None)."""
    task, sep, metric = str(spec).rpartition(":")
    if not metric or (sep and not task):
        raise UserError(f"--metric {spec!r}: give TASK:METRIC (e.g. lambada_openai:ppl) or nll, ppl or acc")
    return (task if sep else None), metric


def lower_is_better(metric: str, direction: str = "auto") -> bool:
    """Whether a lower value of ``metric`` is better (``direction``: auto, lower or higher)."""
    if direction not in ("auto", "lower", "higher"):
        raise UserError(f"--direction {direction!r}: use auto, lower or higher")
    if direction != "auto":
        return direction == "lower"
    return metric.split(",")[0] in LOWER_IS_BETTER


def _lookup(values: Mapping[str, tuple[float, Optional[float]]], metric: str):
    name, _, filt = metric.partition(",")
    for n in (name, ALIASES.get(name)):
        if n is None:
            continue
        for key in ((f"{n},{filt}",) if filt else (n, f"{n},none")):
            if key in values:
                return values[key]
    return None


def collect_metric(files: list[EvalFile], task: str, metric: str) -> dict[str, dict[int, tuple[float, Optional[float]]]]:
    """{model: {step: (value, stderr)}} of ``task:metric`` over the files that report it."""
    out: dict[str, dict[int, tuple[float, Optional[float]]]] = {}
    seen: dict[tuple[str, int], Path] = {}
    for f in files:
        found = _lookup(f.results.get(task, {}), metric)
        if found is None:
            continue
        key = (f.model, f.step)
        if key in seen:
            raise UserError(f"{seen[key]} and {f.path} both give {task}:{metric} of {f.model} at step {f.step}; pass "
                            "one file per model and step (e.g. only the zero-shot folder), or rename one with --map")
        seen[key] = f.path
        out.setdefault(f.model, {})[f.step] = found
    if not out:
        tasks = sorted({t for f in files for t in f.results})
        shown = ", ".join(tasks[:12]) + (" …" if len(tasks) > 12 else "")
        metrics = sorted({m for f in files for m in f.results.get(task, {})})
        hint = f"; {task} has {', '.join(metrics)}" if metrics else f"; the files have the tasks {shown}"
        raise UserError(f"no evaluation file reports {task}:{metric}{hint}: choose --metric TASK:METRIC among them")
    return {m: dict(sorted(v.items())) for m, v in sorted(out.items())}
