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

import pathlib
from dataclasses import dataclass
from typing import Any, Optional

from rankest.errors import UserError
from rankest.sources.teachers import TeacherInfo, _cache_dir, _offline, hub_reachable, resolve_teacher

__all__ = ["Checkpoint", "resolve_checkpoints", "cached_revisions"]



@dataclass
class Checkpoint:
    """One checkpoint of a sweep: ``label`` names it in results and plots; ``target`` is what
    :func:`rankest.sources.teachers.load_teacher` loads (a table row, a path) or an already loaded
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
    """Branches and tags on the Hub, or None when the Hub cannot be asked (offline: known in a
    second or two, not after the client's retries)."""
    if _offline() or not hub_reachable():
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

    return _offline()


















