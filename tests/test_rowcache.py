"""RowCache: rows written once, streamed back bit for bit (after the cast to the cache dtype)."""

import collections

import pytest
import torch

from rankest.accumulate.base import Chunk
from rankest.errors import UserError
from rankest.io.rowcache import CACHE_DTYPES, RowCache, cache_nbytes, resolve_cache_dtype
from rankest.testing import generator


@pytest.mark.parametrize("dtype", sorted(CACHE_DTYPES))
def test_roundtrip_in_order_any_chunking(tmp_path, dtype):
    g = generator(3)
    parts = [torch.randn(n, 37, generator=g, dtype=torch.float64) for n in (5, 0, 64, 1)]
    cache = RowCache(tmp_path / "rows.h5", 37, sum(p.shape[0] for p in parts), dtype=dtype)
    for p in parts:
        cache.update(Chunk(stats=torch.zeros(p.shape[0], 4), rows=p))
    want = torch.cat(parts).to(CACHE_DTYPES[dtype]).double()
    for rows_per in (7, 1000):
        stream = cache.stream(device="cpu", chunk_rows=rows_per, out_dtype=torch.float64)
        for _ in range(2):  # every call re-reads the file from the start
            got = list(stream())
            assert [c.shape[0] for c in got][:-1] == [rows_per] * (len(got) - 1)
            assert torch.equal(torch.cat(got), want)
    cache.remove()
    assert not (tmp_path / "rows.h5").exists()


def test_bad_use_and_disk_check(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="--row-cache-dtype"):
        RowCache(tmp_path / "a.h5", 4, 2, dtype="int8")
    cache = RowCache(tmp_path / "b.h5", 4, 2)
    with pytest.raises(ValueError, match="shape"):
        cache.append(torch.zeros(1, 5))
    with pytest.raises(ValueError, match="holds 2 rows"):
        cache.append(torch.zeros(3, 4))
    cache.remove()
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr("shutil.disk_usage", lambda _: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(UserError, match="GiB free"):
        RowCache(tmp_path / "c.h5", 1000, 1000)
    assert cache_nbytes(1000, 1000, "bf16") == 2_000_000
    assert resolve_cache_dtype("auto", torch.bfloat16) == "bf16" and resolve_cache_dtype("auto", torch.float32) == "fp32"


@pytest.mark.slow  # a child Python process
def test_killed_writer_leaves_the_synced_rows_for_a_resume(tmp_path):
    """A child process writes 40 rows, syncs (what a checkpoint does), writes 25 rows more and dies
    without closing the file (os._exit: no flush, no HDF5 shutdown — as after kill -9). The file
    reopens at the 40 checkpointed rows, the rest is written over, and the stream equals the
    rows of an uninterrupted writer."""
    import subprocess
    import sys

    from pathlib import Path

    from rankest.testing import subprocess_env

    g = generator(8)
    rows = torch.randn(100, 33, generator=g, dtype=torch.float64)
    torch.save(rows, tmp_path / "rows.pt")
    child = (
        "import os, torch\n"
        "from rankest.io.rowcache import RowCache\n"
        f"rows = torch.load({str(tmp_path / 'rows.pt')!r})\n"
        f"c = RowCache({str(tmp_path / 'rows.h5')!r}, 33, 100, dtype='fp32')\n"
        "c.append(rows[:40]); c.sync()\n"
        "c.append(-7.0 * torch.ones(25, 33))\n"
        "os._exit(0)\n")
    proc = subprocess.run([sys.executable, "-c", child], env=subprocess_env(Path(__file__).resolve().parents[1]), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    cache = RowCache(tmp_path / "rows.h5", 33, 100, dtype="fp32", resume_rows=40)
    cache.append(rows[40:])
    got = torch.cat(list(cache.stream(device="cpu", out_dtype=torch.float64)()))
    assert torch.equal(got, rows.float().double())
    cache.remove()


def test_resume_refuses_another_cache(tmp_path):
    c = RowCache(tmp_path / "rows.h5", 8, 10, dtype="fp32")
    c.close()
    with pytest.raises(UserError, match="not the checkpointed run's"):
        RowCache(tmp_path / "rows.h5", 8, 10, dtype="fp16", resume_rows=3)
    with pytest.raises(UserError, match="not the checkpointed run's"):
        RowCache(tmp_path / "rows.h5", 9, 10, dtype="fp32", resume_rows=3)
    with pytest.raises(UserError, match="missing or unreadable"):
        RowCache(tmp_path / "gone.h5", 8, 10, dtype="fp32", resume_rows=3)


def test_empty_shard_yields_one_empty_chunk(tmp_path):
    """A torchrun process without rows still takes part in every pass: its stream yields (0, V')."""
    c = RowCache(tmp_path / "rows.h5", 6, 0)
    got = list(c.stream(device="cpu")())
    assert len(got) == 1 and tuple(got[0].shape) == (0, 6)
    c.remove()
