"""The loop's counters and running results (``TrainState``): plain values, so a checkpoint holds them as a dict
and a resumed run continues bit for bit. Its own module because the trainer (core.train) and its repairs
(core.recovery) both read and change it; with them what one step returns (``StepResult``) and two small helpers
of the loop."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

from core.data import DataPosition

RECENT_LOSSES = 10  # the final train loss is the mean of this many last step losses


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0  # data position: next micro-batch is `micro_batch` of epoch `epoch`
    micro_batch: int = 0
    tokens_seen: int = 0
    first_val_loss: float | None = None
    last_val_loss: float | None = None
    best_val_loss: float | None = None
    last_eval_step: int = -1
    last_checkpoint_step: int = -1
    recent_losses: list[float] = field(default_factory=list)
    micro_size: int = 0  # examples per forward pass; 0: batch_size. Halved on OOM (kept over rollbacks)
    eval_size: int = 0  # examples per evaluation forward pass; 0: batch_size. Halved on evaluation OOM
    lr_scale: float = 1.0  # multiplied by nan_lr_factor at each NaN rollback
    rollbacks: int = 0  # NaN rollbacks so far
    ooms: int = 0  # OOM back-offs so far
    skipped: list[int] = field(default_factory=list)  # recent steps whose update was skipped (non-finite)
    skips_since: int = 0  # only skips after this step count towards a rollback (the last rollback's step)
    nan_log: list[dict[str, Any]] = field(default_factory=list)  # non-finite steps, for the diagnosis
    overflows: int = 0  # fp16 gradient overflows in a row (each halves the loss scale and reruns the step)
    stop_reason: str = ""  # set when training ends early on purpose (overfitting)

    @property
    def position(self) -> DataPosition:
        return DataPosition(self.epoch, self.micro_batch)

    @position.setter
    def position(self, pos: DataPosition) -> None:
        self.epoch, self.micro_batch = pos.epoch, pos.index

    @property
    def train_loss(self) -> float | None:
        return sum(self.recent_losses) / len(self.recent_losses) if self.recent_losses else None

    def record_loss(self, loss: float) -> None:
        self.recent_losses = [*self.recent_losses, loss][-RECENT_LOSSES:]


# Survive a rollback: what the run learnt about the machine and the instability, not the weights' timeline.
STICKY = ("micro_size", "eval_size", "lr_scale", "rollbacks", "ooms", "nan_log")


class StepResult(NamedTuple):
    loss: float  # mean loss per trained token over the whole global step
    grad_norm: float  # before clipping
    tokens: int
    skipped: bool  # non-finite loss or gradient norm: nothing was applied, the data moved on

    def read(self) -> StepResult:
        """Itself: a step read at once (core.readback.Pending is one whose numbers are still on the device)."""
        return self


def crossed(step: int, last: int, every: int) -> bool:
    """Whether a multiple of ``every`` lies in (last, step]: with steps of 1, the same as step % every == 0."""
    return every > 0 and step // every > max(last, 0) // every


def first_line(e: BaseException) -> str:
    text = str(e)
    return text.splitlines()[0] if text else type(e).__name__
