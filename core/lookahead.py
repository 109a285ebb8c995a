"""The next optimizer step's batches, built while the current step runs on the device.

On a GPU the host queues a step's kernels and is free until it reads the step's loss; building the next
step's batches then (collating, picking the trained positions, pinned copies to the device without waiting)
means the device does not sit idle between steps while the host collates. One step ahead is enough: the host
is far faster than the device per step. On the CPU nothing runs concurrently, so it only moves the same
work (no thread: the torch thread pool already uses the cores).

A prepared step is used only when the step about to run starts where it was prepared for, at the same
micro-batch; an out-of-memory back-off (smaller micro-batch), a skipped step or a rollback (another data
position) simply builds afresh. Building reads no random state, so preparing ahead changes no number.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from core.data import DataPosition
from core.distributed import StepPlan
from core.loss import Staged


@dataclass(frozen=True)
class PreparedStep:
    plan: StepPlan
    staged: list[Staged]  # one per forward pass of the plan, on the device


class Lookahead:
    def __init__(self, build: Callable[[DataPosition, int], PreparedStep]) -> None:
        self._build = build
        self._ahead: tuple[DataPosition, int, PreparedStep] | None = None

    def take(self, pos: DataPosition, micro: int) -> PreparedStep:
        """The step starting at ``pos`` with forward passes of ``micro`` examples: prepared, or built now."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[:2] == (pos, micro):
            return ahead[2]
        return self._build(pos, micro)

    def prepare(self, pos: DataPosition, micro: int) -> None:
        """Build the step starting at ``pos`` now, for a later ``take``."""
        self._ahead = (pos, micro, self._build(pos, micro))

    def clear(self) -> None:
        self._ahead = None
