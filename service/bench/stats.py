"""Percentiles and small summaries (pure)."""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["ms", "pct", "summary_ms"]


def pct(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..1); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def ms(seconds: float, digits: int = 3) -> float | None:
    """Seconds to rounded milliseconds (None for NaN, so the JSON stays valid)."""
    if seconds is None or math.isnan(seconds):
        return None
    return round(seconds * 1000, digits)


def summary_ms(values: Sequence[float]) -> dict[str, float | int | None]:
    return {"n": len(values), "p50_ms": ms(pct(values, 0.5)), "p99_ms": ms(pct(values, 0.99)),
            "max_ms": ms(max(values)) if values else None}
