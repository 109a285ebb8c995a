"""What the watchdog sees of a worker between its heartbeats: whether it was stopped, and its CPU time.

The hang limits learn only from healthy gaps (``safety/phase_clock.py``); this is the sampling that
judgement needs. The worker is sampled with its descendants: under ``nproc > 1`` the watched pid is the
torchrun agent, which sleeps while its ranks work, and a stopped rank stops the whole job.
"""

from __future__ import annotations

from dataclasses import dataclass

from safety.phase_clock import healthy_gap

_STOPPED = ("stopped", "tracing-stop")  # psutil's names for T (SIGSTOP/SIGTSTP) and t (a tracer)


@dataclass(frozen=True)
class Sample:
    cpu_s: float | None  # CPU seconds the worker and its descendants used so far (None: unreadable)
    stopped: bool  # any of them stopped at the moment of the sample


def sample(pid: int) -> Sample:
    """One look at the worker's process tree; what cannot be read is None / not stopped."""
    try:
        import psutil

        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except Exception:  # boundary: gone, no access, or no psutil: nothing seen
        return Sample(None, False)
    cpu: float | None = 0.0
    stopped = False
    for proc in procs:
        try:
            with proc.oneshot():
                times = proc.cpu_times()
                stopped = stopped or proc.status() in _STOPPED
        except Exception:  # boundary: a child that just exited or is not ours to read
            if proc is root:
                cpu = None
            continue
        if cpu is not None:
            cpu += times.user + times.system
    return Sample(cpu, stopped)


class GapWatch:
    """Follows one worker's current heartbeat gap across the watchdog's loops: whether it was seen
    stopped, and its CPU time when the gap began; says, when a new heartbeat ends the gap, whether the
    gap was healthy."""

    def __init__(self) -> None:
        self.pid: int | None = None
        self.heartbeat = 0.0
        self.cpu_at_beat: float | None = None
        self.stopped = False

    def update(self, pid: int, heartbeat: float, now_sample: Sample) -> bool:
        """This loop's sample; returns whether the gap that the heartbeat ``heartbeat`` ended was healthy
        (True while no gap has ended: nothing to hold against the worker)."""
        if pid != self.pid:
            self.pid, self.heartbeat = pid, heartbeat
            self.cpu_at_beat, self.stopped = now_sample.cpu_s, now_sample.stopped
            return True
        if heartbeat <= self.heartbeat:  # the same gap goes on
            self.stopped = self.stopped or now_sample.stopped
            return True
        wall = heartbeat - self.heartbeat
        cpu = None
        if now_sample.cpu_s is not None and self.cpu_at_beat is not None:
            cpu = max(0.0, now_sample.cpu_s - self.cpu_at_beat)
        healthy = healthy_gap(wall, cpu, self.stopped)
        # this sample was taken after the new heartbeat: it belongs to the next gap
        self.heartbeat, self.cpu_at_beat, self.stopped = heartbeat, now_sample.cpu_s, now_sample.stopped
        return healthy
