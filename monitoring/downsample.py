"""Server-side downsampling of a metrics series, so a 100,000-step history draws as fast as a short one.

Buckets of consecutive points keep their lowest and highest value (in step order): a spike or a
dip survives, which a plain stride would drop. The first and last points are always kept, so the
chart starts and ends where the run does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

Point = dict[str, Any]


def _value(p: Point, key: str, missing: float) -> float:
    """The point's value, or ``missing`` when absent or NaN (so it is never picked as an extreme)."""
    v = p.get(key)
    if isinstance(v, int | float) and v == v:
        return float(v)
    return missing


def _extremes(chunk: Sequence[Point], key: str) -> list[int]:
    """Indexes of the lowest and highest value in ``chunk``, in order (one index when they coincide)."""
    lo = hi = 0
    lo_v, hi_v = float("inf"), float("-inf")
    for i, p in enumerate(chunk):
        v = _value(p, key, float("nan"))
        if v != v:
            continue
        if v < lo_v:
            lo, lo_v = i, v
        if v > hi_v:
            hi, hi_v = i, v
    return sorted({lo, hi})


def downsample(points: Sequence[Point], max_points: int, key: str = "loss") -> list[Point]:
    """At most ``max_points`` of ``points`` (in order), keeping per bucket the min and max of ``key``."""
    n = len(points)
    if max_points <= 0:
        return []
    if n <= max_points:
        return list(points)
    if max_points < 4:
        return [points[round(i * (n - 1) / max(max_points - 1, 1))] for i in range(max_points)]
    inner = points[1:-1]
    buckets = (max_points - 2) // 2  # two points per bucket, plus first and last
    size = len(inner) / buckets
    out: list[Point] = [points[0]]
    for b in range(buckets):
        chunk = inner[int(b * size) : int((b + 1) * size)]
        if not chunk:
            continue
        out.extend(chunk[i] for i in _extremes(chunk, key))
    out.append(points[-1])
    return out
