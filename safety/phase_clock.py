"""The watchdog's per-phase hang limits, learned from the worker's heartbeats (pure: no I/O)."""

from __future__ import annotations

from trainbox.config import WatchdogConfig

ACTIVE_PHASES = ("loading", "training", "evaluating", "checkpointing")


class PhaseClock:
    """Learns, per phase, the longest interval between consecutive worker heartbeats, and the limit."""

    def __init__(self, cfg: WatchdogConfig, longest: dict[str, float] | None = None) -> None:
        self.cfg = cfg
        self.longest: dict[str, float] = dict(longest or {})
        self._last: tuple[int, str, float] | None = None  # (pid, phase, heartbeat)

    def observe(self, pid: int, phase: str, heartbeat: float) -> None:
        """A heartbeat seen: the interval since the previous one belongs to the previous one's phase."""
        last = self._last
        if last is not None and last[0] == pid and heartbeat > last[2] and last[1] in ACTIVE_PHASES:
            interval = heartbeat - last[2]
            self.longest[last[1]] = max(self.longest.get(last[1], 0.0), interval)
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
