"""What the training loop tells the world, as plain frozen records handed to ``emit``.

The loop (core.train) knows nothing of files, the DB or HTTP: the worker's reporter (core.reporting) turns
these into metrics lines, the status file, DB events and log lines, while a test or a benchmark just keeps
them in a list. The hybrid engine's own events (corrections, curve fits, rollbacks) live beside it, in
core.hybrid.events.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from core.hybrid.events import CorrectionEvent, CurveEvent, RollbackEvent


@dataclass(frozen=True)
class StepEvent:
    step: int  # optimizer steps done
    total_steps: int
    loss: float  # mean loss per trained token over the whole (accumulated) step
    lr: float
    grad_norm: float  # before clipping
    tokens: int  # non-padding tokens processed in the step
    tokens_per_s: float
    epoch: float  # fractional epochs done
    elapsed: float  # seconds since this process started training
    skipped: bool = False  # non-finite loss or gradient: the update was not applied
    micro_batch: int = 0  # examples per forward pass this step ran with
    grad_accum: int = 0  # forward passes per optimizer step
    # the hybrid engine ("" / defaults with the plain one)
    phase: str = ""  # engine phase the step ran in: warmup, full, predict, plain
    skipped_share: float | None = None  # hybrid: share of this step's examples skipped (predicted learned)
    backward_skipped: int = 0  # examples skipped so far (no forward or backward pass)
    speedup_estimate: float | None = None  # running estimate over plain steps (HybridEngine.speedup_estimate)
    time_saved_s: float | None = None  # estimated seconds saved so far, negative when lost (HybridEngine)


@dataclass(frozen=True)
class EvalEvent:
    step: int
    val_loss: float


@dataclass(frozen=True)
class CheckpointEvent:
    step: int
    path: Path


@dataclass(frozen=True)
class PhaseEvent:
    phase: str  # training, evaluating, checkpointing
    step: int


@dataclass(frozen=True)
class WarningEvent:
    """Something a person should know: an early warning (core.health) or a repair the loop made
    (oom_backoff, eval_oom_backoff, rollback)."""

    step: int
    kind: str
    message: str
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TimingEvent:
    """Seconds per phase of the training loop since the previous timing event (or the loop's start), up to
    ``step`` (core.step_timing)."""

    step: int
    seconds: dict[str, float]  # data, forward_backward, optimizer, eval, checkpoint, other
    loop_s: float  # the loop's wall-clock over the same interval
    device_timed: bool = False  # forward_backward and optimizer measured with CUDA events

    def as_record(self) -> dict[str, Any]:
        """The metrics line's fields (``core/metrics.py``)."""
        fields = {f"{name}_s": round(s, 6) for name, s in self.seconds.items()}
        record: dict[str, Any] = {"kind": "timing", "step": self.step, "loop_s": round(self.loop_s, 6), **fields}
        if self.device_timed:
            record["device_timed"] = True
        return record


Event = (
    StepEvent
    | EvalEvent
    | CheckpointEvent
    | PhaseEvent
    | WarningEvent
    | TimingEvent
    | CorrectionEvent
    | CurveEvent
    | RollbackEvent
)
Outcome = Literal["completed", "interrupted"]
