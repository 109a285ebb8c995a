"""Where the training loop's wall-clock goes: waiting for data, forward and backward, the optimizer step,
evaluation and checkpoints, so the job report can name what dominates (issue 19).

The loop wraps its phases in ``LoopClock.span`` (or ``timed``) and, at a ``log_every`` step once ``every_s``
seconds (10) have passed since the last one, and when it ends, emits ``LoopClock.event``: a ``TimingEvent``
with the seconds each phase took since the previous one, the loop's own wall-clock over the same interval,
and ``other`` (the rest: reporting each step to the metrics file, status file and trackers, health checks,
the hybrid engine's re-measurements). The reporter writes it as a ``{"kind": "timing"}`` metrics line: at most
one per ``every_s``, so a long job's metrics file grows by a few lines a minute, not one per step.

Cheap and honest on both devices:
- On the CPU every phase is synchronous, so ``time.perf_counter`` around it is the phase's time; nothing is
  added to a step but a few clock reads. A span inside another (the next step's batches, prepared inside
  forward and backward by ``core.lookahead``) is booked to itself and taken out of the outer one, so the
  phases never count a second twice and ``other`` is what the loop did besides them.
- On CUDA the host only queues forward, backward and the optimizer's kernels, so host time would book them
  wherever the host next waits. Those two phases are therefore timed with CUDA events recorded on the
  stream (no sync) and read when the interval's event is built, once per interval: the one added
  sync waits for the last queued kernel, which the step's own loss read has mostly done already. Data,
  evaluation and checkpoints stay host-timed: evaluation and a save read their results back, so the host
  waits for the device inside them. The next step's batches are prepared while the device runs this one, so
  on a GPU ``data`` is the host's collating and staging time, overlapped with the device's work;
  the phases can then add up to more than the interval (``other`` is then 0): the report says data time is
  host work, not necessarily a wait.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from core.events import TimingEvent

PHASES = ("data", "forward_backward", "optimizer", "eval", "checkpoint")
DEVICE_PHASES = ("forward_backward", "optimizer")  # timed on the device's stream where there is one
T = TypeVar("T")


@dataclass
class _Open:
    phase: str
    started: float
    inner: float = 0.0  # seconds of spans nested inside this one


@dataclass
class LoopClock:
    """The loop's phase clock (see the module docstring). ``device`` decides host or CUDA-event timing."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    every_s: float = 10.0  # the shortest interval ``due`` lets pass
    _totals: dict[str, float] = field(default_factory=dict)
    _open: list[_Open] = field(default_factory=list)
    _events: list[tuple[str, Any, Any]] = field(default_factory=list)  # (phase, start, end) CUDA events
    _since: float = field(default_factory=time.perf_counter)

    @property
    def on_device(self) -> bool:
        return self.device.type == "cuda"

    def restart(self) -> None:
        """Start a fresh interval now (the loop's start); anything measured before is dropped."""
        self._totals, self._open, self._events, self._since = {}, [], [], time.perf_counter()

    @contextmanager
    def span(self, phase: str) -> Iterator[None]:
        if self.on_device and phase in DEVICE_PHASES:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end.record()
                self._events.append((phase, start, end))
            return
        entry = _Open(phase, time.perf_counter())
        self._open.append(entry)
        try:
            yield
        finally:
            self._open.pop()
            took = time.perf_counter() - entry.started
            self._totals[phase] = self._totals.get(phase, 0.0) + took - entry.inner
            if self._open:
                self._open[-1].inner += took

    def due(self) -> bool:
        """Whether this interval is long enough to be emitted at a logged step."""
        return time.perf_counter() - self._since >= self.every_s

    def timed(self, phase: str, call: Callable[..., T], *args: Any) -> T:
        """``call(*args)`` inside ``span(phase)``: one line at a call site that returns a value."""
        with self.span(phase):
            return call(*args)

    def event(self, step: int) -> TimingEvent:
        """The interval since the previous event, and a new one started. On CUDA this waits once for the last
        queued kernel so the events can be read."""
        if self._events:
            self._events[-1][2].synchronize()
            for phase, start, end in self._events:
                self._totals[phase] = self._totals.get(phase, 0.0) + start.elapsed_time(end) / 1000
        now = time.perf_counter()
        loop_s = now - self._since
        seconds = {name: self._totals.get(name, 0.0) for name in PHASES}
        seconds["other"] = max(0.0, loop_s - sum(seconds.values()))
        self._totals, self._events, self._since = {}, [], now
        return TimingEvent(step, seconds, loop_s, device_timed=self.on_device)
