"""Reading a run's ``metrics.jsonl`` while the worker appends to it, without re-parsing it every time.

A 100,000-step history is about 15 MB of JSON; parsing it on every request (or every SSE tick)
would make the dashboard slow. ``MetricsCache`` keeps the parsed lines per file and, when the file
grew, parses only the new bytes. A file replaced or cut back (a resumed run truncates it to its
checkpoint) has a new inode or a smaller size, and is read again from the start.
"""

from __future__ import annotations

import bisect
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Point = dict[str, Any]


@dataclass
class Series:
    """The parsed lines of one file, split by kind, each list in file (= step) order."""

    train: list[Point] = field(default_factory=list)
    eval: list[Point] = field(default_factory=list)
    train_steps: list[int] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    predicted: list[list[float]] = field(default_factory=list)  # the hybrid engine's last fitted curve
    version: int = 0  # bumped whenever the content changes, for caches built on top

    def add(self, obj: Point) -> None:
        step = obj.get("step")
        if not isinstance(step, int):
            return
        if obj.get("kind") == "eval":
            self.eval.append(obj)
            self.eval_steps.append(step)
        elif obj.get("kind", "train") == "train":
            self.train.append(obj)
            self.train_steps.append(step)
        elif obj.get("kind") == "hybrid_curve" and isinstance(obj.get("curve"), list) and obj["curve"]:
            self.predicted = obj["curve"]  # each fit replaces the last

    def train_since(self, step: int) -> list[Point]:
        """Train points with a step above ``step``."""
        return self.train[bisect.bisect_right(self.train_steps, step) :]

    def eval_since(self, step: int) -> list[Point]:
        return self.eval[bisect.bisect_right(self.eval_steps, step) :]

    @property
    def last_step(self) -> int:
        return max(self.train_steps[-1] if self.train_steps else -1, self.eval_steps[-1] if self.eval_steps else -1)


@dataclass
class _Entry:
    inode: int
    offset: int  # bytes parsed so far (always at a line end)
    series: Series


class MetricsCache:
    """Parsed metrics files by path; thread-safe (FastAPI runs sync endpoints in a thread pool)."""

    def __init__(self, max_files: int = 16) -> None:
        self._entries: dict[Path, _Entry] = {}
        self._lock = threading.Lock()
        self._max_files = max_files
        self._versions = 0

    def get(self, path: Path) -> Series:
        """The file's series as of now (empty when the file does not exist yet)."""
        with self._lock:
            try:
                st = os.stat(path)
            except FileNotFoundError:
                self._entries.pop(path, None)
                return Series()
            entry = self._entries.get(path)
            if entry is None or entry.inode != st.st_ino or st.st_size < entry.offset:
                self._versions += 1
                entry = _Entry(st.st_ino, 0, Series(version=self._versions))
                self._entries[path] = entry
                self._evict(keep=path)
            if st.st_size > entry.offset:
                self._read_more(path, entry)
            return entry.series

    def _read_more(self, path: Path, entry: _Entry) -> None:
        with open(path, "rb") as f:
            f.seek(entry.offset)
            chunk = f.read()
        end = chunk.rfind(b"\n")
        if end < 0:
            return  # a line still being written: wait for its newline
        added = False
        for raw in chunk[: end + 1].splitlines():
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue  # a line torn by a crash: skipped, as the worker's own reader does
            if isinstance(obj, dict):
                entry.series.add(obj)
                added = True
        entry.offset += end + 1
        if added:
            self._versions += 1
            entry.series.version = self._versions

    def _evict(self, keep: Path) -> None:
        while len(self._entries) > self._max_files:
            victim = next(p for p in self._entries if p != keep)
            del self._entries[victim]
