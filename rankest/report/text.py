"""Numbers as a report prints them."""

from __future__ import annotations

import numpy as np

from rankest.spectrum import NOT_REACHED, metric_bound


def fmt(x, digits=4) -> str:
    """``x`` with ``digits`` significant digits; "—" for a missing or non-finite value."""
    if x is None:
        return "—"
    if isinstance(x, float):
        if not np.isfinite(x):
            return "—"
        return f"{x:.{digits}g}"
    return str(x)


def fmt_metric(x, digits=4, *, why: bool = False) -> str:
    """A metric as a person reads it: its value, or what a truncated spectrum knows of it.

    A bound (:class:`rankest.spectrum.Bound` or its JSON form) prints as "≥ a", "≤ b" or
    "a … b" ("> k" for a rank beyond the k kept values), a metric with neither side as its
    reason; ``why`` appends the reason to a bound ("a … b (reason)"). Never Python's None.
    """
    b = metric_bound(x)
    if b is None:
        return fmt(x, digits)
    lo, hi = b.lower, b.upper
    if lo is None and hi is None:
        return b.reason or "—"
    if lo is not None and hi is not None and lo == hi:
        text = fmt(lo, digits)
    elif isinstance(lo, int) and b.reason.startswith(NOT_REACHED):
        text = f"> {lo - 1:,}" + (f" (≤ {hi:,})" if hi is not None else "")
    elif lo is not None and hi is not None:
        text = f"{fmt(lo, digits)} … {fmt(hi, digits)}"
    else:
        text = f"≥ {fmt(lo, digits)}" if lo is not None else f"≤ {fmt(hi, digits)}"
    return f"{text} ({b.reason})" if why and b.reason else text
