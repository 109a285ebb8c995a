"""Where the worker reports besides stdout: the status file and the model DB. Both best-effort.

Reporting must never fail a job (a full disk for the status file, a locked DB): every write here
catches, logs and carries on. Training progress is safe in checkpoints regardless.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from sqlalchemy import update

from management.db import Checkpoint, ModelDB
from trainbox.status import TrainingStatus, write_status

log = logging.getLogger("core.worker")


def _short(e: Exception) -> str:
    """First line only: SQLAlchemy errors append the SQL and parameters."""
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


class StatusReporter:
    """``status/training.json``, rewritten atomically: at most every ``interval`` s, plus every
    phase change. Each write refreshes ``heartbeat``, which is what the watchdog judges."""

    def __init__(self, path: Path, job_id: int, job_name: str, interval: float = 0.5) -> None:
        self.path = Path(path)
        self.interval = interval
        now = time.time()
        self.status = TrainingStatus(job_id=job_id, job_name=job_name, pid=os.getpid(), started_at=now)
        self._last_write = 0.0

    def update(self, force: bool = False, **fields: Any) -> None:
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
            log.warning("could not write status %s: %s", self.path, _short(e))


class JobDB:
    """The worker's few DB writes (checkpoint rows, events) for one job."""

    def __init__(self, url: str, job_id: int) -> None:
        self.job_id = job_id
        self.db: ModelDB | None = None
        try:
            self.db = ModelDB(url)
        except Exception as e:  # boundary
            log.warning("DB unavailable (%s); continuing without DB records", _short(e))

    def event(self, kind: str, message: str, **data: Any) -> None:
        if self.db is None:
            return
        try:
            self.db.event(kind, message, job_id=self.job_id, **data)
        except Exception as e:  # boundary
            log.warning("could not record event %s: %s", kind, _short(e))

    def checkpoint_saved(self, step: int, path: Path, meta: dict[str, Any]) -> None:
        if self.db is None:
            return
        try:
            with self.db.session() as s:
                s.add(
                    Checkpoint(
                        job_id=self.job_id,
                        step=step,
                        path=str(path),
                        train_loss=meta.get("train_loss"),
                        val_loss=meta.get("val_loss"),
                        size_bytes=int(meta.get("size_bytes", 0)),
                    )
                )
        except Exception as e:  # boundary
            log.warning("could not record checkpoint %s: %s", path, _short(e))

    def checkpoints_deleted(self, paths: list[Path]) -> None:
        if self.db is None or not paths:
            return
        try:
            with self.db.session() as s:
                s.execute(
                    update(Checkpoint)
                    .where(Checkpoint.job_id == self.job_id, Checkpoint.path.in_([str(p) for p in paths]))
                    .where(Checkpoint.deleted_at.is_(None))
                    .values(deleted_at=time.time())
                )
        except Exception as e:  # boundary
            log.warning("could not mark deleted checkpoints: %s", _short(e))

    def close(self) -> None:
        if self.db is not None:
            try:
                self.db.close()
            except Exception as e:  # boundary
                log.warning("closing the DB: %s", _short(e))
