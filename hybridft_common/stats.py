"""The one percentile helper: status, benchmarks and experiments summarise samples the same way.

Nearest-rank on the sorted samples (``ordered[min(n-1, int(n*q))]``): no interpolation, so a p99 is
always a value that was really observed -- what an operator reading a pause figure expects.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable


def percentile(values: Iterable[float], q: float) -> float | None:
    """The ``q`` quantile (0..1) of ``values`` by nearest rank; None for no samples."""
    ordered = sorted(values)
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def _rounded(value: float, digits: int | None) -> float:
    # round(x, None) would return an int: None means "as measured"
    return value if digits is None else round(value, digits)


def summarize(
    values: Iterable[float], *, scale: float = 1.0, digits: int | None = 2
) -> dict[str, float | int | None]:
    """``{samples, p50, p99, mean, min, max}`` of ``values`` times ``scale``, rounded to ``digits``
    (``None``: not rounded)."""
    ordered = sorted(v * scale for v in values)
    if not ordered:
        return {"samples": 0, "p50": None, "p99": None, "mean": None, "min": None, "max": None}

    def at(q: float) -> float:
        return _rounded(ordered[min(len(ordered) - 1, int(len(ordered) * q))], digits)

    return {
        "samples": len(ordered),
        "p50": at(0.5),
        "p99": at(0.99),
        "mean": _rounded(statistics.fmean(ordered), digits),
        "min": _rounded(ordered[0], digits),
        "max": _rounded(ordered[-1], digits),
    }


def ratio(a: float | None, b: float | None, digits: int | None = 3) -> float | None:
    """``a / b`` rounded to ``digits`` (``None``: not rounded), or None when either is missing or
    ``b`` is zero."""
    if a is None or b is None or b == 0:
        return None
    return _rounded(a / b, digits)
