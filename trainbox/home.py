"""The folders and files of one trainbox instance (one home).

Every process builds a ``Home`` from the same root and finds everything through it, so the on-disk
layout is written down once. See docs/ARCHITECTURE.md for what each place holds.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from trainbox.states import Priority

HOME_ENV = "TRAINBOX_HOME"


@dataclass(frozen=True)
class Home:
    root: Path

    @classmethod
    def resolve(cls, home: str | Path | None = None) -> Home:
        """``--home`` wins, then ``$TRAINBOX_HOME``, then the current folder."""
        chosen = home if home is not None else os.environ.get(HOME_ENV) or os.getcwd()
        return cls(Path(chosen).expanduser().resolve())

    # intake and spool
    @property
    def inbox(self) -> Path:
        return self.root / "inbox"

    @property
    def queue(self) -> Path:
        return self.root / "queue"

    def waiting(self, priority: Priority) -> Path:
        return self.queue / priority.value

    @property
    def processing(self) -> Path:
        return self.queue / "processing"

    @property
    def done(self) -> Path:
        return self.queue / "done"

    @property
    def failed(self) -> Path:
        return self.queue / "failed"

    # state shared between processes
    @property
    def status(self) -> Path:
        return self.root / "status"

    @property
    def control(self) -> Path:
        return self.root / "control"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    def run_dir(self, job_id: int) -> Path:
        return self.runs / f"job-{job_id:06d}"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def memory(self) -> Path:
        """Every job's memory sets, content-addressed: ``<sha256>.jsonl`` (``management/memory.py``)."""
        return self.root / "memory"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def embedded_model(self) -> Path:
        """Where the tiny default model is built once and reused."""
        return self.cache / "embedded-model"

    @property
    def config_file(self) -> Path:
        return self.root / "trainbox.toml"

    @property
    def db_file(self) -> Path:
        return self.root / "trainbox.db"

    @property
    def db_url(self) -> str:
        return f"sqlite:///{self.db_file}"

    def ensure(self) -> Home:
        for d in (
            self.inbox,
            *(self.inbox / p.value for p in Priority),
            *(self.waiting(p) for p in Priority),
            self.processing,
            self.done,
            self.failed,
            self.status,
            self.control,
            self.runs,
            self.models,
            self.cache,
        ):
            d.mkdir(parents=True, exist_ok=True)
        return self
