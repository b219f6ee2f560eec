"""The sketch route's memory accounting (Sketch.memory, route_reason) against what it holds:
the components are the sizes of the real tensors, and finalize's peak stays within its share."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from rankest.accumulate.base import Chunk
from rankest.accumulate.sketch import Sketch


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Largest RSS increment over the value at entry, sampled every millisecond in a thread."""

    def __enter__(self):
        self.base = self.peak = rss_bytes()
        self._stop = False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop:
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop = True
        self._t.join()
        self.delta = max(self.peak, rss_bytes()) - self.base


@pytest.mark.parametrize("precision", ["fp64", "fp32"])
def test_components_are_the_tensors_sizes(precision):
    v, k, rows = 3000, 40, 50
    sk = Sketch(v, k, space="prob", precision=precision)
    parts = Sketch.memory(v, k, precision=precision, chunk_rows=rows)
    assert parts["state"] == sk.y.numel() * sk.y.element_size()
    block = sk.test_block()
    assert parts["test_block"] == block.numel() * block.element_size()
    m, l = sk.y.shape[1], sk.l
    item = block.element_size()
    assert parts["chunk"] == rows * (v + m) * item + (0 if item == 8 else v * min(256, m) * item)
    assert parts["finalize"] == 3 * v * l * 8 + v * k * 8
    assert Sketch.peak_bytes(parts) == parts["state"] + max(parts["test_block"] + parts["chunk"], parts["finalize"])


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc (Linux) to read the RSS")
@pytest.mark.parametrize("precision", ["fp64", "fp32"])
def test_finalize_stays_within_its_accounted_workspace(precision):
    """V' = 20,000, l = 400: every V'×l fp64 array is 61 MiB, so a copy too many shows. Before the
    accounting, finalize held the cached test block, Ω beside its Q, Y_ν beside Y·R⁻¹ and a
    transposed copy for the solve: ~6 arrays (395 MiB here for fp64) against the 3 + k/l counted."""
    torch.manual_seed(0)
    v, k = 20_000, 200
    sk = Sketch(v, k, space="prob", precision=precision)
    sk.cheap_finalize = False  # as for V'·l² beyond the milestones' budget (the real prob sketch)
    rows = torch.randn(300, v).abs()
    sk.update(Chunk(stats=torch.zeros(300, 4), rows=rows))
    parts = Sketch.memory(v, k, precision=precision, chunk_rows=300)
    with PeakRSS() as m:
        spec = sk.finalize(energy=float((rows.double() ** 2).sum()))
    assert sk._x is None  # the test block went before the workspace
    assert m.delta <= parts["finalize"] * 1.1, (m.delta / 2**20, parts["finalize"] / 2**20)
    assert spec.sigma.size == k and spec.sigma[0] > 0
