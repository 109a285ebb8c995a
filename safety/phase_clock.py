"""The watchdog's per-phase hang limits, learned from the worker's heartbeats (pure: no I/O).

Only healthy gaps teach (issue 14, D10): a worker SIGSTOPped for 33 s once raised the training limit
from 60 to 165 s for good, so a real hang then took minutes to be killed. A gap is not learned when it
exceeded the limit in force (it was a hang, or would have been one), when the worker was seen stopped
during it (SIGSTOP, SIGTSTP, a debugger), or when it made no CPU progress while the clock ran (stuck,
not slow). Whether a gap was healthy is judged here from what the watchdog sampled (``healthy_gap``);
the sampling itself is the watchdog's (``safety/worker_sample.py``).
"""

from __future__ import annotations

from trainbox.config import WatchdogConfig

ACTIVE_PHASES = ("loading", "training", "evaluating", "checkpointing")
# A gap whose CPU time (the worker and its children) is under this share of its wall time made no
# progress. Real work in any phase, I/O-bound saves included, uses far more; a process blocked or
# stopped uses next to none.
MIN_CPU_SHARE = 0.01
# Shorter gaps are not judged by CPU: the kernel counts CPU time in ticks (10 ms), and a gap this short
# could never raise a limit above its floor anyway.
MIN_JUDGED_GAP_S = 2.0


def healthy_gap(wall_s: float, cpu_s: float | None, stopped: bool) -> bool:
    """Whether a heartbeat gap was the worker working: not stopped, and some CPU progress (``cpu_s``
    None: not measured, so not held against it)."""
    if stopped:
        return False
    if cpu_s is None or wall_s < MIN_JUDGED_GAP_S:
        return True
    return cpu_s >= MIN_CPU_SHARE * wall_s


def learnable(interval: float, limit: float, healthy: bool) -> bool:
    """A gap teaches the limit only if it was healthy and within the limit in force: a gap past the
    limit is a hang (killed, or would have been), never the new normal."""
    return healthy and interval <= limit


class PhaseClock:
    """Learns, per phase, the longest healthy interval between consecutive worker heartbeats, and the limit."""

    def __init__(self, cfg: WatchdogConfig, longest: dict[str, float] | None = None) -> None:
        self.cfg = cfg
        self.longest: dict[str, float] = dict(longest or {})
        self._last: tuple[int, str, float] | None = None  # (pid, phase, heartbeat)
        self.unlearned: list[tuple[str, float]] = []  # (phase, interval) of gaps refused, newest last (a few)

    def observe(self, pid: int, phase: str, heartbeat: float, healthy: bool = True) -> None:
        """A heartbeat seen: the interval since the previous one belongs to the previous one's phase;
        ``healthy``: what the watchdog saw of the worker during that interval (``healthy_gap``)."""
        last = self._last
        if last is not None and last[0] == pid and heartbeat > last[2] and last[1] in ACTIVE_PHASES:
            interval = heartbeat - last[2]
            if learnable(interval, self.limit(last[1]), healthy):
                self.longest[last[1]] = max(self.longest.get(last[1], 0.0), interval)
            else:
                self.unlearned = [*self.unlearned[-9:], (last[1], interval)]
        if last is None or last[0] != pid or heartbeat >= last[2]:
            self._last = (pid, phase, heartbeat)

    def bounds(self, phase: str) -> tuple[float, float]:
        return getattr(self.cfg, f"{phase}_floor"), getattr(self.cfg, f"{phase}_ceiling")

    def limit(self, phase: str) -> float:
        floor, ceiling = self.bounds(phase)
        measured = self.longest.get(phase)
        if measured is None:
            return ceiling
        return min(ceiling, max(floor, self.cfg.hang_factor * measured))
