"""A spectrum's HDF5 layout (results.h5): the datasets ``sigma`` and ``w_error`` with Fletcher-32
checksums, everything else as JSON attributes, a format mark and a schema version.

This module knows the layout, not the :class:`~rankest.spectrum.Spectrum` class: it writes any
object with the Spectrum's fields and reads back the keyword arguments of its constructor, so
that ``Spectrum.save`` / ``Spectrum.load`` can use it without an import cycle.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np

from rankest.errors import UserError
from rankest.io.files import jsonable, to_json
from rankest.io.h5 import checked_dataset, mark, open_checked, write_h5

#: Bumped whenever the layout of results.h5 changes; readers refuse newer files.
#: 2: every attribute and scalar under the file's ``sha256`` (:mod:`rankest.io.h5`).
SCHEMA_VERSION = 2
FORMAT = "rankest.results"
#: What a stored spectrum's ``space`` and ``route`` may be (a head's singular values: "head", "svd").
SPACES = ("clr", "prob", "logprob", "head")
ROUTES = ("factor", "gram", "sketch", "svd")


def write_spectrum_h5(spec: Any, path, *, group: str = "/", config: dict | None = None,
                      prov: dict | None = None) -> None:
    """Write ``spec`` (a Spectrum) to ``path`` atomically: datasets sigma, w_error; its record,
    summary, and the run's config / provenance as JSON attributes."""
    path = Path(path)
    with write_h5(path) as f:
        g = f.require_group(group)
        # Fletcher-32 checksums: a corrupted byte makes the reader fail instead of a changed σ.
        for name, data in (("sigma", spec.sigma), ("w_error", spec.w_error())):
            checked_dataset(g, name, data)
        mark(f, FORMAT, SCHEMA_VERSION)
        g.attrs["spectrum"] = json.dumps(jsonable({
            "energy": spec.energy, "n_rows": spec.n_rows, "n_cols": spec.n_cols, "space": spec.space,
            "route": spec.route, "exact": spec.exact, "precision": spec.precision,
            "row_precision": spec.row_precision, "noise_floor": spec.noise_floor, "meta": spec.meta,
            "convergence": {str(k): v for k, v in spec.convergence.items()}}))
        g.attrs["summary"] = to_json(spec.summary())
        if config is not None:
            g.attrs["config"] = to_json(config)
        if prov is not None:
            g.attrs["provenance"] = to_json(prov)


def read_spectrum_h5(path, *, build: Callable[..., Any], group: str = "/") -> Any:
    """``build(**fields)`` of the spectrum stored in ``path`` (``build`` is the Spectrum class);
    refuse (UserError) a file that is missing, truncated, corrupt, not a rankest results file,
    or of a newer schema (:func:`rankest.io.h5.open_checked`)."""
    fix = "give the results.h5 of a finished run folder, or recompute it (estimate --overwrite)"
    with open_checked(path, fmt=FORMAT, version=SCHEMA_VERSION, what="rankest results file", fix=fix) as f:
        g = f[group]
        info = json.loads(g.attrs["spectrum"])
        if not isinstance(info, dict):
            raise TypeError("the spectrum record is not a JSON object")
        ds = g["sigma"]
        _check_sigma(ds, info, path, fix)
        sigma = np.asarray(ds[...], dtype=np.float64)
    try:
        conv = {int(k): v for k, v in info.pop("convergence", {}).items()}
        energy = info.pop("energy")
        return build(sigma=sigma, energy=float("nan") if energy is None else energy, convergence=conv, **info)
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        raise UserError(f"{path} is a damaged rankest results file (its spectrum record is incomplete: "
                        f"{type(e).__name__}: {e}); recompute it (estimate --overwrite).") from e


def _check_sigma(ds, info: dict, path, fix: str) -> None:
    """σ is 1-D, of at most V' entries of the record; space and route are known values."""
    for key, known in (("space", SPACES), ("route", ROUTES)):
        if info.get(key) not in known:
            raise UserError(f"{path} is a damaged rankest results file (its {key} is {info.get(key)!r:.40}, not one of "
                            f"{', '.join(known)}); {fix}.")
    n_rows, n_cols = int(info.get("n_rows", -1)), int(info.get("n_cols", -1))
    if n_rows < 0 or n_cols < 0:
        raise UserError(f"{path} is a damaged rankest results file (N = {n_rows}, V' = {n_cols}); {fix}.")
    # k ≤ V' on every route (an exact Gram of N < V' rows keeps V' values, the trailing ones 0)
    if ds.ndim != 1 or ds.shape[0] > n_cols:
        raise UserError(f"{path} is a damaged rankest results file (sigma has shape {ds.shape}; a spectrum of "
                        f"V' = {n_cols:,} columns has at most {n_cols:,} singular values, in one dimension); {fix}.")
