"""The divergence monitor's rules: when must the engine restore its last good point?

Skipping examples is a bet that they stay learned. Two measurements can show it lost:
- ``remeasured``: the correct phase's forward-only re-measurement of skipped examples: their mean loss rose by
  more than ``tol`` (relative) over what the table recorded, or is not finite;
- ``evaluated``: the validation loss rose more than ``tol`` (relative) above the best one since skipping began,
  or is not finite.
Pure functions of plain values; the engine restores and falls back to full steps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def remeasured(old: Sequence[float], new: Sequence[float], tol: float) -> str | None:
    """``remeasured_rise`` / ``not_finite`` when the re-measured losses say the bet lost, else None."""
    if not new:
        return None
    if not all(math.isfinite(x) for x in new):
        return "not_finite"
    before, after = sum(old) / len(old), sum(new) / len(new)
    return "remeasured_rise" if after > before * (1 + tol) else None


def evaluated(val: float, best: float | None, tol: float) -> str | None:
    """``val_rise`` / ``not_finite`` when the validation loss says the bet lost, else None."""
    if not math.isfinite(val):
        return "not_finite"
    if best is not None and val > best * (1 + tol):
        return "val_rise"
    return None
