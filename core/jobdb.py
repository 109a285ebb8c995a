"""The worker's few writes to the model DB for one job: its run's start step, checkpoint rows and events.

Best effort, like every report: an unavailable or locked DB is logged and the job goes on (its checkpoints
hold the progress). Only rank 0 has one (core.reporting).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, update

from core.errors import short_error
from management.db import Checkpoint, ModelDB, Run

log = logging.getLogger("core.worker")


class JobDB:
    """The worker's few DB writes (checkpoint rows, events) for one job."""

    def __init__(self, url: str, job_id: int) -> None:
        self.job_id = job_id
        self.db: ModelDB | None = None
        try:
            self.db = ModelDB(url)
        except Exception as e:  # boundary
            log.warning("DB unavailable (%s); continuing without DB records", short_error(e))

    def event(self, kind: str, message: str, **data: Any) -> None:
        if self.db is None:
            return
        try:
            self.db.event(kind, message, job_id=self.job_id, **data)
        except Exception as e:  # boundary
            log.warning("could not record event %s: %s", kind, short_error(e))

    def run_started(self, step: int) -> None:
        """The step this run (re)starts at, on its row: the job's newest run, which the daemon committed before
        it started this worker (daemon.jobs), so no run id has to travel with the spec."""
        if self.db is None:
            return
        try:
            with self.db.session() as s:
                newest = select(func.max(Run.id)).where(Run.job_id == self.job_id).scalar_subquery()
                s.execute(update(Run).where(Run.id == newest).values(start_step=step))
        except Exception as e:  # boundary
            log.warning("could not record the run's start step: %s", short_error(e))

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
            log.warning("could not record checkpoint %s: %s", path, short_error(e))

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
            log.warning("could not mark deleted checkpoints: %s", short_error(e))

    def close(self) -> None:
        if self.db is not None:
            try:
                self.db.close()
            except Exception as e:  # boundary
                log.warning("closing the DB: %s", short_error(e))
