"""Run folders and result files (INTERFACES.md, "Run folder").

    DIR/results.h5     σ, W-error curve, convergence; config + provenance as attributes
    DIR/results.json   the summary a script reads
    DIR/report.md      human report, linking the PNGs beside it
    DIR/*.png          plots

Every file is written atomically: to a temporary name in the same folder, flushed, fsynced,
then renamed — a crash leaves the previous file or none, never half of one.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from rankest.errors import UserError
from rankest.spectrum import Spectrum, _jsonable, to_json

#: Bumped whenever the layout of results.h5 changes; readers refuse newer files.
SCHEMA_VERSION = 1


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


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
    import torch

    from rankest import __version__

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
        from rankest import ops

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


# ---- atomic writes ---------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_path(path: os.PathLike | str) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync it and rename it over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        with contextlib.suppress(OSError):  # make the rename itself durable
            dfd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


# ---- run folder --------------------------------------------------------------------------------
def prepare_run_folder(out, *, overwrite: bool = False) -> Path:
    """Create (or, with ``overwrite``, reuse) a run folder; refuse an existing one otherwise.

    Checked before any expensive work, so a bad ``--out`` fails in a second, not after an hour.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder; choose another path.")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"the run folder {out} already exists and is not empty; pass --overwrite to replace "
                        f"its results or choose another --out.")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-", delete=True)
        probe.close()
    except OSError as e:
        raise UserError(f"cannot write to the run folder {out} ({e.strerror}); choose a writable --out.") from e
    return out


def write_spectrum_h5(spec: Spectrum, path, *, group: str = "/", config: dict | None = None,
                      prov: dict | None = None) -> None:
    """Write a spectrum (datasets sigma, w_error; summary/config/provenance as JSON attributes)."""
    import h5py

    path = Path(path)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            g = f.require_group(group)
            # Fletcher-32 checksums: a corrupted byte makes the reader fail instead of a changed σ.
            for name, data in (("sigma", spec.sigma), ("w_error", spec.w_error())):
                data = np.asarray(data)
                g.create_dataset(name, data=data, **({"fletcher32": True, "chunks": True} if data.size else {}))
            f.attrs["schema_version"] = SCHEMA_VERSION
            f.attrs["format"] = "rankest.results"
            g.attrs["spectrum"] = json.dumps(_jsonable({
                "energy": spec.energy, "n_rows": spec.n_rows, "n_cols": spec.n_cols, "space": spec.space,
                "route": spec.route, "exact": spec.exact, "precision": spec.precision, "meta": spec.meta,
                "convergence": {str(k): v for k, v in spec.convergence.items()}}))
            g.attrs["summary"] = to_json(spec.summary())
            if config is not None:
                g.attrs["config"] = to_json(config)
            if prov is not None:
                g.attrs["provenance"] = to_json(prov)


def read_spectrum_h5(path, *, group: str = "/") -> Spectrum:
    """Read a spectrum; refuse (UserError) a file that is missing, truncated, corrupt, not a
    rankest results file, or of a newer schema."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise UserError(f"no results file at {path}.")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise UserError(f"{path} is not a readable HDF5 file (truncated or corrupt?): {e}") from e
    try:
        with f:
            fmt = f.attrs.get("format")
            if fmt != "rankest.results":
                what = "a rankest checkpoint, not results" if fmt == "rankest.checkpoint" else "not a rankest results file"
                raise UserError(f"{path} is {what}; give the results.h5 of a finished run folder.")
            version = int(f.attrs.get("schema_version", -1))
            if version > SCHEMA_VERSION:
                raise UserError(f"{path} has schema version {version}, newer than this rankest reads "
                                f"({SCHEMA_VERSION}); upgrade rankest.")
            g = f[group]
            info = json.loads(g.attrs["spectrum"])
            sigma = np.asarray(g["sigma"][...], dtype=np.float64)
    except UserError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as e:
        # A damaged dataset fails its checksum (OSError); a missing part is a KeyError.
        raise UserError(f"{path} is a damaged rankest results file ({type(e).__name__}: {e}); "
                        f"recompute it (estimate --overwrite).") from e
    try:
        conv = {int(k): v for k, v in info.pop("convergence", {}).items()}
        energy = info.pop("energy")
        return Spectrum(sigma=sigma, energy=float("nan") if energy is None else energy, convergence=conv, **info)
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        raise UserError(f"{path} is a damaged rankest results file (its spectrum record is incomplete: "
                        f"{type(e).__name__}: {e}); recompute it (estimate --overwrite).") from e


def write_run(out: Path, spec: Spectrum, *, config: dict, prov: dict) -> dict:
    """results.h5 + results.json (+ report.md and PNGs, see rankest.report)."""
    from rankest.report.estimate import write_report

    write_spectrum_h5(spec, out / "results.h5", config=config, prov=prov)
    summary = spec.summary()
    summary["config"] = _jsonable(config)
    summary["provenance"] = _jsonable(prov)
    write_text_atomic(out / "results.json", to_json(summary) + "\n")
    write_report(out, spec, config=config, prov=prov)
    return summary
