"""Sweeps over a teacher's checkpoints: resolve, load one at a time, append results, resume.

A checkpoint is named by ``--revisions A,B,…``; each name is, in this order:

1. a local model folder (``config.json`` + weights + tokenizer, as ``save_pretrained`` writes);
2. a sub-folder of a local ``--teacher`` folder (``--teacher runs/m --revisions step1000`` →
   ``runs/m/step1000``);
3. a Hub revision of a table teacher (Pythia's branches ``step0`` … ``step143000``), looked up
   in the Hugging Face cache first, then on the Hub when the network is allowed.

Every name is checked before the first model is loaded: names that do not exist raise one
:class:`~rankest.errors.UserError` that lists the revisions that were found.

A sweep loads one checkpoint, computes its result, frees the model and appends the result to
``DIR/<kind>.h5`` (one group per checkpoint) by an atomic rewrite — a crash leaves the file
with the checkpoints that were finished, never a half-written one — then rewrites
``DIR/<kind>.json``. With ``resume`` the checkpoints already in the file are skipped.

    python -m rankest head-spectrum --teacher pythia-70m --revisions step1000,step143000 --out runs/hs
    python -m rankest head-spectrum --teacher pythia-70m --revisions step1000,step143000 --out runs/hs --resume
"""

from __future__ import annotations

import gc
import json
import pathlib
import shutil
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch

from rankest.errors import UserError
from rankest.io.results import SCHEMA_VERSION, atomic_path, now_iso, provenance, write_text_atomic
from rankest.spectrum import _jsonable, to_json

__all__ = ["Checkpoint", "resolve_checkpoints", "cached_revisions", "sweep_checkpoints", "write_results",
           "read_results", "KINDS"]

#: Result kinds and their file stems in a run folder (INTERFACES.md: anisotropy.*, head_spectrum.*).
KINDS = ("anisotropy", "head_spectrum")
_GROUP = "checkpoints"


@dataclass
class Checkpoint:
    """One checkpoint of a sweep: ``label`` names it in results and plots; ``target`` is what
    :func:`rankest.teachers.load_teacher` loads (a table row, a path) or an already loaded
    Teacher; ``revision`` the Hub revision (None for local folders)."""

    label: str
    target: Any
    revision: Optional[str] = None

    @property
    def loaded(self) -> bool:
        return hasattr(self.target, "head") and hasattr(self.target, "model")


# ---- resolving names -------------------------------------------------------------------------
def cached_revisions(hf_id: str, cache_dir=None) -> list[str]:
    """Revisions of ``hf_id`` present in the Hugging Face cache: its refs (branches, tags) and the
    commit hashes of its snapshots."""
    from rankest.sources.teachers import _cache_dir

    repo = pathlib.Path(_cache_dir(cache_dir)) / f"models--{hf_id.replace('/', '--')}"
    found: list[str] = []
    refs = repo / "refs"
    if refs.is_dir():
        found += sorted(str(p.relative_to(refs)) for p in refs.rglob("*") if p.is_file())
    snaps = repo / "snapshots"
    if snaps.is_dir():
        found += sorted(p.name for p in snaps.iterdir() if p.is_dir())
    return found


def _remote_revisions(hf_id: str) -> Optional[list[str]]:
    """Branches and tags on the Hub, or None when the Hub cannot be asked."""
    from rankest.sources.teachers import _offline

    if _offline():
        return None
    try:
        from huggingface_hub import list_repo_refs

        refs = list_repo_refs(hf_id)
    except Exception:  # noqa: BLE001 - no network / no hub: fall back to the load-time error
        return None
    return [r.name for r in (*refs.branches, *refs.tags)]


def _step_sort(names: list[str]) -> list[str]:
    """stepN names numerically (step1000 before step143000), then the rest."""
    def key(s: str):
        tail = s[4:] if s.startswith("step") else ""
        return (0, int(tail), s) if tail.isdigit() else (1, 0, s)

    return sorted(set(names), key=key)


def _summarise(names: list[str], limit: int = 12) -> str:
    if not names:
        return "none"
    shown = names if len(names) <= limit else names[: limit // 2] + ["…"] + names[-limit // 2:]
    return ", ".join(shown) + (f" ({len(names)} in all)" if len(names) > limit else "")


def _local_checkpoints(folder: pathlib.Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and (p / "config.json").is_file())


def resolve_checkpoints(teacher, revisions: Optional[list[str]] = None, *, cache_dir=None) -> list[Checkpoint]:
    """Turn ``--teacher`` and ``--revisions`` into the checkpoints of a sweep (see the module
    docstring); raise one :class:`UserError` naming every revision that does not exist and
    listing the ones found."""
    from rankest.sources.teachers import TeacherInfo, resolve_teacher

    revisions = [r for r in (revisions or []) if str(r).strip()]
    if hasattr(teacher, "head") and hasattr(teacher, "model"):  # a loaded Teacher
        if revisions:
            raise UserError("a loaded teacher has no other revisions; pass the teacher's name or folder to sweep "
                            "--revisions")
        return [Checkpoint(teacher.revision or teacher.name, teacher, None)]
    folder = None if isinstance(teacher, TeacherInfo) else pathlib.Path(str(teacher)).expanduser()
    if folder is not None and folder.is_dir() and not (folder / "config.json").is_file():
        # A folder of checkpoint sub-folders is not a model itself: it needs --revisions.
        subs = _local_checkpoints(folder)
        if subs and not revisions:
            raise UserError(f"{folder} holds checkpoint folders ({_summarise(subs)}), not one model; pick them "
                            "with --revisions")
    target = teacher if isinstance(teacher, TeacherInfo) else (
        folder if folder is not None and folder.is_dir() and revisions else resolve_teacher(teacher))
    name = target.name if isinstance(target, TeacherInfo) else str(target)
    if not revisions:
        return [Checkpoint(name, target, None)]
    if len(set(revisions)) != len(revisions):
        raise UserError(f"--revisions lists a checkpoint twice ({', '.join(revisions)}); give each once")

    checkpoints: list[Checkpoint] = []
    missing: list[str] = []
    hub_found: Optional[list[str]] = None  # cached + remote revisions, looked up once
    remote: Optional[list[str]] = None
    hub_checkable = False
    for rev in revisions:
        path = pathlib.Path(rev).expanduser()
        if path.is_dir() or (path.is_file() and path.suffix == ".gguf"):
            checkpoints.append(Checkpoint(rev, resolve_teacher(path), None))  # UserError if not a model
        elif isinstance(target, pathlib.Path) and target.is_dir() and (target / rev / "config.json").is_file():
            checkpoints.append(Checkpoint(rev, target / rev, None))
        elif isinstance(target, TeacherInfo) and target.gguf is None:
            if hub_found is None:
                cached = cached_revisions(target.hf_id, cache_dir)
                remote = _remote_revisions(target.hf_id)
                hub_found = cached + (remote or [])
                # Offline, the cache is all there is; online without an answer, load_teacher decides.
                hub_checkable = remote is not None or _offline_now()
            if hub_checkable and rev not in hub_found:
                missing.append(rev)
            else:
                checkpoints.append(Checkpoint(rev, target, rev))
        else:
            missing.append(rev)
    if missing:
        if isinstance(target, TeacherInfo) and target.gguf is None:
            where = (f"found for {target.hf_id} in the Hugging Face cache"
                     + (" and on the Hub" if remote is not None else " (the Hub is not reachable)")
                     + f": {_summarise(_step_sort(hub_found or []))}")
        elif isinstance(target, pathlib.Path) and target.is_dir():
            where = f"checkpoint sub-folders found in {target}: {_summarise(_local_checkpoints(target))}"
        else:
            where = f"{name} is a single model without revisions; pass local checkpoint folders instead"
        raise UserError(f"revision(s) {', '.join(missing)} not found — {where}; check the names, download them, "
                        "or pass local checkpoint folders")
    return checkpoints


def _offline_now() -> bool:
    from rankest.sources.teachers import _offline

    return _offline()


# ---- result files ----------------------------------------------------------------------------
def _split(result: dict[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Arrays (ndim ≥ 1) become datasets; everything else JSON scalars."""
    arrays, scalars = {}, {}
    for key, value in result.items():
        if isinstance(value, np.ndarray) and value.ndim >= 1:
            arrays[key] = value
        else:
            scalars[key] = value.item() if isinstance(value, np.ndarray) else value
    return arrays, _jsonable(scalars)


def _write_group(f, index: int, label: str, result: dict[str, Any]) -> None:
    g = f.require_group(_GROUP).create_group(f"{index:05d}")
    arrays, scalars = _split(result)
    for key, value in arrays.items():
        g.create_dataset(key, data=value)
    g.attrs["label"] = label
    g.attrs["scalars"] = json.dumps(scalars)
    g.attrs["finished"] = now_iso()


def _write_header(f, kind: str, config: dict, prov: dict) -> None:
    f.attrs["format"] = f"rankest.{kind}"
    f.attrs["schema_version"] = SCHEMA_VERSION
    f.attrs["config"] = to_json(config)
    f.attrs["provenance"] = to_json(prov)


def read_results(path, kind: str) -> tuple[dict, dict[str, dict[str, Any]]]:
    """(config, {label: result}) of a ``<kind>.h5`` file, in the order the checkpoints finished."""
    import h5py

    path = pathlib.Path(path)
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise UserError(f"{path} is not a readable HDF5 file (truncated or corrupt?): {e}") from e
    with f:
        if f.attrs.get("format") != f"rankest.{kind}":
            raise UserError(f"{path} is not a rankest {kind} results file")
        if int(f.attrs.get("schema_version", -1)) > SCHEMA_VERSION:
            raise UserError(f"{path} was written by a newer rankest; upgrade rankest")
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
    import h5py

    out = pathlib.Path(out)
    with atomic_path(out / f"{kind}.h5") as tmp:
        with h5py.File(tmp, "w") as f:
            _write_header(f, kind, config, prov)
            for i, (label, res) in enumerate(results.items()):
                _write_group(f, i, label, res)
    write_text_atomic(out / f"{kind}.json", _summary_json(kind, config, prov, results))


def _append(path: pathlib.Path, kind: str, label: str, result: dict, *, config: dict, prov: dict) -> None:
    """Add one checkpoint's group: copy the file, add the group, rename over it (atomic)."""
    import h5py

    with atomic_path(path) as tmp:
        if path.exists():
            shutil.copyfile(path, tmp)
            mode = "a"
        else:
            mode = "w"
        with h5py.File(tmp, mode) as f:
            if mode == "w":
                _write_header(f, kind, config, prov)
            else:
                f.attrs["provenance"] = to_json(prov)
            _write_group(f, len(f.get(_GROUP, {})), label, result)


# ---- the sweep -------------------------------------------------------------------------------
#: Config keys that must match for --resume to add to an existing file (device/dtype may change).
_RESUME_IGNORES = ("revisions", "device", "dtype", "device_map")


def sweep_checkpoints(kind: str, checkpoints: list[Checkpoint], compute: Callable[[Any], dict[str, Any]], *,
                      out=None, config: dict, device="auto", dtype="auto", device_map=None, overwrite: bool = False,
                      resume: bool = False, quiet: bool = False, cache_dir=None) -> dict[str, dict[str, Any]]:
    """Load each checkpoint in turn, ``compute(teacher)``, free it, append the result.

    Returns {label: result} for the requested checkpoints, in their order (results already in
    the file are read back when resuming).
    """
    from tqdm.auto import tqdm

    from rankest.sources.teachers import load_teacher, quiet_loading

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")
    path = None
    done: dict[str, dict[str, Any]] = {}
    if out is not None:
        folder = pathlib.Path(out)
        if folder.exists() and not folder.is_dir():
            raise UserError(f"--out {folder} exists and is not a folder; choose another path")
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create the run folder {folder} ({e.strerror}); choose a writable --out") from e
        path = folder / f"{kind}.h5"
        if path.exists():
            if resume:
                old_config, done = read_results(path, kind)
                diff = sorted(k for k in set(config) | set(old_config) if k not in _RESUME_IGNORES
                              and _jsonable(config.get(k)) != _jsonable(old_config.get(k)))
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
    for ckpt in todo:
        if ckpt.loaded:
            teacher = ckpt.target
        else:
            with quiet_loading(quiet):
                teacher = load_teacher(ckpt.target, revision=ckpt.revision, device=device, dtype=dtype,
                                       cache_dir=cache_dir, device_map=device_map)
        try:
            result = compute(teacher)
            result["source"] = teacher.source
            if path is not None:
                prov["device_name"] = provenance(teacher.device).get("device_name")
                prov["finished"] = now_iso()
                _append(path, kind, ckpt.label, result, config=config, prov=prov)
            results[ckpt.label] = result
        finally:
            if not ckpt.loaded:  # free the checkpoint before the next one is loaded
                dev = teacher.device
                del teacher
                gc.collect()
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
        bar.update(1)
    bar.close()
    if path is not None:
        _, everything = read_results(path, kind)
        write_text_atomic(path.with_suffix(".json"), _summary_json(kind, config, prov, everything))
    return {c.label: results[c.label] if c.label in results else done[c.label] for c in checkpoints}
