"""Per-parameter trajectory extrapolation over recent weight snapshots (weight nowcasting, LAWA, ExPO).

Every element of every trainable tensor is treated as its own time series ``theta(t)`` sampled at the
snapshot steps. Two fits:
- ``linear``: least-squares line through the last k snapshots; the prediction is the fitted line
  (which averages the snapshots' noise, LAWA-style) continued ``horizon`` steps past the last one;
- ``exponential``: per element, ``theta(t) = theta* + c r^t`` from the last three equally spaced
  snapshots (Aitken's delta-squared); elements that do not look geometrically convergent
  (ratio outside (0, max_ratio)) fall back to the linear continuation of the last difference.
Both are exact on their own model (tested). Tensors are fp32/fp64 on any device; nothing here
touches a model or an optimizer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch

Method = Literal["linear", "exponential"]


def linear_fit(steps: Sequence[float], snaps: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(value of the fitted line at the last step, slope per step), elementwise least squares.

    Accumulated snapshot by snapshot into two float64 buffers (the mean and the slope; the centred step weights
    sum to zero, so the slope needs no centred copy of each snapshot): the fit of the largest tensor, the
    embedding of a full fine-tune, costs a few copies of it, not a stack of all its snapshots."""
    if len(steps) != len(snaps) or len(snaps) < 2:
        raise ValueError("need two or more snapshots with one step each")
    t = torch.tensor([float(s) for s in steps], dtype=torch.float64)
    tc = t - t.mean()
    denom = float((tc * tc).sum())
    if denom <= 0:
        raise ValueError("snapshot steps must differ")
    mean = torch.zeros_like(snaps[-1], dtype=torch.float64)
    slope = torch.zeros_like(mean)
    for w, s in zip(tc.tolist(), snaps, strict=True):
        mean.add_(s)
        slope.add_(s, alpha=w / denom)
    at_last = mean.div_(len(snaps)).add_(slope, alpha=float(tc[-1]))
    dtype = snaps[-1].dtype
    return at_last.to(dtype), slope.to(dtype)


def extrapolate_linear(steps: Sequence[float], snaps: Sequence[torch.Tensor], horizon: float) -> torch.Tensor:
    """The fitted line's value ``horizon`` steps after the last snapshot."""
    at_last, slope = linear_fit(steps, snaps)
    return at_last + slope * horizon


def extrapolate_exponential(
    steps: Sequence[float], snaps: Sequence[torch.Tensor], horizon: float, max_ratio: float = 0.995
) -> torch.Tensor:
    """Geometric (Aitken) continuation from the last three equally spaced snapshots, elementwise."""
    if len(snaps) < 3:
        raise ValueError("the exponential fit needs three snapshots")
    t0, t1, t2 = (float(s) for s in steps[-3:])
    delta = t1 - t0
    if delta <= 0 or abs((t2 - t1) - delta) > 1e-9 * max(1.0, delta):
        raise ValueError("the exponential fit needs equally spaced snapshot steps")
    a, b, c = (s.to(torch.float64) for s in snaps[-3:])
    d1, d2 = b - a, c - b
    n = horizon / delta  # horizon in snapshot intervals
    tiny = torch.finfo(torch.float64).tiny * 1e6
    safe_d1 = torch.where(d1.abs() > tiny, d1, torch.ones_like(d1))
    r = d2 / safe_d1
    ok = (d1.abs() > tiny) & (r > 0) & (r < max_ratio)
    r_ok = torch.where(ok, r, torch.zeros_like(r))
    # sum_{i=1..n} r^i = r (1 - r^n) / (1 - r)
    geo = c + d2 * r_ok * (1 - r_ok.pow(n)) / (1 - r_ok)
    lin = c + d2 * n
    return torch.where(ok, geo, lin).to(snaps[-1].dtype)


def extrapolate(method: Method, steps: Sequence[float], snaps: Sequence[torch.Tensor], horizon: float) -> torch.Tensor:
    if method == "linear":
        return extrapolate_linear(steps, snaps, horizon)
    if method == "exponential":
        return extrapolate_exponential(steps, snaps, horizon)
    raise ValueError(f"unknown extrapolation method {method!r}")


class TrajectoryPredictor:
    """A ring buffer of the trainable weights at recent steps, and predictions from it.

    ``add`` copies the tensors (the caller's parameters keep training). ``predict`` returns one
    tensor per parameter: the extrapolated weights ``horizon`` steps past the newest snapshot,
    with the displacement from the newest snapshot multiplied by ``scale``.
    """

    def __init__(self, history: int = 3) -> None:
        if history < 2:
            raise ValueError("history must be 2 or more")
        self.history = history
        self.steps: list[float] = []
        self.snaps: list[list[torch.Tensor]] = []  # [snapshot][parameter]

    def __len__(self) -> int:
        return len(self.snaps)

    def clear(self) -> None:
        self.steps, self.snaps = [], []

    def add(self, step: float, params: Sequence[torch.Tensor]) -> None:
        if self.steps and step <= self.steps[-1]:
            self.clear()  # a rollback or a jump broke the time line: start a new trajectory
        self.steps.append(float(step))
        self.snaps.append([p.detach().clone() for p in params])
        del self.steps[: -self.history], self.snaps[: -self.history]

    def ready(self, method: Method) -> bool:
        return len(self.snaps) >= (3 if method == "exponential" else 2)

    def predict(self, horizon: float, method: Method = "linear", scale: float = 1.0) -> list[torch.Tensor]:
        if not self.ready(method):
            raise ValueError(f"{len(self.snaps)} snapshots are not enough for {method}")
        out = []
        for i in range(len(self.snaps[-1])):
            series = [snap[i] for snap in self.snaps]
            pred = extrapolate(method, self.steps, series, horizon)
            last = series[-1]
            out.append(last + (pred - last) * scale if scale != 1.0 else pred)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "steps": list(self.steps), "snaps": [[t.cpu() for t in s] for s in self.snaps]}

    def load_state_dict(self, state: dict[str, Any], device: torch.device | None = None) -> None:
        self.history = int(state["history"])
        self.steps = [float(s) for s in state["steps"]]
        self.snaps = [[t.to(device) if device is not None else t.clone() for t in s] for s in state["snaps"]]
