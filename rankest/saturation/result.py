"""saturation.h5: the record of saturation.json, the curves and the law's bootstrap samples.

Written sealed and atomically like every rankest results file (:func:`rankest.io.h5.write_h5`);
read back by ``rankest report DIR``, which redraws the saturation report from it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from rankest.io.files import to_json
from rankest.io.h5 import checked_dataset, mark, open_checked, write_h5
from rankest.saturation.lawfit import PowerLawFit

#: The format mark of saturation.h5.
FORMAT = "rankest.saturation"

#: Schema of saturation.h5: 3 seals the file (sha256) and keeps the bootstrap samples
#: (``fit/samples``); earlier files carried the spectrum files' schema number and neither.
SCHEMA_VERSION = 3

#: The per-checkpoint arrays of a model (besides steps / values / stderr) kept as datasets.
DIAGNOSTIC_KEYS = ("last_layer_anisotropy", "head_singular_entropy_kl", "head_singular_entropy_kl_sq",
                   "head_singular_entropy_max", "head_effective_rank", "head_stable_rank", "head_sigma_ratio",
                   "freq_share_top1pct", "freq_share_top10pct")

_FIX = "give the --out folder of a finished `rankest saturation` run, or run it again"


def write_saturation_h5(path: Path, record: dict, fit: PowerLawFit, config: dict, prov: dict) -> None:
    """Write saturation.h5 (atomically; an OSError leaves ``path`` untouched)."""
    with write_h5(path) as f:
        mark(f, FORMAT, SCHEMA_VERSION)
        f.attrs["summary"] = to_json(record)
        f.attrs["config"] = to_json(config)
        f.attrs["provenance"] = to_json(prov)
        checked_dataset(f.create_group("fit"), "samples", np.asarray(fit.samples, dtype=np.float64))
        for name, m in record["models"].items():
            g = f.create_group(f"models/{name}")
            for key in ("steps", "values", "stderr", *DIAGNOSTIC_KEYS):
                if m.get(key) is not None:
                    checked_dataset(g, key, np.asarray(m[key], dtype=np.float64))


def read_saturation_h5(path: Path) -> tuple[dict, PowerLawFit]:
    """(record, fit) of a saturation.h5; a missing, foreign, older, newer or damaged file is
    refused with one sentence."""
    # Schema 3 is the first with the bootstrap samples the report's band is drawn from.
    with open_checked(path, fmt=FORMAT, version=SCHEMA_VERSION, what="rankest saturation results file",
                      fix=_FIX, oldest=SCHEMA_VERSION) as f:
        record = json.loads(f.attrs["summary"])
        samples = np.asarray(f["fit/samples"][...])
    return record, PowerLawFit.from_summary(record["fit"], samples)
