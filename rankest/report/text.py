"""Numbers as a report prints them."""

from __future__ import annotations

import numpy as np


def fmt(x, digits=4) -> str:
    """``x`` with ``digits`` significant digits; "—" for a missing or non-finite value."""
    if x is None:
        return "—"
    if isinstance(x, float):
        if not np.isfinite(x):
            return "—"
        return f"{x:.{digits}g}"
    return str(x)
