"""RowCache: rows written once, streamed back bit for bit (after the cast to the cache dtype)."""

import collections

import pytest
import torch

from rankest.accumulators import Chunk
from rankest.errors import UserError
from rankest.rowcache import CACHE_DTYPES, RowCache, cache_nbytes, resolve_cache_dtype
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
