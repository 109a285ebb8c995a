"""The validation-curve model and the stop rule: when has a run learnt what it will learn?

Learning-curve extrapolation (Domhan et al. 2015) in its smallest useful form: the evaluations so far (after the
learning-rate warmup, under the job's cosine schedule), fitted by a saturating curve
``L(t) = a + b g(t)`` with ``g`` either a power law ``(t + 1) ** -c`` or an exponential ``exp(-c t / span)``. For each
``c`` on a log grid, ``a`` and ``b`` are a linear least-squares fit (``b >= 0``: the loss falls); the best ``c`` and
the better family (least squared error) win. No optimiser: the grid makes the fit deterministic and bounded in time.

The stop rule: the first step ``t`` from now whose remaining improvement to the planned end, ``L(t) - L(end)``,
is below ``tolerance x L(t)``: training on past it would buy less than that share; and, measured rather than
fitted, the last evaluations improved on the first of them by less than that share too (``measured_flat``): under
a cosine schedule the loss falls faster as the learning rate decays, which a saturating fit does not foresee, so
the fit alone stopped the tiny default-job profile 10 % short of the baseline's loss (docs/BENCHMARKS.md).
The engine also waits until the validation loss is below the run's first evaluation by that share: a continual
job's curve rose, then sat flat above its start before falling in the cosine's decay, and a stop there ended it
10-15 % short (docs/BENCHMARKS.md, continual profile).
The engine cuts the schedule short there (a linear decay to the floor, ``core.schedule.cut_lr_at``) and stops
after it. The engine reports ``L`` at that step as the predicted final loss (before the short decay's own gain).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

Kind = Literal["power", "exp"]
GRID = 61  # values of c per family


@dataclass(frozen=True)
class CurveFit:
    kind: Kind
    a: float  # the asymptote
    b: float  # the scale (>= 0)
    c: float  # the rate
    span: float  # steps the exponential's rate is relative to
    sse: float  # sum of squared errors over the fitted points
    points: int

    def value(self, t: np.ndarray | float) -> np.ndarray:
        return self.a + self.b * _basis(self.kind, np.asarray(t, dtype=np.float64), self.c, self.span)

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)


def _basis(kind: Kind, t: np.ndarray, c: float, span: float) -> np.ndarray:
    if kind == "power":
        return np.asarray((t + 1.0) ** -c)
    return np.asarray(np.exp(-c * t / span))


def fit(steps: list[int], losses: list[float]) -> CurveFit | None:
    """The best saturating curve through ``(steps, losses)``; None with fewer than three distinct points."""
    t, y = np.asarray(steps, dtype=np.float64), np.asarray(losses, dtype=np.float64)
    ok = np.isfinite(y)
    t, y = t[ok], y[ok]
    if len(np.unique(t)) < 3:
        return None
    span = float(max(t.max(), 1.0))
    best: CurveFit | None = None
    grids: dict[Kind, np.ndarray] = {"power": np.logspace(-2, 1, GRID), "exp": np.logspace(-1, 1.5, GRID)}
    for kind, cs in grids.items():
        for c in cs:
            x = _basis(kind, t, float(c), span)
            xc, yc = x - x.mean(), y - y.mean()
            denom = float(xc @ xc)
            b = max(float(xc @ yc) / denom, 0.0) if denom > 0 else 0.0
            a = float(y.mean() - b * x.mean())
            sse = float(((a + b * x - y) ** 2).sum())
            if best is None or sse < best.sse:
                best = CurveFit(kind, a, b, float(c), span, sse, len(t))
    return best


def plateau_step(curve: CurveFit, now: int, end: int, tolerance: float) -> int:
    """The first step in ``[now, end]`` from which the curve improves by less than ``tolerance`` (relative) to
    ``end``; ``end`` when it never does."""
    if end <= now:
        return end
    stride = max(1, (end - now) // 4096)
    t = np.arange(now, end + 1, stride, dtype=np.float64)
    at = curve.value(t)
    remaining = at - float(curve.value(float(end)))
    flat = np.flatnonzero(remaining < tolerance * np.abs(at))
    return int(t[flat[0]]) if len(flat) else end


def measured_flat(losses: list[float], points: int, tolerance: float) -> bool:
    """Whether the last ``points`` evaluations improved on the first of them by less than ``tolerance`` (relative)."""
    if points < 2 or len(losses) < points:
        return False
    window = losses[-points:]
    return window[0] - min(window) < tolerance * abs(window[0])
