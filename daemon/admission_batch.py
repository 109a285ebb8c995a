"""Admitting many small lone files at once (10,000 dropped together must be queued within a minute).

The same steps as one file's admission (rows, intents, claims, validation, duplicate check, renames),
done a batch at a time: one DB transaction for the rows, one for the results, one fsync per folder
instead of four per file. Each file still gets its own verdict, and an exception with one file
sends only that file to ``queue/failed/``. A crash in the middle leaves intents that recovery
finishes one file at a time, like any other interrupted admission.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from sqlalchemy import select

from daemon.admission import (
    ADMITTING,
    LIVE_OR_DONE,
    Admission,
    Admitted,
    Rejected,
    Staged,
    traceback_tail,
)
from daemon.spool import claim
from daemon.staging import Intent, sidecars_beside
from management.db import Job
from trainbox.atomic import fsync_dir
from trainbox.safefs import NotRegularFile, display_name
from trainbox.spool import JOB_SUFFIX, spool_name
from trainbox.states import JobState

BATCH_MAX_BYTES = 1 << 20  # bigger files go one at a time, validated in slices
BATCH_SIZE = 200


def batchable(path: Path) -> bool:
    """A regular ``.jsonl`` file of at most 1 MiB with no sidecar: nothing in it can take long."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return (
        stat.S_ISREG(st.st_mode)
        and st.st_size <= BATCH_MAX_BYTES
        and path.name.lower().endswith(JOB_SUFFIX)
        and not sidecars_beside(path)
    )


def admit_batch(adm: Admission, paths: list[Path]) -> list[Admitted]:
    staged = _claim_all(adm, paths)
    out: list[Admitted] = []
    checked: list[Staged] = []
    for one in staged:
        try:
            adm._prepare(one)
            for validation in one.validations:
                validation.feed(float("inf"))
            adm.check_validated(one)
            checked.append(one)
        except Rejected as r:
            out.append(adm.reject(one, r.kind, r.reason, **r.details))
        except Exception as e:  # boundary: one file never stops the others
            out.append(_internal(adm, one, e))
    out.extend(_queue_all(adm, _drop_duplicates(adm, checked, out)))
    return out


def _internal(adm: Admission, one: Staged, e: Exception) -> Admitted:
    return adm.reject(one, "internal", f"admission failed: {type(e).__name__}: {e}", traceback=traceback_tail(e))


def _claim_all(adm: Admission, paths: list[Path]) -> list[Staged]:
    with adm.db.session() as s:
        rows = [
            Job(
                name=display_name(p.name),
                state=ADMITTING,
                priority=adm.priority_of(p).value,
                lineage=adm.lineage_of(p),
            )
            for p in paths
        ]
        s.add_all(rows)
        s.flush()
        ids = [row.id for row in rows]
    staged: list[Staged] = []
    unclaimed: list[int] = []
    for path, job_id in zip(paths, ids, strict=True):
        # decide_attempts starts at 1: the batch decides in the same tick it claims
        intent = Intent(job_id, spool_name(job_id, path.name), str(path.parent), path.name, decide_attempts=1)
        try:
            intent.save(adm.spool.admitting)
            data = claim(path, adm.spool.admitting, intent.spool_name, sync=False)
            staged.append(adm.staged_of(intent, data, adm.priority_of(path)))
        except (NotRegularFile, FileNotFoundError):  # gone or swapped since it was listed: the scan says so
            intent.remove(adm.spool.admitting)
            unclaimed.append(job_id)
        except Exception as e:
            adm._quarantine_inbox(path, e)
    for folder in {p.parent for p in paths} | {adm.spool.admitting}:
        fsync_dir(folder)
    if unclaimed:
        with adm.db.session() as s:
            for job in s.scalars(select(Job).where(Job.id.in_(unclaimed))):
                s.delete(job)
    return staged


def _drop_duplicates(adm: Admission, checked: list[Staged], out: list[Admitted]) -> list[Staged]:
    """Files whose content is already live or done, or earlier in this batch, are rejected."""
    shas = [one.validations[0].sha256 for one in checked]
    known: dict[str, tuple[int, str]] = {}
    with adm.db.session() as s:
        q = select(Job).where(Job.sha256.in_(shas), Job.state.in_([st.value for st in LIVE_OR_DONE]))
        for job in s.scalars(q.order_by(Job.id.desc())):
            known[job.sha256] = (job.id, job.name)
    keep = []
    for one in checked:
        sha = one.validations[0].sha256
        if sha in known:
            out.append(adm.reject_duplicate(one, *known[sha]))
        else:
            known[sha] = (one.job_id, display_name(one.intent.data_name))
            keep.append(one)
    return keep


def _queue_all(adm: Admission, keep: list[Staged]) -> list[Admitted]:
    out: list[Admitted] = []
    placed: list[tuple[Staged, Path]] = []
    for one in keep:
        try:
            placed.append((one, adm.place(one, sync=False)))
        except Exception as e:
            out.append(_internal(adm, one, e))
    for folder in {q.parent for _, q in placed} | {adm.spool.admitting}:
        fsync_dir(folder)
    with adm.db.session() as s:
        rows = {job.id: job for job in s.scalars(select(Job).where(Job.id.in_([o.job_id for o, _ in placed])))}
        for one, queued in placed:
            adm.record_queued(s, one, queued, rows.get(one.job_id))
    for one, queued in placed:
        one.intent.remove(adm.spool.admitting)
        out.append(Admitted(one.job_id, JobState.QUEUED, queued))
    return out
