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
    """``root``: this host's own folder (config, status, control requests, logs, cache, the SQLite DB);
    ``shared``: where the inbox, spool, runs, model versions and memory sets live when several hosts
    share them (``[storage] shared``, a shared mount; None: the home itself, the embedded default)."""

    root: Path
    shared: Path | None = None

    @classmethod
    def resolve(cls, home: str | Path | None = None) -> Home:
        """``--home`` wins, then ``$TRAINBOX_HOME``, then the current folder; ``[storage] shared`` is read
        from its trainbox.toml, so every process of a host finds the same shared folder."""
        chosen = home if home is not None else os.environ.get(HOME_ENV) or os.getcwd()
        root = Path(chosen).expanduser().resolve()
        return cls(root, shared_storage(root))

    @property
    def storage(self) -> Path:
        """The root of what every host must read: the home itself unless ``[storage] shared`` says."""
        return self.shared if self.shared is not None else self.root

    # intake and spool
    @property
    def inbox(self) -> Path:
        return self.storage / "inbox"

    @property
    def queue(self) -> Path:
        return self.storage / "queue"

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
        return self.storage / "runs"

    def run_dir(self, job_id: int) -> Path:
        return self.runs / f"job-{job_id:06d}"

    @property
    def models(self) -> Path:
        return self.storage / "models"

    @property
    def memory(self) -> Path:
        """Every job's memory sets, content-addressed: ``<sha256>.jsonl`` (``management/memory.py``)."""
        return self.storage / "memory"

    @property
    def trash(self) -> Path:
        """Deletions go through here (a rename, then the delete): on the storage they delete from."""
        return self.storage / "trash"

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


def shared_storage(root: Path) -> Path | None:
    """``[storage] shared`` of the home's trainbox.toml (relative: to the home), or None. Read with
    tomllib alone: every process resolves its home at start, and the full settings load later (a bad file
    is reported there, by ``trainbox/config.py``)."""
    import tomllib

    try:
        data = tomllib.loads((root / "trainbox.toml").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    shared = data.get("storage", {}).get("shared") if isinstance(data.get("storage"), dict) else None
    if not isinstance(shared, str) or not shared:
        return None
    path = Path(shared).expanduser()
    return (path if path.is_absolute() else root / path).resolve()
