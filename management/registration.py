"""Registering a model version in one crash-safe order, so the DB and ``models/`` never disagree for good.

1. the ``model_versions`` row is committed *pending* (``path`` empty): its id is the version number;
2. the run's ``final/`` is renamed to ``models/v{id:04d}`` (the name comes from the row, never a
   suffixed one: a folder already there is named by no final row; it is set aside first);
3. the row is made *final* (``path`` set).
A kill between two steps leaves a pending row; the daemon's start-up reconciliation
(``management/version_recovery.py``) finishes or undoes it, and removes folders no row names. So the
folder of version N is always ``models/vNNNN`` and ``models/current`` always parses to a version.
The daemon calls the steps one by one (``JobRunner._register_version``), with a test crash point
between each, so the chaos test can kill it exactly there.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from pathlib import Path

from management.db import PENDING_PATH, ModelDB, ModelVersion
from trainbox.atomic import fsync_dir
from trainbox.home import Home

log = logging.getLogger("trainbox.versions")

# folders under models/ that trainbox made: vNNNN, and vNNNN.K from homes before this order existed
VERSION_NAME = re.compile(r"^v(\d+)((?:\.\d+)*)$")
ORPHANED = ".orphaned"  # under models/: folders set aside rather than deleted


def is_pending(version: ModelVersion) -> bool:
    return version.path == PENDING_PATH


def folder_name(version_id: int) -> str:
    return f"v{version_id:04d}"


def version_folder(home: Home, version_id: int) -> Path:
    return home.models / folder_name(version_id)


def version_number(name: str) -> int | None:
    """The version a folder name under ``models/`` stands for. ``vNNNN.K`` (homes from before the
    registration order: a re-registration collided with an orphan ``vNNNN``) is version NNNN's."""
    m = VERSION_NAME.match(name)
    return int(m.group(1)) if m else None


def remove_folder(home: Home, db: ModelDB, folder: Path, reason: str, job_id: int | None = None) -> None:
    """Delete a folder under ``models/`` that no final version row names, with an event saying why."""
    shutil.rmtree(folder, ignore_errors=True)
    if folder.is_symlink() or folder.is_file():
        folder.unlink(missing_ok=True)
    fsync_dir(home.models)
    db.event("version_folder_removed", f"models/{folder.name} removed: {reason}", job_id, folder=folder.name)
    log.warning("models/%s removed: %s", folder.name, reason)


def set_aside(home: Home, db: ModelDB, folder: Path, reason: str, job_id: int | None = None) -> Path:
    """Move a folder out of the versions' names into ``models/.orphaned/`` (kept for a person to look at:
    a folder in a new version's way should not exist once start-up reconciliation ran, unless the DB
    was lost or replaced, when it may be the only copy of a trained model)."""
    aside = home.models / ORPHANED / f"{folder.name}.{time.time_ns()}"
    aside.parent.mkdir(parents=True, exist_ok=True)
    os.rename(folder, aside)
    fsync_dir(home.models)
    db.event("version_folder_set_aside", f"models/{folder.name} moved to {aside}: {reason}", job_id, folder=folder.name)
    log.warning("models/%s moved to %s: %s", folder.name, aside, reason)
    return aside


def place(home: Home, db: ModelDB, version_id: int, final: Path, job_id: int | None = None) -> Path:
    """Step 2: rename ``final`` to the pending version's folder (a folder in the way is set aside first)."""
    target = version_folder(home, version_id)
    home.models.mkdir(parents=True, exist_ok=True)
    if target.exists() or target.is_symlink():
        set_aside(home, db, target, f"in the way of version {version_id}'s registration, named by no version", job_id)
    os.rename(final, target)
    fsync_dir(home.models)
    fsync_dir(final.parent)
    return target


def make_final(db: ModelDB, version_id: int, folder: Path) -> None:
    """Step 3: the folder is in place; the row names it."""
    db.set_version_path(version_id, str(folder))
