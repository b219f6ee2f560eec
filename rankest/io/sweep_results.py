import json
import pathlib
from typing import Any

import numpy as np

from rankest.io.files import jsonable, now_iso, to_json, write_text_atomic
from rankest.io.h5 import checked_dataset, mark, open_checked, write_h5
from rankest.io.spectrum_file import SCHEMA_VERSION

#: Result kinds and their file stems in a run folder (anisotropy.*, head_spectrum.*; docs/design.md, "Run folders").
KINDS = ("anisotropy", "head_spectrum")


_GROUP = "checkpoints"


# ---- result files ----------------------------------------------------------------------------
def _split(result: dict[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Arrays (ndim ≥ 1) become datasets; everything else JSON scalars."""
    arrays, scalars = {}, {}
    for key, value in result.items():
        if isinstance(value, np.ndarray) and value.ndim >= 1:
            arrays[key] = value
        else:
            scalars[key] = value.item() if isinstance(value, np.ndarray) else value
    return arrays, jsonable(scalars)


def _write_group(f, index: int, label: str, result: dict[str, Any]) -> None:
    g = f.require_group(_GROUP).create_group(f"{index:05d}")
    arrays, scalars = _split(result)
    for key, value in arrays.items():
        checked_dataset(g, key, value)
    g.attrs["label"] = label
    g.attrs["scalars"] = json.dumps(scalars)
    g.attrs["finished"] = now_iso()


def _write_header(f, kind: str, config: dict, prov: dict) -> None:
    mark(f, f"rankest.{kind}", SCHEMA_VERSION)
    f.attrs["config"] = to_json(config)
    f.attrs["provenance"] = to_json(prov)


def read_results(path, kind: str) -> tuple[dict, dict[str, dict[str, Any]]]:
    """(config, {label: result}) of a ``<kind>.h5`` file, in the order the checkpoints finished;
    a foreign, newer or damaged file is refused with a sentence."""
    with open_checked(path, fmt=f"rankest.{kind}", version=SCHEMA_VERSION, what=f"rankest {kind} results file",
                      fix="pass --overwrite to start the sweep again, or choose another --out") as f:
        config = json.loads(f.attrs.get("config", "{}"))
        out: dict[str, dict[str, Any]] = {}
        for key in sorted(f.get(_GROUP, {})):
            g = f[_GROUP][key]
            res: dict[str, Any] = {k: np.asarray(g[k][...]) for k in g}
            res.update(json.loads(g.attrs["scalars"]))
            out[str(g.attrs["label"])] = res
    return config, out


def _summary_json(kind: str, config: dict, prov: dict, results: dict[str, dict[str, Any]]) -> str:
    return to_json({"kind": kind, "config": config, "provenance": prov, "revisions": list(results),
                    "results": results}) + "\n"


def write_results(out, kind: str, results: dict[str, dict[str, Any]], *, config: dict, prov: dict) -> None:
    """Write ``out/<kind>.h5`` and ``out/<kind>.json`` afresh with these results (atomically)."""
    out = pathlib.Path(out)
    with write_h5(out / f"{kind}.h5") as f:
        _write_header(f, kind, config, prov)
        for i, (label, res) in enumerate(results.items()):
            _write_group(f, i, label, res)
    write_text_atomic(out / f"{kind}.json", _summary_json(kind, config, prov, results))


def _append(path: pathlib.Path, kind: str, label: str, result: dict, *, config: dict, prov: dict) -> None:
    """Add one checkpoint's group: copy the file, add the group, rename over it (atomic)."""
    exists = path.exists()
    with write_h5(path, copy_from=path if exists else None) as f:
        if not exists:
            _write_header(f, kind, config, prov)
        else:
            f.attrs["provenance"] = to_json(prov)
        _write_group(f, len(f.get(_GROUP, {})), label, result)
