"""How many processes the kernel's OOM killer has killed where a worker runs: read by the daemon when it
starts and reaps a worker (stored on the run's row) and by the watchdog for the workers it sees, so a
SIGKILL nobody in trainbox sent can be told apart from the OOM killer's (``trainbox/outcomes.py``)."""

from __future__ import annotations

from pathlib import Path


def _counter(path: Path, key: str) -> int | None:
    try:
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0] == key:
                return int(parts[1])
    except (OSError, ValueError):
        return None
    return None


def oom_counter_file(pid: int | None = None) -> Path:
    """Where the kernel counts OOM kills that could have hit process ``pid`` (this process when None):
    its cgroup v2 ``memory.events`` (``oom_kill`` counts its members killed by any OOM killer) when
    readable, else ``/proc/vmstat`` (the whole machine's: unchanged still rules the OOM killer out).
    The file is found while the process lives and read again after it died (its cgroup stays)."""
    try:
        lines = Path(f"/proc/{pid or 'self'}/cgroup").read_text().splitlines()
        rel = next(line.split(":", 2)[2] for line in lines if line.startswith("0::")).lstrip("/")
    except (OSError, IndexError, StopIteration):
        rel = None
    for root in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified"):  # unified: a hybrid v1/v2 machine
        events = Path(root) / rel / "memory.events" if rel is not None else None
        if events is not None and _counter(events, "oom_kill") is not None:
            return events
    return Path("/proc/vmstat")


def oom_kill_count(counter_file: Path | None = None) -> int | None:
    """The OOM kills ``counter_file`` (``oom_counter_file()`` when None) counts so far; None: unreadable."""
    return _counter(counter_file or oom_counter_file(), "oom_kill")


def kills_since(start: int | None, counter_file: Path | None = None) -> int | None:
    """The OOM kills counted since ``start`` (a count read before); None when either is unknown."""
    end = oom_kill_count(counter_file)
    return end - start if start is not None and end is not None else None
