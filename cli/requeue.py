"""``trainbox requeue JOB...``: a trained job's file back into the inbox, to train again on top of the current
version (issue 17: after ``models rollback --before-job N``, the files that came after N retrain).

The CLI never moves spool files (the daemon is their only writer): it copies the file from ``queue/done/``
into ``inbox/`` with a JSON sidecar written first, holding the job's own settings, priority and eval file, and
``requeue_of = JOB``, which lets admission take the identical content again (``daemon/admission.requeued``);
the copy is then admitted, validated and queued like any dropped file. Both are written under a dot-name and
renamed, so intake never sees half a file.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from management.db import ModelDB
from trainbox.atomic import atomic_write_text
from trainbox.home import Home
from trainbox.states import JobState


class RequeueError(RuntimeError):
    """A job that cannot be requeued; the message says why."""


def done_file(home: Home, job_id: int) -> Path:
    """The job's data file in ``queue/done/`` (not its report or error file)."""
    for p in sorted(home.done.glob(f"{job_id:06d}__*")):
        if p.name.lower().endswith(".jsonl") and p.is_file() and not p.is_symlink():
            return p
    raise RequeueError(f"job {job_id}: no file in {home.done}")


def requeue(home: Home, db: ModelDB, job_id: int) -> Path:
    """Copy job ``job_id``'s file and settings into the inbox; returns the inbox file."""
    job = db.job(job_id)
    if job is None:
        raise RequeueError(f"no job {job_id}")
    if job.state != JobState.DONE.value:
        raise RequeueError(f"job {job_id} is {job.state}, not done: only a trained file is requeued")
    source = done_file(home, job_id)
    name = source.name.split("__", 1)[1]
    target = home.inbox / name
    sidecar = target.with_suffix(".json")
    if target.exists() or sidecar.exists() or target.with_suffix(".toml").exists():
        raise RequeueError(f"{target.name} (or its sidecar) is in the inbox already")
    overrides = dict(job.settings or {})
    overrides |= {"priority": job.priority, "requeue_of": job_id, "lineage": job.lineage}
    eval_copy = home.run_dir(job_id) / "eval.jsonl"
    if eval_copy.is_file():
        overrides["eval_file"] = str(eval_copy)
    home.inbox.mkdir(parents=True, exist_ok=True)
    atomic_write_text(sidecar, json.dumps(overrides, indent=2))  # the sidecar before its file
    tmp = home.inbox / f".{name}.requeue.tmp"
    shutil.copyfile(source, tmp)
    os.replace(tmp, target)
    return target
