"""Start-up reconciliation of version rows, ``models/`` folders and ``models/current``, both ways.

A daemon killed inside a registration (``management/registration.py``) or a pointer switch leaves a
pending row, a folder no row names, or a pointer naming nothing. At start, before any gate or job,
``recover_versions`` gathers what is there (``gather``: plain values), ``plan`` decides (pure, unit
tested), and ``apply`` acts, one event per action:
- a pending row whose folder ``models/vNNNN`` is complete: adopted (row made final);
- a pending row whose run's ``final/`` is complete: renamed into place now and made final;
- a pending row with neither: removed (the job is still in ``processing/`` and trains again);
- a folder named like a version (``vNNNN``, ``vNNNN.K``) that no final row names: leaves the versions'
  names: moved to ``models/.orphaned/`` if it holds a complete model (with a lost or replaced DB it
  may be the only copy; a person deletes it), deleted if not; other names under ``models/`` (a base
  model someone keeps there) are never touched;
- a lineage's pointer (``models/current``, ``models/current@<lineage>``) naming a missing, incomplete or
  unknown folder, a name that is no version or a version of another lineage, or missing while versions
  of its lineage were promoted: pointed at the lineage's most recently promoted version that is
  complete (``promotions``), or removed when there is none.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from management.db import ModelDB
from management.registration import (
    VERSION_NAME,
    folder_name,
    is_pending,
    make_final,
    place,
    remove_folder,
    set_aside,
    version_folder,
    version_number,
)
from management.versions import is_complete_model, point_current
from trainbox.atomic import fsync_dir
from trainbox.home import Home
from trainbox.lineage import MAIN, lineage_of_pointer, pointer_name

log = logging.getLogger("trainbox.versions")

TEMP_LINK = re.compile(r"^\.current(@[a-z0-9_-]+)?\..*\.tmp$")  # point_current's temp link, left by a kill
EVENTS = {
    "adopt": "version_adopted",
    "place": "version_placed",
    "drop_row": "version_dropped",
    "remove_temp": "current_temp_removed",
    "set_current": "current_repaired",
    "remove_current": "current_removed",
}


@dataclass(frozen=True)
class RowFacts:
    id: int
    pending: bool
    folder: str = ""  # the folder name its path names (final rows)
    job_id: int | None = None
    final_ready: bool = False  # pending rows: its run's final/ holds a complete model
    lineage: str = MAIN


@dataclass(frozen=True)
class PointerFacts:
    """One lineage's pointer under ``models/``."""

    lineage: str
    link: str | None  # its target; None: no link
    promoted: list[int] = field(default_factory=list)  # the lineage's promotions, most recent first
    blocked: bool = False  # the pointer's name exists but is no symlink: never replaced
    elsewhere: bool = False  # it names a vNNNN outside this models/ (a home that was moved)


@dataclass(frozen=True)
class ModelsFacts:
    rows: list[RowFacts]
    folders: dict[str, bool]  # version-like names under models/ -> complete model
    pointers: list[PointerFacts] = field(default_factory=list)
    temp_links: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Action:
    """``kind``: adopt, place, drop_row, set_aside, remove_folder, remove_temp, set_current, remove_current."""

    kind: str
    version: int | None = None
    folder: str = ""
    job_id: int | None = None
    reason: str = ""
    lineage: str = MAIN  # set_current, remove_current: whose pointer


def plan(facts: ModelsFacts) -> list[Action]:
    """Pure: what makes the rows, the folders and the pointer agree (module docstring)."""
    actions: list[Action] = []
    named: dict[str, int] = {r.folder: r.id for r in facts.rows if not r.pending and r.folder}
    complete = {name: ok for name, ok in facts.folders.items()}
    for r in (r for r in facts.rows if r.pending):
        name = folder_name(r.id)
        if complete.get(name):
            actions.append(Action("adopt", r.id, name, r.job_id, f"pending version {r.id}: its folder is in place"))
        elif r.final_ready:
            if name in complete:
                actions.append(Action("remove_folder", r.id, name, r.job_id, "incomplete, in the way of its version"))
            actions.append(Action("place", r.id, name, r.job_id, f"pending version {r.id}: its final model moved now"))
            complete[name] = True
        else:
            if name in complete:
                actions.append(Action("remove_folder", r.id, name, r.job_id, "incomplete folder of a pending version"))
                complete.pop(name)
            actions.append(Action("drop_row", r.id, "", r.job_id, f"pending version {r.id}: no folder, no final model"))
            continue
        named[name] = r.id
    for name in sorted(set(facts.folders) - set(named)):
        if complete.get(name):  # may be the only copy of a model (a lost DB): kept out of the way
            actions.append(Action("set_aside", None, name, None, "no version row names it (an orphan)"))
        elif name in complete:
            actions.append(Action("remove_folder", None, name, None, "no version row names it, and it is incomplete"))
    actions += [Action("remove_temp", folder=t, reason="a pointer switch's temp link") for t in facts.temp_links]
    lineage_of = {r.id: r.lineage for r in facts.rows}
    for p in facts.pointers:
        mine = {name: vid for name, vid in named.items() if lineage_of.get(vid) == p.lineage}
        actions += _pointer(p, mine, complete)
    return actions


def _pointer(p: PointerFacts, named: dict[str, int], complete: dict[str, bool]) -> list[Action]:
    """A lineage's pointer resolvable: it names a complete folder of a final row of that lineage, whose
    number it parses to. ``named``: the lineage's final rows by folder name."""
    if p.blocked:
        return []
    where = f"models/{pointer_name(p.lineage)}"
    usable = {vid: name for name, vid in named.items() if complete.get(name)}
    if p.link is not None:
        name = Path(p.link).name
        ours = named.get(name) is not None and named[name] == version_number(name)
        if ours and complete.get(name) and not p.elsewhere:
            return []
        why = f"{where} named {p.link!r}, which is no complete version folder of lineage {p.lineage}"
    elif p.promoted:
        why = f"{where} was missing though versions of lineage {p.lineage} were promoted"
    else:
        return []  # a new home, or one from before the pointer: the newest version is the start
    target = next((v for v in p.promoted if v in usable), None)
    if target is not None:
        reason = f"{why}: the last promoted version {target}"
        return [Action("set_current", target, usable[target], reason=reason, lineage=p.lineage)]
    if p.link is not None:
        return [Action("remove_current", reason=f"{why}, and no promoted version is complete", lineage=p.lineage)]
    return []


def gather(home: Home, db: ModelDB, busy_jobs: frozenset[int] = frozenset()) -> ModelsFacts:
    """What is there: rows (pending ones with their run's final/), version-like folders, the pointers.
    ``busy_jobs``: jobs another host of a fleet holds, whose registration may be under way: their rows,
    pending or not, and their folders are left alone (their holder finishes or repairs them)."""
    rows = []
    for v in db.versions(pending=True):
        if v.job_id in busy_jobs:
            continue
        if is_pending(v):
            final = home.run_dir(v.job_id) / "final" if v.job_id is not None else None
            ready = final is not None and final.is_dir() and is_complete_model(final)
            rows.append(RowFacts(v.id, True, job_id=v.job_id, final_ready=ready, lineage=v.lineage))
        else:
            rows.append(RowFacts(v.id, False, Path(v.path).name, v.job_id, lineage=v.lineage))
    folders: dict[str, bool] = {}
    temps: list[str] = []
    busy_versions = {v.id for v in db.versions(pending=True) if v.job_id in busy_jobs}
    lineages = set(db.lineages())
    if home.models.is_dir():
        for entry in os.scandir(home.models):
            if VERSION_NAME.match(entry.name):
                if version_number(entry.name) in busy_versions:
                    continue
                path = Path(entry.path)
                folders[entry.name] = entry.is_dir(follow_symlinks=False) and is_complete_model(path)
            elif TEMP_LINK.match(entry.name) and not busy_jobs:  # another host may be switching a pointer
                temps.append(entry.name)
            elif (named := lineage_of_pointer(entry.name)) is not None:
                lineages.add(named)
    pointers = [_pointer_facts(home, db, lineage) for lineage in sorted(lineages)]
    return ModelsFacts(rows, folders, pointers, sorted(temps))


def _pointer_facts(home: Home, db: ModelDB, lineage: str) -> PointerFacts:
    path = home.models / pointer_name(lineage)
    link = os.readlink(path) if path.is_symlink() else None
    blocked = link is None and os.path.lexists(path)
    elsewhere = link is not None and os.path.realpath(path) != os.path.realpath(home.models / Path(link).name)
    return PointerFacts(lineage, link, db.promoted_ids(lineage), blocked, elsewhere)


def apply(home: Home, db: ModelDB, actions: list[Action]) -> None:
    """Carry out a plan, one event each; the job of a dropped row trains again from its checkpoint."""
    for a in actions:
        if a.kind == "remove_folder":
            remove_folder(home, db, home.models / a.folder, a.reason, a.job_id)
            continue
        if a.kind == "set_aside":
            set_aside(home, db, home.models / a.folder, a.reason, a.job_id)
            continue
        if a.kind == "remove_temp":
            (home.models / a.folder).unlink(missing_ok=True)
            fsync_dir(home.models)
        elif a.kind == "adopt" and a.version is not None:
            make_final(db, a.version, version_folder(home, a.version))
        elif a.kind == "place" and a.version is not None and a.job_id is not None:
            make_final(db, a.version, place(home, db, a.version, home.run_dir(a.job_id) / "final", a.job_id))
        elif a.kind == "drop_row" and a.version is not None:
            db.drop_pending_version(a.version)
        elif a.kind == "set_current":
            point_current(home, home.models / a.folder, a.lineage)
        elif a.kind == "remove_current":
            (home.models / pointer_name(a.lineage)).unlink(missing_ok=True)
            fsync_dir(home.models)
        db.event(EVENTS[a.kind], a.reason, a.job_id, version=a.version, folder=a.folder, lineage=a.lineage)
        log.warning("version recovery: %s", a.reason)


def recover_versions(home: Home, db: ModelDB, busy_jobs: frozenset[int] = frozenset()) -> list[Action]:
    """Reconcile at daemon start (before gates and jobs); returns what was done."""
    actions = plan(gather(home, db, busy_jobs))
    apply(home, db, actions)
    return actions
