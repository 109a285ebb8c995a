"""What is in the inbox, judged without following anything a stranger put there.

The inbox holds regular files, directly, in the three priority folders (``high``, ``normal``, ``low``;
any letter case), in a lineage's folder (``inbox/<lineage>/``, a valid lineage name:
``trainbox/lineage.py``) or in a priority folder inside it (``inbox/<lineage>/high/``). Everything else
(symlinks, FIFOs, sockets, devices, hard links, other folders, a symlink where a folder should be) is
*refused*: never opened, never moved, reported once and left where it is. ``os.scandir`` with
``follow_symlinks=False`` is the whole trick: a symlink to a folder is never taken for one of ours.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from trainbox.lineage import is_lineage_name
from trainbox.safefs import NotRegularFile, check_regular, kind_of
from trainbox.spool import SIDECAR_SUFFIXES, is_ignored
from trainbox.states import Priority

JOB_SUFFIX_LOWER = ".jsonl"


@dataclass(frozen=True)
class Refused:
    """An inbox entry trainbox will not touch, and why."""

    path: Path
    kind: str
    reason: str


@dataclass
class InboxListing:
    candidates: list[Path] = field(default_factory=list)  # regular files that may become jobs
    sidecars: list[Path] = field(default_factory=list)  # regular <name>.toml/.json files
    refused: list[Refused] = field(default_factory=list)


def priority_folder(name: str) -> Priority | None:
    """``HIGH`` and ``High`` mean ``high``: a folder name's case must not silently demote a job."""
    try:
        return Priority(name.lower())
    except ValueError:
        return None


def is_sidecar_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in SIDECAR_SUFFIXES


@dataclass(frozen=True)
class Placement:
    """What a file's folder in the inbox asks for: a lineage and a priority (None: not said there)."""

    lineage: str | None
    priority: Priority | None


def placement(inbox: Path, path: Path) -> Placement | None:
    """Pure (names only): what the folders between ``inbox`` and the file ``path`` say, or None when the
    file is not in a place the inbox takes files from (too deep, or a folder that is neither a priority
    nor a lineage). Whether those folders are real folders is the scan's and the claim's business."""
    try:
        parts = path.parent.relative_to(inbox).parts
    except ValueError:
        return None
    if not parts:
        return Placement(None, None)
    if len(parts) == 1:
        if (priority := priority_folder(parts[0])) is not None:
            return Placement(None, priority)
        return Placement(parts[0], None) if is_lineage_name(parts[0]) else None
    if len(parts) == 2 and is_lineage_name(parts[0]) and (priority := priority_folder(parts[1])) is not None:
        return Placement(parts[0], priority)
    return None


def scan_inbox(inbox: Path) -> InboxListing:
    """One pass over the inbox, its priority and lineage folders and the priority folders in those."""
    out = InboxListing()
    if not inbox.is_dir():
        return out
    _scan_folder(inbox, out, TOP)
    return out


TOP, LINEAGE, PRIORITY = "top", "lineage", "priority"  # what a folder of the inbox is

_NOT_TAKEN = {
    TOP: "neither a priority (high, normal, low) nor a lineage name (lower-case letters, digits, - and _)",
    LINEAGE: "in a lineage folder that is not one of high, normal, low",
    PRIORITY: "inside a priority folder",
}


def _subfolder(level: str, name: str) -> str | None:
    """What a folder named ``name`` inside a folder of kind ``level`` is, or None (refused)."""
    if level in (TOP, LINEAGE) and priority_folder(name) is not None:
        return PRIORITY
    if level == TOP and is_lineage_name(name):
        return LINEAGE
    return None


def _scan_folder(folder: Path, out: InboxListing, level: str) -> None:
    try:
        entries = list(os.scandir(folder))
    except OSError as e:
        out.refused.append(Refused(folder, "folder", f"cannot be listed: {e.strerror}"))
        return
    for entry in entries:
        path = Path(entry.path)
        if is_ignored(entry.name):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue  # gone since the listing
        if entry.is_dir(follow_symlinks=False):
            if (kind := _subfolder(level, entry.name)) is not None:
                _scan_folder(path, out, kind)
            else:
                out.refused.append(Refused(path, "folder", f"a folder {_NOT_TAKEN[level]}: only files are taken"))
            continue
        try:
            check_regular(st)
        except NotRegularFile as e:
            if _subfolder(level, entry.name) is not None and entry.is_symlink():
                reason = "a symbolic link where a priority or lineage folder belongs: not followed"
            else:
                reason = f"{e}: never opened or moved"
            out.refused.append(Refused(path, kind_of(st.st_mode), reason))
            continue
        (out.sidecars if is_sidecar_name(entry.name) else out.candidates).append(path)
