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
``head-spectrum``, one checkpoint loaded at a time, see :mod:`rankest.sources.revisions`) and inside
``estimate --diagnostics`` on the estimate's own batches (:class:`EstimateDiagnostics`).

    python -m rankest anisotropy --tokens 4096 --out runs/aniso
    python -m rankest head-spectrum --teacher pythia-70m --revisions step1000,step143000 --out runs/hs

References: Ethayarajh (2019), "How contextual are contextualized word representations?",
EMNLP, §3 (anisotropy as mean cosine similarity); Roy & Vetterli (2007) (effective rank).
"""

from __future__ import annotations

import gc
import pathlib
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from rankest.accumulate.anisotropy import Anisotropy
from rankest.diagnostics.anisotropy import teacher_anisotropy
from rankest.diagnostics.config import AnisotropyConfig, HeadSpectrumConfig
from rankest.diagnostics.head_spectrum import (
    TOP_RATIOS,
    head_spectrum_metrics,
    singular_entropy_kl,
    teacher_head_spectrum,
)
from rankest.diagnostics.in_estimate import EstimateDiagnostics
from rankest.errors import UserError
from rankest.io.files import jsonable, now_iso, write_text_atomic
from rankest.io.h5 import os_error_text
from rankest.io.results import provenance
from rankest.io.sweep_results import KINDS, _append, _summary_json, read_results
from rankest.options import keyword_options
from rankest.report.diagnostics import write_diagnostics_report
from rankest.runtime import distributed
from rankest.runtime.run import EXECUTION_OPTIONS, Run, create_run_folder, release_run_folder
from rankest.sources import teachers
from rankest.sources.corpus import DEFAULT_CORPUS, check_seq_len, load_documents, pack_windows, plan_rows
from rankest.sources.revisions import Checkpoint, _summarise, resolve_checkpoints
from rankest.sources.rows import windows_needed
from rankest.sources.teachers import DEFAULT_TEACHER, quiet_loading

__all__ = [
    "Anisotropy",
    "singular_entropy_kl",
    "head_spectrum_metrics",
    "TOP_RATIOS",
    "run_anisotropy",
    "run_head_spectrum",
    "EstimateDiagnostics",
]













# ---- commands (Python API of `anisotropy` and `head-spectrum`) --------------------------------
@keyword_options(AnisotropyConfig)
def run_anisotropy(**kwargs) -> dict[str, dict[str, Any]]:
    """Per-layer anisotropy of a teacher, or of each of its checkpoints (``rankest.anisotropy``).

    Keyword arguments are the fields of :class:`AnisotropyConfig` (listed below): ``teacher``
    (name, folder or loaded Teacher; default the embedded one), ``revisions`` (list or
    comma-separated; Hub revisions or local folders) or ``revision``, the corpus and rows
    options, ``out`` (run folder: anisotropy.h5/.json, report.md section, anisotropy.png).

    Returns
    -------
    {revision label: dict} with the arrays of :meth:`Anisotropy.finalize` (``anisotropy``,
    ``depth``, ``mean_norm``, ``pc1_variance_share``, ``width``, ``n_rows``),
    ``last_is_head_input`` and ``source``, in sweep order.
    """
    opts = vars(AnisotropyConfig.from_kwargs(kwargs))
    corpus = opts["corpus"] or DEFAULT_CORPUS
    docs = load_documents(corpus)  # a typo in --corpus fails before any model is loaded

    def compute(teacher) -> dict[str, Any]:
        check_seq_len(int(opts["seq_len"]), teacher.context_length)
        tokens = opts["tokens"]
        max_windows = windows_needed(tokens, int(opts["seq_len"]), opts["positions"])
        windows = pack_windows(docs, teacher.tokenizer, int(opts["seq_len"]), max_windows=max_windows,
                               progress=not opts["quiet"])
        plan = plan_rows(len(windows), int(opts["seq_len"]), positions=opts["positions"], tokens=tokens,
                         seed=int(opts["seed"]), sample=opts["sample"])
        return teacher_anisotropy(teacher, windows, plan, batch_size=int(opts["batch_size"]), pca=opts["pca"],
                                  quiet=opts["quiet"], desc=f"anisotropy {teacher.name}")

    config = {k: opts[k] for k in ("tokens", "seq_len", "positions", "sample", "seed", "pca")}
    config["corpus"] = corpus if isinstance(corpus, str) else ",".join(map(str, corpus))
    return _sweep("anisotropy", opts, compute, config)


@keyword_options(HeadSpectrumConfig)
def run_head_spectrum(**kwargs) -> dict[str, dict[str, Any]]:
    """Singular spectrum of the LM head of a teacher or of each checkpoint (``rankest.head_spectrum``).

    Keyword arguments are the fields of :class:`HeadSpectrumConfig` (listed below); ``out``:
    head_spectrum.h5/.json, report.md section, PNGs.

    Returns
    -------
    {revision label: dict of :func:`head_spectrum_metrics` + ``source``}, in sweep order.
    """
    opts = vars(HeadSpectrumConfig.from_kwargs(kwargs))
    return _sweep("head_spectrum", opts, lambda t: teacher_head_spectrum(t, top=int(opts["top"])),
                  {"top": int(opts["top"])})


def _sweep(kind: str, opts: dict, compute, config: dict) -> dict[str, dict[str, Any]]:
    teacher = opts["teacher"] if opts["teacher"] is not None else DEFAULT_TEACHER
    checkpoints = resolve_checkpoints(teacher, opts["revisions"], cache_dir=opts["cache_dir"])
    config = {**config, "teacher": getattr(teacher, "name", str(teacher)),
              "revisions": [c.label for c in checkpoints], "device": str(opts["device"]), "dtype": str(opts["dtype"]),
              "device_map": opts["device_map"]}
    try:
        results = sweep_checkpoints(kind, checkpoints, compute, out=opts["out"], config=config,
                                    device=opts["device"], dtype=opts["dtype"], device_map=opts["device_map"],
                                    overwrite=opts["overwrite"],
                                    resume=opts["resume"], quiet=opts["quiet"], cache_dir=opts["cache_dir"])
        if opts["out"] is not None:
            try:
                write_diagnostics_report(opts["out"], **{kind: results}, teacher=config["teacher"])
            except OSError as e:
                raise UserError(f"could not write the report in {opts['out']}: {os_error_text(e)}; its results are "
                                f"written: free space, then run `rankest report {opts['out']}`.") from e
    finally:
        if opts["out"]:
            release_run_folder(pathlib.Path(opts["out"]))  # done or failed; a new folder left empty is removed
    return results


# ---- the sweep -------------------------------------------------------------------------------
#: Config keys that may differ when --resume adds to an existing file: the list of checkpoints
#: grows, and where the models run (device, dtype, device map) does not change what is measured.
_RESUME_IGNORES = ("revisions", "dtype") + EXECUTION_OPTIONS


def sweep_checkpoints(kind: str, checkpoints: list[Checkpoint], compute: Callable[[Any], dict[str, Any]], *,
                      out=None, config: dict, device="auto", dtype="auto", device_map=None, overwrite: bool = False,
                      resume: bool = False, quiet: bool = False, cache_dir=None) -> dict[str, dict[str, Any]]:
    """Load each checkpoint in turn, ``compute(teacher)``, free it, append the result.

    Returns {label: result} for the requested checkpoints, in their order (results already in
    the file are read back when resuming).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")
    path = None
    done: dict[str, dict[str, Any]] = {}
    if out is not None:
        folder = create_run_folder(out)  # one writer (released by the caller, _sweep, or at exit)
        path = folder / f"{kind}.h5"
        for p in (path, path.with_suffix(".json"), folder / "report.md"):
            if p.is_dir():
                raise UserError(f"{p} is a folder, where the {kind.replace('_', '-')} sweep writes a file; remove it "
                                "or choose another --out.")
        if path.exists():
            if resume:
                old_config, done = read_results(path, kind)
                diff = sorted(k for k in set(config) | set(old_config) if k not in _RESUME_IGNORES
                              and jsonable(config.get(k)) != jsonable(old_config.get(k)))
                if diff:
                    raise UserError(f"--resume: {path} was written with other settings ({', '.join(diff)}); use the "
                                    "same options, or --overwrite to start again")
            elif overwrite:
                path.unlink()
                done = {}
            else:
                raise UserError(f"{path} already exists; pass --resume to continue its sweep, --overwrite to replace "
                                "it, or choose another --out")
    prov = provenance(device if isinstance(device, torch.device) or device != "auto" else None)
    prov["started"] = now_iso()
    results: dict[str, dict[str, Any]] = {}
    todo = [c for c in checkpoints if c.label not in done]
    if done and not quiet:
        skipped = [c.label for c in checkpoints if c.label in done]
        if skipped:
            print(f"rankest: resuming {path}: {len(skipped)} checkpoint(s) already done ({_summarise(skipped)})")
    bar = tqdm(total=len(todo), desc=f"{kind.replace('_', '-')} checkpoints", unit="ckpt",
               disable=quiet or len(todo) < 2, dynamic_ncols=True)
    # Each model checkpoint's result is appended to the result file as it finishes: the file is the
    # sweep's checkpoint, and a signal stops the sweep between two of them.
    run = Run(kind, distributed.World(), None if out is None else pathlib.Path(out), None, config)
    try:
        for i in run.units(0, len(todo), save=lambda done: None, held_by=path,
                           stopped=lambda done: f"stopped after {done} of {len(todo)} checkpoint(s)"):
            ckpt = todo[i]
            if ckpt.loaded:
                teacher = ckpt.target
            else:
                with quiet_loading(quiet):
                    teacher = teachers.load_teacher(ckpt.target, revision=ckpt.revision, device=device, dtype=dtype,
                                           cache_dir=cache_dir, device_map=device_map)
            try:
                result = compute(teacher)
                result["source"] = teacher.source
                if path is not None:
                    prov["device_name"] = provenance(teacher.device).get("device_name")
                    prov["finished"] = now_iso()
                    try:
                        _append(path, kind, ckpt.label, result, config=config, prov=prov)
                    except OSError as e:  # a full disk: the file keeps the checkpoints before this one
                        raise UserError(f"could not write {path}: {os_error_text(e)}; the results appended before "
                                        f"are intact: free space, then rerun with --resume.") from e
                results[ckpt.label] = result
            finally:
                if not ckpt.loaded:  # free the checkpoint before the next one is loaded
                    dev = teacher.device
                    del teacher
                    gc.collect()
                    if dev.type == "cuda":
                        torch.cuda.empty_cache()
            bar.update(1)
    finally:
        bar.close()
    if path is not None:
        _, everything = read_results(path, kind)
        write_text_atomic(path.with_suffix(".json"), _summary_json(kind, config, prov, everything))
    return {c.label: results[c.label] if c.label in results else done[c.label] for c in checkpoints}
