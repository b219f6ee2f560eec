"""``rankest report DIR``: re-render a run folder's report from the result files it holds,
whichever commands wrote them.

=======================  ===================  =============================================
result file              written by           rendered as
=======================  ===================  =============================================
``results.h5``           ``estimate``         report.md, spectrum / w_error / convergence PNGs
``anisotropy.h5``        ``anisotropy``,      the anisotropy section of report.md, anisotropy.png
                         ``estimate --diagnostics``
``head_spectrum.h5``     ``head-spectrum``,   the head-spectrum section of report.md, head_*.png
                         ``estimate --diagnostics``
``heads.h5``             ``heads``            heads.md (and report.md when nothing else is there)
``saturation.h5``        ``saturation``       saturation.md and its PNGs
=======================  ===================  =============================================

Several folders are a comparison of estimate runs (:func:`rankest.report.compare.compare_runs`).
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py

from rankest.errors import UserError
from rankest.heads.result import HeadsResult
from rankest.io.checkpoint import CHECKPOINT_NAME
from rankest.io.files import write_text_atomic
from rankest.io.results import read_spectrum_h5
from rankest.io.sweep_results import KINDS, read_results
from rankest.report.diagnostics import write_diagnostics_report
from rankest.report.estimate import write_report
from rankest.report.heads import write_heads_report
from rankest.report.saturation import write_saturation_report
from rankest.saturation.result import read_saturation_h5

#: The result files ``report`` renders, and the command that writes each.
RESULT_FILES = {"results.h5": "estimate", "anisotropy.h5": "anisotropy", "head_spectrum.h5": "head-spectrum",
                "heads.h5": "heads", "saturation.h5": "saturation"}


def found_results(folder: Path) -> list[str]:
    """The result files of RESULT_FILES present in ``folder``, in that order."""
    return [name for name in RESULT_FILES if (Path(folder) / name).is_file()]


def render_folder(folder) -> Path:
    """Re-render every report of the run folder ``folder``; returns the path of report.md (heads.md
    for a folder of a heads run only, saturation.md for a saturation run).

    Raises
    ------
    UserError
        When ``folder`` is not a folder or holds none of RESULT_FILES.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder; give a run folder written by "
                        f"{', '.join(sorted(set(RESULT_FILES.values())))} (their --out)")
    found = found_results(folder)
    if not found and (folder / CHECKPOINT_NAME).is_file():
        raise UserError(f"{folder} holds only the {CHECKPOINT_NAME} of an unfinished run; finish it by rerunning its "
                        "command with --resume, then `rankest report` renders it")
    if not found:
        raise UserError(f"{folder} holds no rankest results ({', '.join(RESULT_FILES)}); give the --out folder of "
                        "an estimate, anisotropy, head-spectrum, heads or saturation run")
    path = folder / "report.md"
    if "results.h5" in found:
        spec = read_spectrum_h5(folder / "results.h5")
        config, prov = _config_and_provenance(folder / "results.h5")
        path = write_report(folder, spec, config=config, prov=prov)
    diagnostics = {}
    for kind in KINDS:
        if f"{kind}.h5" in found:
            config, diagnostics[kind] = read_results(folder / f"{kind}.h5", kind)
            teacher = config.get("teacher", "")
    if diagnostics:
        path = write_diagnostics_report(folder, **diagnostics, teacher=teacher)
    if "saturation.h5" in found:  # a saturation folder holds nothing else
        record, fit = read_saturation_h5(folder / "saturation.h5")
        return write_saturation_report(folder, record, fit)
    if "heads.h5" in found:
        heads_md = write_heads_report(folder, HeadsResult.load(folder / "heads.h5"))
        if found == ["heads.h5"]:  # the folder's report.md is the heads report: keep the two the same
            write_text_atomic(folder / "report.md", heads_md.read_text())
            path = heads_md
    return path


def _config_and_provenance(results_h5: Path) -> tuple[dict, dict]:
    with h5py.File(results_h5, "r") as f:
        return json.loads(f.attrs.get("config", "{}")), json.loads(f.attrs.get("provenance", "{}"))


def check_comparable(folders) -> None:
    """Refuse (UserError) a folder without an estimate's results.h5 in a comparison, naming what it holds."""
    for folder in map(Path, folders):
        if not (folder / "results.h5").is_file():
            found = found_results(folder) if folder.is_dir() else []
            held = (f"it holds {', '.join(found)} ({', '.join(RESULT_FILES[n] for n in found)} results), which "
                    f"`rankest report {folder}` renders alone") if found else "it holds no rankest results"
            raise UserError(f"report compares estimate runs, and {folder} has no results.h5: {held}")
