"""One worker per run folder: an exclusive ``flock`` on ``runs/job-N/worker.lock``, held for the worker's
whole life (issue 14, D1).

A daemon killed between starting a worker and recording its pid used to start a second worker for the
same run folder; two workers then wrote the same checkpoints and result. The lock makes that impossible
by construction rather than by bookkeeping: the kernel drops it when its holder dies (even by SIGKILL),
so it is never stale, and a second worker that cannot take it exits at once with ``EXIT_LOCKED``
without writing anything. The holder writes its pid and process group into the file, so a fresh daemon
that finds the lock held knows which process to stop (``holder``).

Both sides open the file relative to the run folder, neither following a symlink: the daemon often runs
as root and the run folder must not become a way to lock (or truncate) some other file.

On shared storage (a job spanning hosts, ``training.nnodes > 1``, or a fleet) the kernel lock holds across
hosts (NFS maps ``flock`` to its byte-range locks), but a pid is only meaningful on the host that wrote it:
the record also names the host, and a daemon never signals a holder of another host (``LockHolder.here``).
Only global rank 0 takes the lock, so the other hosts of a multi-node job are never refused by it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import stat
import time
from dataclasses import dataclass
from pathlib import Path

LOCK_NAME = "worker.lock"
# printed on stderr by a worker that found the lock held: under torchrun the agent exits 1 when rank 0
# exits EXIT_LOCKED, so the daemon also recognises the case by this line in the worker log
LOCKED_MESSAGE = "trainbox worker: the run folder is locked by another worker"


class RunLockHeld(RuntimeError):
    """Another process holds the run folder's lock."""

    def __init__(self, run_dir: Path, holder: LockHolder | None) -> None:
        who = f"pid {holder.pid}" if holder is not None and holder.pid else "an unknown process"
        super().__init__(f"{LOCKED_MESSAGE} ({who}): {run_dir}")
        self.holder = holder


@dataclass(frozen=True)
class LockHolder:
    """What the holder wrote: its pid, its process group (the process the daemon spawned: the worker
    itself, or the torchrun agent of rank 0), when it took the lock, and its host (None: not readable;
    no host either from a worker of an earlier release)."""

    pid: int | None
    pgid: int | None
    since: float | None
    host: str | None = None

    @property
    def here(self) -> bool:
        """Whether its pids are this host's (an unknown host counts as this one: one host, as before)."""
        return self.host is None or self.host == socket.gethostname()

    @property
    def leader(self) -> int | None:
        """The process to stop: the group the daemon spawned, else the holder itself."""
        return self.pgid or self.pid


@dataclass
class RunLock:
    """A taken lock; it lasts until ``release`` or the process's end (the fd is close-on-exec)."""

    fd: int | None

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the only descriptor drops the flock
            self.fd = None


def _open(run_dir: Path, flags: int) -> int:
    """The lock file's fd, opened relative to ``run_dir`` without following a link at either level."""
    dir_fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fd = os.open(LOCK_NAME, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o644, dir_fd=dir_fd)
    finally:
        os.close(dir_fd)
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO or device planted under the name
        os.close(fd)
        raise OSError(f"{run_dir / LOCK_NAME} is not a regular file")
    return fd


def _read(fd: int) -> LockHolder | None:
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
    except (OSError, ValueError):
        return None  # being written (truncated, not yet filled), or not ours
    if not isinstance(data, dict):
        return None

    def number(key: str) -> int | None:
        value = data.get(key)
        return value if isinstance(value, int) and value > 0 else None

    since, host = data.get("since"), data.get("host")
    return LockHolder(
        number("pid"),
        number("pgid"),
        float(since) if isinstance(since, int | float) else None,
        host if isinstance(host, str) and host else None,
    )


def acquire(run_dir: Path) -> RunLock:
    """Take the run folder's lock or raise ``RunLockHeld`` (naming the holder), without waiting. The
    first thing a worker does to its run folder: only the holder may write there."""
    fd = _open(Path(run_dir), os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read(fd)
        os.close(fd)
        raise RunLockHeld(Path(run_dir), holder) from None
    except BaseException:
        os.close(fd)
        raise
    record = {"pid": os.getpid(), "pgid": os.getpgid(0), "since": time.time(), "host": socket.gethostname()}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    return RunLock(fd)


def holder(run_dir: Path) -> LockHolder | None:
    """Who holds the run folder's lock now (None: nobody). The probe takes a shared lock for an
    instant, so a worker starting at that very moment would find the lock held and exit: the daemon
    probes only while no worker of its own can be starting. A holder that has not written its record
    yet is returned with every field None."""
    try:
        fd = _open(Path(run_dir), os.O_RDONLY)
    except OSError:
        return None  # no worker ever ran here, the folder is gone, or no worker could lock what is there
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read(fd) or LockHolder(None, None, None)
        return None
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)


def last_taken(run_dir: Path) -> float | None:
    """When a worker last took the lock (from its record; None if never or unreadable): a run row
    started after it had no worker that got this far."""
    try:
        fd = _open(Path(run_dir), os.O_RDONLY)
    except OSError:
        return None
    try:
        found = _read(fd)
    finally:
        os.close(fd)
    return found.since if found is not None else None
