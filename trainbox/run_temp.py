"""Leftovers of interrupted saves in a run folder (issue 14, D8), swept by the daemon at start-up and by a
worker before it loads: temp folders are removed, except where one holds the only copy of a complete
checkpoint, which is put back in place.

Every folder a worker publishes (``core.folders.publish_folder``) is filled under ``.tmp-<name>-XXXXXXXX``
beside its target and renamed into place; replacing an existing target first moves it aside into
``.tmp-old-<name>-XXXXXXXX/<name>``; ``core.checkpoint.prune`` renames a checkpoint it deletes to
``.tmp-deleted-<name>`` before removing it. A kill at any of those moments leaves such a folder. Most hold
nothing anyone needs (a half-written model, a checkpoint being deleted), but a kill between moving a
checkpoint aside and renaming its replacement into place leaves no ``step-N`` at all: then the complete one
(``COMPLETE`` marker) is renamed back. A ``final`` model is never restored from a temp folder: the result
that would vouch for it is written only after it is published, so the job trains it again.

Only real folders named ``.tmp-*`` directly in the run folder or its ``checkpoints/`` are touched; files
(the atomic writers' temp files are ``.<name>.XXXX.tmp``), links and everything else stay. The caller makes
sure no worker writes there meanwhile (it holds the run folder's lock, or the lock is free).
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from trainbox.atomic import fsync_dir

TMP = ".tmp-"
OLD = ".tmp-old-"
DELETED = ".tmp-deleted-"
CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"
_STEP = re.compile(r"^step-\d{8,}$")


@dataclass(frozen=True)
class Leftover:
    path: Path  # the temp folder found
    action: str  # "removed", or "restored" (its complete checkpoint is ``target`` now)
    target: Path | None = None


def candidate(folder: Path, name: str) -> tuple[str, Path | None]:
    """For the temp folder ``name`` in ``folder``: the name it was meant to be published as ("" when
    unknown) and the folder inside it that may be a complete copy of that (None: nothing to keep)."""
    if name.startswith(DELETED):
        return name[len(DELETED) :], None  # deleted on purpose: never brought back
    if name.startswith(OLD):
        target = name[len(OLD) :].rpartition("-")[0]
        return target, (folder / name / target if target else None)
    target = name[len(TMP) :].rpartition("-")[0]
    return target, (folder / name if target else None)


def restorable(folder: Path, name: str) -> Path | None:
    """The complete checkpoint a temp folder holds whose ``step-N`` is missing (None: remove it all)."""
    target, inside = candidate(folder, name)
    if inside is None or not _STEP.match(target) or os.path.lexists(folder / target):
        return None
    if inside.is_symlink() or not inside.is_dir() or not (inside / COMPLETE).is_file():
        return None
    return inside


def sweep_folder(folder: Path, restore: bool) -> list[Leftover]:
    """Remove the temp folders directly in ``folder`` (restoring complete checkpoints when ``restore``)."""
    try:
        entries = [e for e in os.scandir(folder) if e.name.startswith(TMP) and e.is_dir(follow_symlinks=False)]
    except (FileNotFoundError, NotADirectoryError):
        return []
    found: list[Leftover] = []
    for entry in sorted(entries, key=lambda e: e.name):
        path = Path(entry.path)
        keep = restorable(folder, entry.name) if restore else None
        if keep is not None:
            target = folder / candidate(folder, entry.name)[0]
            os.rename(keep, target)
            fsync_dir(folder)
            if keep != path:
                shutil.rmtree(path, ignore_errors=True)
            found.append(Leftover(path, "restored", target))
            continue
        shutil.rmtree(path, ignore_errors=True)
        found.append(Leftover(path, "removed"))
    return found


def sweep_run(run_dir: Path) -> list[Leftover]:
    """Every leftover of an interrupted save in one run folder: ``final``'s and the checkpoints'."""
    run_dir = Path(run_dir)
    return sweep_folder(run_dir, restore=False) + sweep_folder(run_dir / CHECKPOINTS, restore=True)
