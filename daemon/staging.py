"""A job's files while they are admitted: the unit (data file, sidecars, an eval file beside them)
and the intent file that makes claiming them crash-safe.

Admission claims a file and its sidecar as one unit. Before the first rename it writes
``queue/admitting/.<spool name>.intent.json`` naming every source; a daemon killed between renames
finds the intent at its next start and finishes the claim, so a kill at any point leaves the unit
either whole in the inbox or whole in the spool. The intent also counts how many times the daemon
started deciding the file: a file that was being decided when the daemon died twice is set aside
(quarantined), so no file can make the daemon crash in a loop.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from trainbox.atomic import atomic_write_json
from trainbox.config import ConfigError, load_sidecar

INTENT_SUFFIX = ".intent.json"


@dataclass
class Intent:
    job_id: int
    spool_name: str
    source_dir: str
    data_name: str
    sidecar_names: list[str] = field(default_factory=list)
    eval_name: str | None = None  # an eval file beside the sidecar in the inbox, claimed with the job
    staged_sidecars: list[str] = field(default_factory=list)
    eval_claimed: bool = False
    decide_attempts: int = 0

    @staticmethod
    def path_for(admitting: Path, spool_name: str) -> Path:
        return admitting / f".{spool_name}{INTENT_SUFFIX}"

    def save(self, admitting: Path) -> None:
        """Written before the renames it describes. Durable (fsynced) only when the unit has more than
        one file: a lone file's intent lost in a power cut is rebuilt from the staged file itself
        (``admission_recovery``), and 10,000 dropped files must not cost 20,000 extra fsyncs."""
        # names may hold bytes that are not UTF-8 (surrogate escapes): json escapes them as \udcXX
        path = self.path_for(admitting, self.spool_name)
        if self.sidecar_names or self.eval_name:
            atomic_write_json(path, asdict(self))
            return
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(asdict(self)), encoding="utf-8")
        os.replace(tmp, path)

    def remove(self, admitting: Path) -> None:
        """A leftover intent (a crash just before this) is dropped by recovery once it finds the job
        placed, so no fsync is needed here."""
        self.path_for(admitting, self.spool_name).unlink(missing_ok=True)

    @classmethod
    def load(cls, path: Path) -> Intent | None:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(**data)
        except (OSError, ValueError, TypeError):
            return None

    @classmethod
    def all(cls, admitting: Path) -> list[Intent]:
        out = []
        for p in sorted(admitting.glob(f".*{INTENT_SUFFIX}")) if admitting.is_dir() else ():
            intent = cls.load(p)
            if intent is not None:
                out.append(intent)
            else:  # a torn or foreign file: it holds no job's state
                p.unlink(missing_ok=True)
        return out

    @property
    def source(self) -> Path:
        return Path(self.source_dir)


def eval_name_beside(sidecar: Path) -> str | None:
    """The bare file name a readable sidecar gives as ``eval_file`` (a file in its own folder), or None."""
    try:
        chosen = load_sidecar(sidecar).eval_file
    except ConfigError:
        return None
    return chosen if chosen and os.sep not in chosen and chosen not in (".", "..") else None


def sidecars_beside(data: Path) -> list[Path]:
    """Every ``<stem>.toml`` / ``<stem>.json`` (any letter case) in the data file's folder that
    exists as a directory entry (a symlink counts: it must not be silently ignored)."""
    stem = data.name[: -len(".jsonl")] if data.name.lower().endswith(".jsonl") else data.stem
    out = []
    for suffix in (".toml", ".json", ".TOML", ".JSON", ".Toml", ".Json"):
        candidate = data.with_name(stem + suffix)
        if os.path.lexists(candidate):
            out.append(candidate)
    return out
