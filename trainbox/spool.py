"""The spool's names and layout: what a job's file is called and which folder a job is in.

A job moves between ``inbox/``, ``queue/admitting/``, ``queue/<priority>/``, ``queue/processing/``,
``queue/done/`` and ``queue/failed/`` by ``os.rename`` only, so at every instant it is in exactly
one place. Inside the queue a file is named ``<job id, 6 digits>__<sanitised name>``: the job id is
unique, so names never collide, and it grows with admission, so sorting names gives admission order.

Here: the naming and the read-only listing every process may use (the status server, the CLI,
``trainbox health``). The renames that move a job are the daemon's alone (``daemon/spool.py``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from trainbox.home import Home
from trainbox.states import Priority

JOB_SUFFIX = ".jsonl"
SIDECAR_SUFFIXES = (".toml", ".json")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
MAX_NAME = 120


def sanitize(name: str) -> str:
    """A file name that is safe inside the spool: no folders, no leading dots, printable ASCII only."""
    base = os.path.basename(name.replace("\\", "/"))
    safe = _UNSAFE.sub("_", base).lstrip(".")
    if not safe:
        safe = "job"
    if len(safe) > MAX_NAME:
        stem, dot, ext = safe.rpartition(".")
        safe = (stem[: MAX_NAME - len(ext) - 1] + dot + ext) if dot and len(ext) < 12 else safe[:MAX_NAME]
    return safe


def spool_name(job_id: int, name: str) -> str:
    """``<id>__<safe name>``; a ``.JSONL`` suffix in any case becomes ``.jsonl`` (the spool's
    listings look for that one)."""
    safe = sanitize(name)
    if safe.lower().endswith(JOB_SUFFIX) and not safe.endswith(JOB_SUFFIX):
        safe = safe[: -len(JOB_SUFFIX)] + JOB_SUFFIX
    return f"{job_id:06d}__{safe}"


def job_id_of(spool_file: str) -> int | None:
    head, sep, _ = spool_file.partition("__")
    return int(head) if sep and head.isdigit() else None


def is_ignored(name: str) -> bool:
    """Files intake never touches: hidden files and ones still being written under a temp name."""
    return name.startswith(".") or name.endswith((".tmp", ".part", ".partial", ".crdownload", "~"))


def sidecar_for(data_file: Path) -> Path | None:
    for suffix in SIDECAR_SUFFIXES:
        candidate = data_file.with_suffix(suffix)
        if candidate.is_file():
            return candidate
    return None


@dataclass(frozen=True)
class Waiting:
    priority: Priority
    path: Path

    @property
    def job_id(self) -> int | None:
        return job_id_of(self.path.name)


class Spool:
    def __init__(self, home: Home) -> None:
        self.home = home
        self.admitting = home.queue / "admitting"

    def ensure(self) -> None:
        self.admitting.mkdir(parents=True, exist_ok=True)

    def waiting(self) -> list[Waiting]:
        """Every waiting job in dispatch order: priority, then admission (the name's job id)."""
        items = [
            Waiting(p, f)
            for p in Priority
            for f in self.home.waiting(p).glob(f"*{JOB_SUFFIX}")
            if job_id_of(f.name) is not None
        ]
        # by the id as a number: past job 999,999 the name's 6-digit prefix grows to 7 digits
        return sorted(items, key=lambda w: (w.priority.rank, w.job_id or 0, w.path.name))

    def processing(self) -> list[Path]:
        return sorted(f for f in self.home.processing.glob(f"*{JOB_SUFFIX}") if job_id_of(f.name) is not None)

    def folders(self) -> list[Path]:
        """Every queue folder a job's file can be in (not the inbox)."""
        return [
            self.admitting,
            *(self.home.waiting(p) for p in Priority),
            self.home.processing,
            self.home.done,
            self.home.failed,
        ]

    def find_job(self, job_id: int, folders: list[Path] | None = None) -> Path | None:
        """The data file of a job, by the id its spool name starts with (sidecars and error files
        are not data files)."""
        prefix = f"{job_id:06d}__"
        for folder in folders if folders is not None else self.folders():
            for candidate in sorted(folder.glob(prefix + "*")) if folder.is_dir() else ():
                if candidate.suffix not in SIDECAR_SUFFIXES:  # also skips <name>.error.json
                    return candidate
        return None

    def counts(self) -> dict[str, int]:
        def n(folder: Path) -> int:
            return sum(1 for f in folder.glob(f"*{JOB_SUFFIX}")) if folder.is_dir() else 0

        out = {p.value: n(self.home.waiting(p)) for p in Priority}
        out["processing"] = n(self.home.processing)
        out["done"] = n(self.home.done)
        out["failed"] = sum(1 for _ in self.home.failed.glob("*.error.json")) if self.home.failed.is_dir() else 0
        return out
