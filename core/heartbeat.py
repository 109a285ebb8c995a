"""The status file (``status/training.json``) and its heartbeat, which is what the watchdog judges a worker by.

``StatusFile`` rewrites the file; ``Progress`` and ``LoadingBeat`` keep it beating through the loading
stages that report nothing themselves (reading and encoding millions of records, one long model load). Every
write is best effort: a status file that cannot be written is logged, never a reason to fail a job.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from core.errors import short_error
from trainbox.status import TrainingStatus, write_status

log = logging.getLogger("core.worker")

# Seconds between loading heartbeats (reading, validating and encoding the data; loading the model).
# Far below the watchdog's loading floor, so a loading worker that advances is never judged hung.
LOADING_BEAT_ENV = "TRAINBOX_LOADING_HEARTBEAT_S"
DEFAULT_LOADING_BEAT_S = 5.0


def loading_beat_interval() -> float:
    """``$TRAINBOX_LOADING_HEARTBEAT_S`` when set to a positive number (tests make it short), else 5 s."""
    try:
        value = float(os.environ.get(LOADING_BEAT_ENV) or DEFAULT_LOADING_BEAT_S)
    except ValueError:
        return DEFAULT_LOADING_BEAT_S
    return value if value > 0 else DEFAULT_LOADING_BEAT_S


class StatusFile:
    """``status/training.json``, rewritten atomically: at most every ``interval`` s, plus every
    phase change. Each write refreshes ``heartbeat``, which is what the watchdog judges."""

    def __init__(self, path: Path, job_id: int, job_name: str, interval: float = 0.5) -> None:
        self.path = Path(path)
        self.interval = interval
        now = time.time()
        self.status = TrainingStatus(job_id=job_id, job_name=job_name, pid=os.getpid(), started_at=now)
        self._last_write = 0.0
        self._lock = threading.Lock()  # a loading heartbeat thread (LoadingBeat) may write too

    def update(self, force: bool = False, **fields: Any) -> None:
        with self._lock:
            for key, value in fields.items():
                setattr(self.status, key, value)
            now = time.time()
            if force or now - self._last_write >= self.interval:
                self._write(now)

    def phase(self, phase: str, message: str = "") -> None:
        self.update(force=True, phase=phase, message=message)

    def _write(self, now: float) -> None:
        self.status.heartbeat = now
        try:
            write_status(self.path, self.status)
            self._last_write = now
        except Exception as e:  # boundary: status is a hint, never a reason to fail
            log.warning("could not write status %s: %s", self.path, short_error(e))


class Progress:
    """Progress through a long loading stage (reading, encoding millions of records), reported as the
    status message with a heartbeat at most every ``every`` seconds: the watchdog judges a loading
    worker by its heartbeat, so one that advances must keep beating, and one that stops advancing must
    stop beating. ``tick`` is cheap (a clock read), so it is called for every record."""

    def __init__(self, status: StatusFile | None, every: float | None = None) -> None:
        self.status = status
        self.every = every if every is not None else loading_beat_interval()
        self.what, self.total, self.done = "", 0, 0
        self._next = 0.0

    def stage(self, what: str, total: int = 0) -> None:
        """A new stage ("reading job.jsonl", "encoding"); reported at once."""
        self.what, self.total, self.done = what, total, 0
        self._beat(time.monotonic())

    def tick(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now >= self._next:
            self._beat(now)

    def message(self) -> str:
        """'encoding 1,200,000/6,000,000 records', or without a total 'reading x.jsonl: 1,200,000 records'."""
        if self.total:
            return f"{self.what} {self.done:,}/{self.total:,} records"
        return f"{self.what}: {self.done:,} records"

    def _beat(self, now: float) -> None:
        self._next = now + self.every
        if self.status is not None:
            self.status.update(force=True, message=self.message())


def thread_cpu_clock() -> Callable[[], float]:
    """A clock of the calling thread's CPU seconds that another thread can read (Linux, most Unixes);
    the whole process's CPU time where there is none."""
    try:
        clock_id = time.pthread_getcpuclockid(threading.get_ident())
    except (AttributeError, OSError):
        return time.process_time
    return lambda: time.clock_gettime(clock_id)


class LoadingBeat:
    """Heartbeats through one long call that reports nothing itself (``from_pretrained`` of a large
    model, ``torch.load`` of a large optimizer state): a helper thread rewrites the status every
    ``every`` seconds, but only while the calling thread used CPU since the last beat. A load that
    reads and computes keeps its heartbeat; one blocked for good (a deadlock, a dead filesystem) uses
    no CPU, stops beating, and the watchdog still kills it.

    ``progressing`` replaces the CPU test (tests)."""

    MIN_BUSY = 0.01  # share of the interval the calling thread must have run to count as progressing

    def __init__(
        self,
        status: StatusFile,
        what: str,
        every: float | None = None,
        progressing: Callable[[], bool] | None = None,
    ) -> None:
        self.status, self.what = status, what
        self.every = every if every is not None else loading_beat_interval()
        self.progressing = progressing
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._clock: Callable[[], float] | None = None  # the calling thread's CPU clock
        self._last = 0.0
        self.beats = 0

    def __enter__(self) -> LoadingBeat:
        self.status.update(force=True, message=self.what)
        if self.progressing is None:
            self._clock = thread_cpu_clock()  # of the calling thread: made here, read by the helper
            self.progressing = self._busy
        self._thread = threading.Thread(target=self._run, name="loading-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _busy(self) -> bool:
        assert self._clock is not None
        now, before = self._clock(), self._last
        self._last = now
        return now - before >= self.MIN_BUSY * self.every

    def _run(self) -> None:
        started = time.monotonic()
        if self._clock is not None:  # from here: starting this thread is not the load's work
            self._last = self._clock()
        while not self._stop.wait(self.every):
            assert self.progressing is not None
            if self.progressing():
                self.beats += 1
                self.status.update(force=True, message=f"{self.what} ({time.monotonic() - started:.0f} s)")

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
