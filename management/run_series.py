"""A run's recorded series, read from ``runs/job-N/metrics.jsonl`` into typed points.

The worker writes the file (its format is described at the top of ``core/metrics.py``); the job
report and its diagnosis read it here, without importing the engine. Reading is forgiving: a line a
crash tore, a NaN written as a string, or a field an older worker did not write becomes a missing
value, never an error, because a report must come out of whatever a failed run left behind.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class TrainPoint:
    step: int
    loss: float | None = None
    lr: float | None = None
    grad_norm: float | None = None
    tokens_per_s: float | None = None
    epoch: float | None = None
    time: float | None = None
    skipped: bool = False  # a non-finite step whose update was skipped
    predicted: bool = False  # a jump of the first hybrid design (no step computed): in metrics of old runs only
    skipped_share: float | None = None  # the hybrid engine's share of the step's examples skipped, when it ran


@dataclass(frozen=True)
class EvalPoint:
    step: int
    val_loss: float
    time: float | None = None


@dataclass(frozen=True)
class WarningPoint:
    step: int
    kind: str
    message: str = ""
    time: float | None = None


@dataclass(frozen=True)
class TimingPoint:
    """The training loop's seconds per phase since the previous timing line (``core/step_timing.py``)."""

    step: int
    loop_s: float
    seconds: dict[str, float]  # data, forward_backward, optimizer, eval, checkpoint, other
    time: float | None = None
    device_timed: bool = False  # forward_backward and optimizer are CUDA-event (device) time


TIMING_PHASES = ("data", "forward_backward", "optimizer", "eval", "checkpoint", "other")


@dataclass
class Series:
    train: list[TrainPoint] = field(default_factory=list)
    evals: list[EvalPoint] = field(default_factory=list)
    warnings: list[WarningPoint] = field(default_factory=list)
    timing: list[TimingPoint] = field(default_factory=list)

    def losses(self) -> list[tuple[int, float]]:
        """(step, loss) of every real step with a finite loss: jumps and skipped steps excluded."""
        return [(p.step, p.loss) for p in self.train if p.loss is not None and not p.predicted]

    def warnings_of(self, *kinds: str) -> list[WarningPoint]:
        return [w for w in self.warnings if w.kind in kinds]

    @property
    def last_step(self) -> int:
        steps = [p.step for p in self.train] + [e.step for e in self.evals]
        return max(steps, default=0)


def _num(value: Any) -> float | None:
    """A finite float, else None (NaN and Inf arrive as strings in these files)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _timing(step: int, obj: dict[str, Any]) -> TimingPoint | None:
    loop = _num(obj.get("loop_s"))
    if loop is None:
        return None
    seconds = {name: _num(obj.get(f"{name}_s")) or 0.0 for name in TIMING_PHASES}
    return TimingPoint(step, loop, seconds, _num(obj.get("time")), obj.get("device_timed") is True)


def _point(obj: dict[str, Any]) -> TrainPoint | EvalPoint | WarningPoint | TimingPoint | None:
    step = obj.get("step")
    if not isinstance(step, int) or isinstance(step, bool):
        return None
    kind = obj.get("kind")
    if kind == "train":
        return TrainPoint(
            step=step,
            loss=_num(obj.get("loss")),
            lr=_num(obj.get("lr")),
            grad_norm=_num(obj.get("grad_norm")),
            tokens_per_s=_num(obj.get("tokens_per_s")),
            epoch=_num(obj.get("epoch")),
            time=_num(obj.get("time")),
            skipped=obj.get("skipped") is True,
            predicted=obj.get("predicted") is True,
            skipped_share=_num(obj.get("skipped_share")),
        )
    if kind == "eval":
        val = _num(obj.get("val_loss"))
        return EvalPoint(step, val, _num(obj.get("time"))) if val is not None else None
    if kind == "warning":
        return WarningPoint(step, str(obj.get("warning", "")), str(obj.get("message", "")), _num(obj.get("time")))
    if kind == "timing":
        return _timing(step, obj)
    return None


def parse_metrics(text: str) -> Series:
    series = Series()
    for line in text.splitlines():
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue
        point = _point(obj) if isinstance(obj, dict) else None
        if isinstance(point, TrainPoint):
            series.train.append(point)
        elif isinstance(point, EvalPoint):
            series.evals.append(point)
        elif isinstance(point, WarningPoint):
            series.warnings.append(point)
        elif isinstance(point, TimingPoint):
            series.timing.append(point)
    return series


def read_series(run_dir: Path) -> Series:
    path = run_dir / "metrics.jsonl"
    try:
        return parse_metrics(path.read_text(encoding="utf-8", errors="replace"))
    except FileNotFoundError:
        return Series()
