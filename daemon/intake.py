"""Intake: which files in the inbox are complete and may be admitted.

Watchdog events are hints (STYLE 9): the observer thread only records what it saw in a
``Readiness`` tracker; the main loop asks the tracker which files are ready. A file is ready when
nobody holds it open and either its writer closed it (close-write), it was renamed into place, or
its size and mtime have not changed for ``settle_seconds`` (files found by a rescan, files moved in
from the same filesystem, and everything under the polling observer, which sees no close events).
"""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from watchdog.events import (
    DirCreatedEvent,
    FileClosedEvent,
    FileClosedNoWriteEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileOpenedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from daemon.inbox_scan import InboxListing, is_sidecar_name, scan_inbox
from trainbox.spool import is_ignored

CLOSED_QUIET = 0.2  # seconds without events after a close or rename before a file counts as done


@dataclass
class _Seen:
    last_event: float
    open_handles: int = 0
    finished: bool = False  # closed after writing, or renamed into place
    size: int = -1
    mtime: float = -1.0
    stable_since: float = 0.0


class Readiness:
    """Per-path completeness bookkeeping; pure apart from ``stat`` calls, so it is unit-tested."""

    def __init__(self, settle_seconds: float) -> None:
        self.settle_seconds = settle_seconds
        self._seen: dict[Path, _Seen] = {}
        self._lock = threading.Lock()

    def _get(self, path: Path, now: float) -> _Seen:
        seen = self._seen.get(path)
        if seen is None:
            seen = self._seen[path] = _Seen(last_event=now, stable_since=now)
        return seen

    def note(self, path: Path, kind: str, now: float) -> None:
        """Record one event: created, opened, modified, closed, closed_nowrite, moved_in, deleted."""
        with self._lock:
            if kind == "deleted":
                self._seen.pop(path, None)
                return
            seen = self._get(path, now)
            seen.last_event = now
            if kind == "opened":
                seen.open_handles += 1  # a reader opens too: only a write ("modified") un-finishes
            elif kind in ("closed", "closed_nowrite"):
                seen.open_handles = max(0, seen.open_handles - 1)
                if kind == "closed":
                    seen.finished = True
            elif kind == "moved_in":
                seen.finished = True
            elif kind == "modified":
                seen.finished = False

    def scan(self, paths: Iterable[Path], now: float) -> None:
        """Make sure every file present is tracked (rescans, start-up, missed events)."""
        with self._lock:
            for p in paths:
                self._get(p, now)

    def ready(self, now: float) -> list[Path]:
        """Complete regular files, oldest event first. Forgets paths that are gone or not regular
        files (``lstat``: a symlink or a loop is never followed here)."""
        out: list[tuple[float, Path]] = []
        with self._lock:
            for path, seen in list(self._seen.items()):
                try:
                    st = os.lstat(path)
                except OSError:  # gone, or a path that cannot be looked at: the scan reports it
                    del self._seen[path]
                    continue
                if not stat.S_ISREG(st.st_mode):
                    del self._seen[path]
                    continue
                if (st.st_size, st.st_mtime) != (seen.size, seen.mtime):
                    seen.size, seen.mtime, seen.stable_since = st.st_size, st.st_mtime, now
                if seen.open_handles > 0:
                    continue
                quiet = now - seen.last_event
                if (seen.finished and quiet >= CLOSED_QUIET) or (
                    now - seen.stable_since >= self.settle_seconds and quiet >= self.settle_seconds
                ):
                    out.append((seen.last_event, path))
        return [p for _, p in sorted(out)]

    def forget(self, path: Path) -> None:
        with self._lock:
            self._seen.pop(path, None)

    def __len__(self) -> int:
        return len(self._seen)


def inbox_files(inbox: Path) -> list[Path]:
    """Candidate files: regular files in the inbox and its priority folders, minus ignored names
    and sidecars (see ``daemon.inbox_scan``)."""
    return scan_inbox(inbox).candidates


def is_candidate(path: Path) -> bool:
    """A name that is (or will be) a job, not a sidecar waiting for its data file."""
    return not is_ignored(path.name) and not is_sidecar_name(path.name)


_KINDS: dict[type[FileSystemEvent], str] = {
    FileCreatedEvent: "created",
    FileOpenedEvent: "opened",
    FileModifiedEvent: "modified",
    FileClosedEvent: "closed",
    FileClosedNoWriteEvent: "closed_nowrite",
    FileDeletedEvent: "deleted",
}


class _Handler(FileSystemEventHandler):
    """Runs on the observer thread: only records hints, never touches files."""

    def __init__(self, readiness: Readiness, clock: Callable[[], float]) -> None:
        self.readiness = readiness
        self.clock = clock

    def on_any_event(self, event: FileSystemEvent) -> None:
        now = self.clock()
        if isinstance(event, DirCreatedEvent):
            return
        if isinstance(event, FileMovedEvent):
            self.readiness.note(Path(str(event.src_path)), "deleted", now)
            dest = Path(str(event.dest_path))
            if is_candidate(dest):
                self.readiness.note(dest, "moved_in", now)
            return
        kind = _KINDS.get(type(event))
        path = Path(str(event.src_path))
        if kind is not None and (kind == "deleted" or is_candidate(path)):
            self.readiness.note(path, kind, now)


class InboxWatcher:
    """A watchdog observer on inbox/ (recursive, for the priority subfolders) feeding ``Readiness``."""

    def __init__(self, inbox: Path, settle_seconds: float, polling: bool, clock: Callable[[], float]) -> None:
        self.inbox = inbox
        self.readiness = Readiness(settle_seconds)
        self._clock = clock
        self._observer: BaseObserver = PollingObserver(timeout=1.0) if polling else Observer()
        self._observer.schedule(_Handler(self.readiness, clock), str(inbox), recursive=True)

    def start(self) -> None:
        self._observer.start()
        self.rescan()

    def rescan(self) -> InboxListing:
        """List the inbox (events are only hints) and track every candidate found."""
        listing = scan_inbox(self.inbox)
        self.readiness.scan(listing.candidates, self._clock())
        return listing

    def ready(self) -> list[Path]:
        return self.readiness.ready(self._clock())

    def stop(self) -> None:
        self._observer.stop()
        self._observer.join(timeout=5)
