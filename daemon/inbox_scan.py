"""What is in the inbox, judged without following anything a stranger put there.

The inbox holds regular files, directly or in the three priority folders (``high``, ``normal``,
``low``; any letter case). Everything else (symlinks, FIFOs, sockets, devices, hard links, other
folders, a symlink where a priority folder should be) is *refused*: never opened, never moved,
reported once and left where it is. ``os.scandir`` with ``follow_symlinks=False`` is the whole
trick: a symlink to a folder is never taken for a priority folder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

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


def scan_inbox(inbox: Path) -> InboxListing:
    """One pass over the inbox and its priority folders (no deeper)."""
    out = InboxListing()
    if not inbox.is_dir():
        return out
    _scan_folder(inbox, out, top=True)
    return out


def _scan_folder(folder: Path, out: InboxListing, top: bool) -> None:
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
            if top and priority_folder(entry.name) is not None:
                _scan_folder(path, out, top=False)
            else:
                where = "inside a priority folder" if not top else "not one of high, normal, low"
                out.refused.append(Refused(path, "folder", f"a folder {where}: only files are taken"))
            continue
        try:
            check_regular(st)
        except NotRegularFile as e:
            if top and priority_folder(entry.name) is not None and entry.is_symlink():
                reason = "a symbolic link where a priority folder belongs: not followed"
            else:
                reason = f"{e}: never opened or moved"
            out.refused.append(Refused(path, kind_of(st.st_mode), reason))
            continue
        (out.sidecars if is_sidecar_name(entry.name) else out.candidates).append(path)
