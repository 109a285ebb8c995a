"""Test-only fault injection: ``TRAINBOX_TEST_FAULT`` makes the real failure happen at a chosen step.

Never active unless the variable is set; production never sets it. A comma list of:
  oom@K[xN]           torch.cuda.OutOfMemoryError in the forward pass of optimizer step K
  nan@K[xN]           the loss of optimizer step K is NaN (so are its gradients)
  nanweight@K[xN]     a weight becomes NaN right after optimizer step K (as if the update overflowed)
  evaloom@K[xN]       torch.cuda.OutOfMemoryError in the evaluation at step K
  diskfull@K[xN]      the disk check of the save at step K sees 0 bytes free
  diskfree=BYTES      every disk check sees BYTES free, plus what this process deleted since
  hang@PHASE[:K]      block forever (the process lives, heartbeats stop) in PHASE (loading,
                      training, evaluating, checkpointing), at step K or later when given
Each fires at the first N (default 1) attempts at step K or later: ``oom@5x3`` fails step 5 three
times (it is retried after each back-off), ``nan@7x3`` makes steps 7, 8 and 9 NaN, ``nan@1x1000``
makes every step NaN. Training faults count optimizer steps from 1 (step K is the K-th update);
evaluation, checkpoint and disk faults count the step boundary (the save after K updates).
``TRAINBOX_TEST_STEP_SLEEP`` (seconds) sleeps after every step so tests can catch a run in the middle.

``Faults`` is the one hook object the code under test calls, at named points (``arm_step``,
``forward_passes``, ``poison``, ``after_update``, ``before_eval``, ``after_step``, ``hang``; the disk guard
reads ``fire("diskfull")`` and ``disk_free``); an empty ``Faults()`` does nothing at any of them, so the
training step carries no fault arguments.
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from core import sharding

FAULT_ENV = "TRAINBOX_TEST_FAULT"
STEP_SLEEP_ENV = "TRAINBOX_TEST_STEP_SLEEP"
INJECTED_OOM = "CUDA out of memory (injected by TRAINBOX_TEST_FAULT)"
KINDS = ("oom", "nan", "nanweight", "evaloom", "diskfull", "hang")
PHASES = ("loading", "training", "evaluating", "checkpointing")
_ITEM = re.compile(r"^(?P<kind>[a-z]+)@(?:(?P<phase>[a-z]+):?)?(?P<step>\d+)?(?:x(?P<count>\d+))?$")

log = logging.getLogger("core.worker")

T = TypeVar("T")


@dataclass
class Fault:
    kind: str
    step: int = 0
    count: int = 1
    phase: str = ""


class Faults:
    """The parsed list and the hooks that act on it; ``fire`` consumes one occurrence. An empty ``Faults()``
    never fires."""

    def __init__(self, faults: list[Fault] | None = None, disk_free: int | None = None, step_sleep: float = 0) -> None:
        self.faults = faults or []
        self.disk_free = disk_free
        self.step_sleep = step_sleep
        self._oom = self._nan = False  # armed for the current attempt at an optimizer step

    @classmethod
    def parse(cls, text: str) -> Faults:
        faults: list[Fault] = []
        disk_free = None
        for item in (x.strip() for x in text.split(",")):
            if not item:
                continue
            if item.startswith("diskfree="):
                disk_free = int(item.removeprefix("diskfree="))
                continue
            m = _ITEM.match(item)
            if not m or m["kind"] not in KINDS:
                raise ValueError(f"{FAULT_ENV}: cannot parse {item!r} (kinds: {', '.join(KINDS)}, or diskfree=BYTES)")
            phase = m["phase"] or ""
            if (m["kind"] == "hang") != bool(phase) or (phase and phase not in PHASES):
                raise ValueError(f"{FAULT_ENV}: {item!r}: hang needs a phase ({', '.join(PHASES)}), others none")
            faults.append(Fault(m["kind"], int(m["step"] or 0), int(m["count"] or 1), phase))
        return cls(faults, disk_free)

    @classmethod
    def from_env(cls) -> Faults:
        faults = cls.parse(os.environ.get(FAULT_ENV, ""))
        faults.step_sleep = float(os.environ.get(STEP_SLEEP_ENV) or 0)
        return faults

    def __bool__(self) -> bool:
        return bool(self.faults) or self.disk_free is not None or self.step_sleep > 0

    def fire(self, kind: str, step: int) -> bool:
        for f in self.faults:
            if f.kind == kind and step >= f.step and f.count > 0:
                f.count -= 1
                log.warning("%s: injecting %s at step %d", FAULT_ENV, kind, step)
                return True
        return False

    def hang(self, phase: str, step: int = 0) -> None:
        for f in self.faults:
            if f.kind == "hang" and f.phase == phase and step >= f.step and f.count > 0:
                log.warning("%s: hanging in %s at step %d (until killed)", FAULT_ENV, phase, step)
                sys.stderr.flush()
                while True:  # alive, silent: only a kill ends it, as with a real hang
                    time.sleep(1.0)

    # --- the training loop's hooks ----------------------------------------------------------------

    def arm_step(self, step: int) -> None:
        """One attempt at optimizer step ``step`` begins: whether its forward runs out of memory and whether its
        loss is NaN is decided (and consumed) once per attempt, so a retried step draws again."""
        self._oom, self._nan = self.fire("oom", step), self.fire("nan", step)

    def forward_passes(self, passes: Sequence[T]) -> Iterator[tuple[int, T]]:
        """The attempt's forward passes, numbered; an armed OOM is raised before the second one (after a
        backward: gradients to drop) or the only one, and at once on a rank with none."""
        if self._oom and not passes:
            raise torch.cuda.OutOfMemoryError(INJECTED_OOM)
        for i, p in enumerate(passes):
            if self._oom and i == min(1, len(passes) - 1):
                raise torch.cuda.OutOfMemoryError(INJECTED_OOM)
            yield i, p

    def poison(self, loss: torch.Tensor, index: int) -> torch.Tensor:
        """The first pass's loss made NaN when armed (its gradients follow)."""
        return loss * math.nan if self._nan and index == 0 else loss

    def after_update(self, model: Any, step: int) -> None:
        """A weight turned NaN right after the update, as an overflowing update would leave it."""
        if self.fire("nanweight", step):
            with torch.no_grad():
                sharding.local(next(model.parameters())).view(-1)[0] = math.nan

    def before_eval(self, step: int, examples: int) -> None:
        if self.fire("evaloom", step) and examples:
            raise torch.cuda.OutOfMemoryError(INJECTED_OOM)

    def after_step(self) -> None:
        """Every step event: the test's pause, so a run can be caught (and signalled) in the middle."""
        if self.step_sleep > 0:
            time.sleep(self.step_sleep)
