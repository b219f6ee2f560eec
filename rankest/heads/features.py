import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import h5py
import numpy as np
import torch
from tqdm.auto import tqdm

from rankest.errors import UserError
from rankest.heads.config import MIN_VAL_ROWS, HeadsConfig
from rankest.heads.sweep import _head_seed
from rankest.io.h5 import check_digest, check_sizes, write_h5
from rankest.runtime import distributed
from rankest.sources.finite import check_finite_tensor
from rankest.sources.corpus import Batch

#: Format tag of the feature cache.
CACHE_FORMAT = "rankest.features"


#: 2: the file's ``sha256`` covers every byte (:mod:`rankest.io.h5`).
CACHE_VERSION = 2


# ---- features: on the fly or from the HDF5 cache -------------------------------------------
@dataclass
class Split:
    """Rows of one split: packed windows, their plan, and the batch boundaries in rows."""

    windows: torch.Tensor
    plan: Any
    batch_size: int

    @property
    def n_batches(self) -> int:
        return math.ceil(self.plan.windows.numel() / self.batch_size)

    def offsets(self) -> np.ndarray:
        """(n_batches + 1,) first row of every batch, in plan order."""
        before = self.plan.rows_before().numpy()
        idx = np.minimum(np.arange(self.n_batches + 1) * self.batch_size, len(before) - 1)
        return before[idx]

    def batch(self, k: int):

        lo = k * self.batch_size
        idx = self.plan.windows[lo:lo + self.batch_size]
        block = self.windows[idx]
        return Batch(block[:, :-1], block[:, 1:], self.plan.positions[lo:lo + self.batch_size], idx, lo)


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's vocabulary (token → id): features from another tokenizer are refused."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()


def teacher_features(teacher, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, d) features (a normal tensor, usable by autograd) and (rows,) targets of a batch."""
    with torch.inference_mode():
        ids = batch.input_ids.to(teacher.device, non_blocking=True)
        mask = batch.mask.to(teacher.device)
        h = teacher.features(ids)[mask]
        t = batch.targets.to(teacher.device)[mask]
        check_finite_tensor(h, f"the features of teacher {teacher.name} (batch at window {batch.start})",
                            "check its weights (the final norm, the embeddings) and --dtype")
    return h.clone(), t.clone()  # clone outside inference mode: inference tensors cannot enter autograd


def _shard(n: int, world) -> tuple[int, int]:
    """This process's contiguous part [lo, hi) of n items (all of them for one process)."""
    if world is None or not world.active:
        return 0, n
    return n * world.rank // world.size, n * (world.rank + 1) // world.size


class FeatureSource:
    """The training or validation rows, batch by batch: from the teacher, or from the cache.

    With ``world`` (a torchrun job), :meth:`batch` gives this process's disjoint shard of the
    batch — a contiguous part of its windows (on the fly: the teacher runs on those only) or of
    its cached rows — while ``offsets`` and :meth:`rows` stay global, so the batches and the
    global means never depend on the number of processes."""

    def __init__(self, split: Split, teacher=None, cache: Optional[tuple] = None, world=None):
        self.split, self.teacher, self.cache, self.world = split, teacher, cache, world
        self.offsets = split.offsets() if cache is None else cache[2]
        self.n_batches = len(self.offsets) - 1
        self.memo: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.seconds = 0.0  # time spent producing features

    def batch(self, k: int, keep: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        if k in self.memo:
            return self.memo[k] if keep else self.memo.pop(k)
        t0 = time.perf_counter()
        if self.cache is None:
            batch = self.split.batch(k)
            if self.world is not None and self.world.active:
                a, b = _shard(batch.windows.numel(), self.world)
                batch = type(batch)(batch.input_ids[a:b], batch.targets[a:b], batch.mask[a:b], batch.windows[a:b],
                                    batch.start + a)
            if batch.windows.numel() == 0:  # more processes than windows in this batch: no rows here
                t = self.teacher
                out = (torch.zeros(0, t.hidden_size, dtype=t.dtype, device=t.device),
                       torch.zeros(0, dtype=torch.long, device=t.device))
            else:
                out = teacher_features(self.teacher, batch)
        else:
            feats, targs, offsets, device = self.cache
            lo, hi = int(offsets[k]), int(offsets[k + 1])
            a, b = _shard(hi - lo, self.world)
            lo, hi = lo + a, lo + b
            out = (torch.from_numpy(feats[lo:hi]).to(device), torch.from_numpy(targs[lo:hi]).to(device))
        if self.teacher is not None and self.teacher.device.type == "cuda":
            torch.cuda.synchronize(self.teacher.device)
        self.seconds += time.perf_counter() - t0
        if keep:
            self.memo[k] = out
        return out

    def rows(self, k: int) -> int:
        """Global row count of batch k (over every process)."""
        return int(self.offsets[k + 1] - self.offsets[k])

    def all_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [self.batch(k) for k in range(self.n_batches)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def cache_attrs(cfg: HeadsConfig, teacher, corpus_name: str) -> dict[str, Any]:
    return {"teacher": teacher.name, "teacher_source": teacher.source, "revision": str(cfg.revision),
            "hidden_size": teacher.hidden_size, "n_cols": teacher.n_cols,
            "tokenizer": tokenizer_fingerprint(teacher.tokenizer), "teacher_dtype": str(teacher.dtype),
            "corpus": corpus_name, "seq_len": cfg.seq_len, "positions": cfg.positions, "sample": cfg.sample,
            "tokens": -1 if cfg.tokens is None else int(cfg.tokens), "val_tokens": int(cfg.val_tokens),
            "seed": cfg.seed, "batch_size": cfg.batch_size}


_IDENTITY_KEYS = ("teacher", "revision", "hidden_size", "n_cols", "tokenizer")


def check_cache(path: Path, want: dict[str, Any]) -> None:
    """Refuse a cache written for another teacher or tokenizer, or for other rows."""
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise UserError(f"--cache-features {path} is not a readable HDF5 file ({e}); delete it or choose "
                        f"another path.") from e
    with f:
        if f.attrs.get("format") != CACHE_FORMAT:
            raise UserError(f"--cache-features {path} is not a rankest feature cache; choose another path.")
        fix = "delete it or choose another --cache-features path"
        version = f.attrs.get("version")
        if version is not None and int(version) < CACHE_VERSION:
            raise UserError(f"--cache-features {path} was written by an older rankest (cache format {int(version)}, "
                            f"this one writes {CACHE_VERSION}, with a checksum); {fix}: it is rewritten on the next "
                            f"run.")
        check_sizes(f, path, what="feature cache", fix=fix)
        check_digest(f, path, what="feature cache", fix=fix, required=True)
        _check_cache_shapes(f, path, int(want["hidden_size"]), fix)
        have = {k: f.attrs[k] for k in want if k in f.attrs}
    have = {k: (v.item() if hasattr(v, "item") else v) for k, v in have.items()}
    for key in _IDENTITY_KEYS:
        if str(have.get(key)) != str(want[key]):
            what = "tokenizer" if key == "tokenizer" else ("teacher" if key in ("teacher", "revision") else key)
            raise UserError(f"the feature cache {path} was written for a different {what} "
                            f"({key} = {have.get(key)!s:.40} there, {want[key]!s:.40} here); delete it or pass "
                            f"another --cache-features path.")
    diff = [k for k in want if k not in _IDENTITY_KEYS and k != "teacher_source" and str(have.get(k)) != str(want[k])]
    if diff:
        raise UserError(f"the feature cache {path} holds other rows ({', '.join(f'{k} = {have.get(k)} there, {want[k]} here' for k in diff)}); "
                        f"delete it, pass another --cache-features path, or rerun with the same options.")


def _check_cache_shapes(f, path, d: int, fix: str) -> None:
    """Each split: (n, d) features, (n,) targets, offsets rising from 0 to n."""
    for name in ("train", "val"):
        feats, targs, offs = (f.get(f"{name}_{k}") for k in ("features", "targets", "offsets"))
        if not all(isinstance(x, h5py.Dataset) for x in (feats, targs, offs)):
            raise UserError(f"the feature cache {path} is damaged (its {name} split is incomplete); {fix}.")
        n = feats.shape[0] if feats.ndim == 2 else -1
        o = np.asarray(offs[()]) if offs.ndim == 1 and offs.shape[0] >= 2 else np.zeros(0)
        if (feats.ndim != 2 or feats.shape[1] != d or targs.shape != (n,) or o.size < 2 or o[0] != 0
                or o[-1] != n or np.any(np.diff(o) < 0)):
            raise UserError(f"the feature cache {path} is damaged (its {name} split has features {feats.shape}, "
                            f"targets {targs.shape} and {o.size} offsets, for d = {d}); {fix}.")


def write_cache(path: Path, attrs: dict, train: FeatureSource, val: FeatureSource, quiet: bool) -> None:
    """One pass of the teacher over both splits into an HDF5 file (fp32 features, fp64 for an fp64
    teacher; int64 targets; the row offsets of every batch, so the cached batches are the same)."""
    n_train, n_val = int(train.offsets[-1]), int(val.offsets[-1])
    d = attrs["hidden_size"]
    with write_h5(path) as f:
        for k, v in attrs.items():
            f.attrs[k] = v
        f.attrs["format"] = CACHE_FORMAT
        f.attrs["version"] = CACHE_VERSION
        bar = tqdm(total=n_train + n_val, unit="tok", unit_scale=True, desc="caching features", disable=quiet)
        for name, src, n in (("train", train, n_train), ("val", val, n_val)):
            # fp32 holds bf16/fp16/fp32 features exactly; an fp64 teacher keeps fp64.
            fdt = "f8" if attrs["teacher_dtype"] == str(torch.float64) else "f4"
            fd = f.create_dataset(f"{name}_features", (n, d), dtype=fdt, chunks=(min(n, 1024), d))
            td = f.create_dataset(f"{name}_targets", (n,), dtype="i8")
            f.create_dataset(f"{name}_offsets", data=src.offsets.astype(np.int64))
            for k in range(src.n_batches):
                h, t = src.batch(k)
                lo, hi = int(src.offsets[k]), int(src.offsets[k + 1])
                fd[lo:hi] = h.to(torch.float64 if fdt == "f8" else torch.float32).cpu().numpy()
                td[lo:hi] = t.cpu().numpy()
                bar.update(hi - lo)
        bar.close()


# ---- the pipeline --------------------------------------------------------------------------------
def split_windows(n_windows: int, cfg: HeadsConfig, per_window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded split of the packed windows into (validation, training) indices: whole windows,
    so no validation context is ever a training row."""
    n_val_w = math.ceil(int(cfg.val_tokens) / per_window)
    n_val_rows = min(int(cfg.val_tokens), n_val_w * per_window)
    if n_val_rows < MIN_VAL_ROWS:
        raise UserError(f"the validation split would hold {n_val_rows} rows ({n_val_w} windows × up to "
                        f"{per_window} positions), fewer than the {MIN_VAL_ROWS} needed to measure loss and "
                        f"accuracy; raise --val-tokens to at least {MIN_VAL_ROWS}.")
    if n_val_w >= n_windows:
        raise UserError(f"the corpus gives {n_windows} windows of {cfg.seq_len + 1} tokens, but the validation "
                        f"split alone needs {n_val_w} ({cfg.val_tokens} rows) and training at least one more; "
                        f"lower --val-tokens or --seq-len, or use a bigger corpus.")
    gen = torch.Generator().manual_seed(_head_seed(cfg.seed, -1))
    perm = torch.randperm(n_windows, generator=gen)
    return perm[:n_val_w], perm[n_val_w:]


def global_rows(src: FeatureSource, n_max: int, world=None) -> torch.Tensor:
    """The first ``n_max`` feature rows of a split in its global order, on every process.

    Under torchrun each batch's shards (contiguous, in process order) are gathered through one
    zero-padded sum; the batches stay in the source's memo for :meth:`FeatureSource.all_rows`.
    """
    parts, got = [], 0
    for k in range(src.n_batches):
        if got >= n_max:
            break
        h, _ = src.batch(k, keep=True)
        if world is not None and world.active:
            counts = distributed.all_sum(world, np.eye(world.size)[world.rank] * h.shape[0]).astype(int)
            buf = h.new_zeros(world.size, int(counts.max()), h.shape[1])
            buf[world.rank, :h.shape[0]] = h
            distributed.all_sum_(world, [buf])
            h = torch.cat([buf[p, :counts[p]] for p in range(world.size)])
        parts.append(h)
        got += h.shape[0]
    return torch.cat(parts)[:n_max]
