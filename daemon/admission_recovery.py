"""Finishing, at start-up, the admissions a crash interrupted; before anything else the daemon does.

- a row in state ``admitting`` with no intent and no staged file: its file never left the inbox, so
  the row is dropped and the file admitted afresh;
- a row whose file already reached a queue folder: the row is brought up to date;
- an intent: the unit's remaining sources are claimed (a file and its sidecar end together), then
  the file is decided again, unless the daemon died while deciding it before, twice: then it is
  quarantined in ``queue/failed/`` (class ``internal``) so it cannot stop the daemon again.
"""

from __future__ import annotations

import os
from pathlib import Path

from daemon.admission import ADMITTING, Admission, Admitted, Staged, traceback_tail
from daemon.staging import INTENT_SUFFIX, Intent
from management.db import Job
from trainbox.config import load_sidecar
from trainbox.records import Validation
from trainbox.spool import SIDECAR_SUFFIXES, job_id_of, sidecar_for
from trainbox.states import JobState

MAX_DECIDE_ATTEMPTS = 2


def recover(adm: Admission) -> list[Admitted]:
    """Decisions made now (quarantines, units that could not be claimed); files to decide again are
    left in ``adm.backlog`` for the main loop, so a big file does not hold up the start."""
    admitting = adm.spool.admitting
    intents = Intent.all(admitting)
    _adopt_legacy_files(adm, intents)
    known = {i.job_id for i in intents}
    for job in adm.db.jobs():
        if job.state != ADMITTING or job.id in known:
            continue
        placed = adm.spool.find_job(job.id)
        if placed is not None:  # moved on before the crash, but the row was not updated
            _record_placed(adm, job.id, placed)
            continue
        with adm.db.session() as s:  # its file never left the inbox: admit it afresh
            row = s.get(Job, job.id)
            if row is not None:
                s.delete(row)
    done: list[Admitted] = []
    queue_folders = [f for f in adm.spool.folders() if f != admitting]
    for intent in intents:
        try:
            decided = _recover_one(adm, intent, queue_folders)
        except Exception as e:  # boundary: a file recovery cannot handle must not stop every start
            decided = _set_aside(adm, intent, e)
        if decided is not None:
            done.append(decided)
    return done


def _recover_one(adm: Admission, intent: Intent, queue_folders: list[Path]) -> Admitted | None:
    admitting = adm.spool.admitting
    placed = adm.spool.find_job(intent.job_id, queue_folders)
    if placed is not None:  # decided before the crash; only the intent was left
        row = adm.db.job(intent.job_id)
        if row is None or row.state == ADMITTING:
            _record_placed(adm, intent.job_id, placed)
        intent.remove(admitting)
        return None
    if adm.db.job(intent.job_id) is None:  # a row lost with the DB: the file is accounted for anyway
        with adm.db.session() as s:
            s.add(Job(id=intent.job_id, name=intent.spool_name.partition("__")[2], state=ADMITTING))
    claimed = adm.claim_unit(intent)
    if isinstance(claimed, Admitted):
        return claimed
    if intent.decide_attempts >= MAX_DECIDE_ATTEMPTS:
        return _quarantine(adm, claimed)
    adm.backlog.append(claimed)  # decided one at a time: only a file that really stops the daemon reaches the limit
    return None


def _set_aside(adm: Admission, intent: Intent, exc: Exception) -> Admitted | None:
    """What is staged of a unit whose recovery failed goes to failed/ (class internal)."""
    staged = adm.staged_of(intent, adm.spool.admitting / intent.spool_name)
    try:
        return adm.reject(
            staged,
            "internal",
            f"recovering its admission failed: {type(exc).__name__}: {exc}",
            traceback=traceback_tail(exc),
        )
    except Exception:  # boundary: the intent stays; the event says why
        adm.db.event("admission_error", f"{intent.spool_name}: recovery failed: {type(exc).__name__}: {exc}")
        return None


def _quarantine(adm: Admission, staged: Staged) -> Admitted:
    reason = (
        f"the daemon stopped {staged.intent.decide_attempts} times while admitting this file; set aside so it "
        "cannot stop it again (look at the daemon's log; drop the file again to retry)"
    )
    return adm.reject(staged, "internal", reason)


def _adopt_legacy_files(adm: Admission, intents: list[Intent]) -> None:
    """A file staged by a daemon from before intents existed gets one (its source was the inbox)."""
    admitting = adm.spool.admitting
    have = {i.spool_name for i in intents}
    for f in sorted(admitting.iterdir()) if admitting.is_dir() else ():
        jid = job_id_of(f.name)
        if jid is None or f.suffix in SIDECAR_SUFFIXES or f.name.endswith(INTENT_SUFFIX) or f.name in have:
            continue
        sidecars = [p.name for p in (f.with_suffix(s) for s in SIDECAR_SUFFIXES) if os.path.lexists(p)]
        intent = Intent(jid, f.name, str(adm.home.inbox), f.name.partition("__")[2], [], None)
        intent.sidecar_names = sidecars
        intent.staged_sidecars = list(sidecars)
        intent.save(admitting)
        intents.append(intent)


def _record_placed(adm: Admission, job_id: int, path: Path) -> None:
    """Bring the row of a job whose file reached its queue folder up to date with the folder."""
    home = adm.home
    state = JobState.REJECTED if path.parent == home.failed else JobState.QUEUED
    read = Validation(path, adm.limits)  # one read gives the lines' report and the sha256
    read.feed(float("inf"))
    report = read.report if state == JobState.QUEUED else None
    with adm.db.session() as s:
        row = s.get(Job, job_id)
        assert row is not None
        row.state = state.value
        row.spool_name = path.name
        if path.parent != home.failed:
            row.priority = path.parent.name
        row.sha256 = read.sha256
        if report is not None:
            row.n_records = report.n_records
            row.data_format = report.data_format
        kept = sidecar_for(home.run_dir(job_id) / "sidecar.jsonl")
        if kept is not None:  # the sidecar was filed with the run before the crash
            overrides = load_sidecar(kept).model_dump(mode="json", exclude_unset=True)
            overrides.pop("priority", None)
            overrides.pop("eval_file", None)
            row.lineage = overrides.pop("lineage", None) or row.lineage
            row.settings = overrides
    adm.db.event("admission_recovered", f"{path.name}: found in {path.parent.name}/", job_id)
