"""Result files of a finished estimate, and the provenance every result file carries.

    DIR/results.h5     σ, W-error curve, convergence; config + provenance as attributes
    DIR/results.json   the summary a script reads (docs/design.md, "Result names")

(report.md and the PNGs beside them are :mod:`rankest.report`'s.) Every file is written
atomically (:func:`rankest.io.files.atomic_path`).
"""

from __future__ import annotations

import contextlib
import platform
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rankest import ops
from rankest._version import __version__
from rankest.io.files import jsonable, to_json, write_text_atomic
from rankest.io.spectrum_file import SCHEMA_VERSION
from rankest.spectrum import Spectrum


def git_hash() -> str | None:
    """The git commit of the rankest source tree, if it is a checkout (else None)."""
    src = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def provenance(device=None) -> dict[str, Any]:
    """Versions, git hash, host and device: what a result needs to be reproduced."""
    prov: dict[str, Any] = {
        "rankest_version": __version__, "torch_version": torch.__version__, "numpy_version": np.__version__,
        "python_version": platform.python_version(), "git_hash": git_hash(), "host": platform.node(),
        "cpu": _cpu_name(), "schema_version": SCHEMA_VERSION,
    }
    try:
        import transformers

        prov["transformers_version"] = transformers.__version__
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    if device is not None and str(device).startswith("cuda") and torch.cuda.is_available():
        prov["device_name"] = torch.cuda.get_device_name(torch.device(device))
        prov["cuda_version"] = torch.version.cuda
    else:
        prov["device_name"] = prov["cpu"]
    try:
        prov["ops_backend"] = ops.extension_backend() or "reference"
    except Exception:  # noqa: BLE001 - provenance must never fail a run
        prov["ops_backend"] = "unknown"
    return prov


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()












def write_run(out: Path, spec: Spectrum, *, config: dict, prov: dict) -> dict:
    """results.h5 + results.json of a finished estimate (the report is rankest.report's); returns
    the summary written to results.json."""
    spec.save(out / "results.h5", config=config, prov=prov)
    summary = spec.summary()
    summary["config"] = jsonable(config)
    summary["provenance"] = jsonable(prov)
    write_text_atomic(out / "results.json", to_json(summary) + "\n")
    return summary


def read_spectrum_h5(path, *, group: str = "/") -> Spectrum:
    """The spectrum of a results.h5 (:meth:`Spectrum.load`), refused with a sentence when damaged."""
    return Spectrum.load(path, group=group)
