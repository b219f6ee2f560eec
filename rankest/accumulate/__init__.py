"""Accumulators: streaming, mergeable summaries of the target matrix (one file per route).

The interface is :class:`~rankest.accumulate.base.Accumulator` (``update`` / ``merge`` /
``state`` / ``load_state`` / ``finalize``); see :mod:`rankest.accumulate.base`.
"""

from rankest.accumulate.anisotropy import Anisotropy
from rankest.accumulate.base import Accumulator, Chunk, SparseRows
from rankest.accumulate.factor import Factor, centred_head_gram
from rankest.accumulate.gram import Gram, gram_nbytes
from rankest.accumulate.rowstats import RowStats
from rankest.accumulate.sketch import Sketch
from rankest.accumulate.sparse_gram import SparseGram

__all__ = ["Accumulator", "Chunk", "SparseRows", "RowStats", "Gram", "gram_nbytes", "Factor", "centred_head_gram",
           "Sketch", "SparseGram", "Anisotropy"]
