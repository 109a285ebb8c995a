"""Admission: a complete file in the inbox becomes a queued job or a rejected one, never neither.

The steps, each safe to crash after:
1. a job row is inserted (state ``admitting``) to get the job id;
2. the file (and its sidecar) is renamed from the inbox into ``queue/admitting/<id>__<name>``;
3. it is validated line by line, its sidecar parsed, its sha256 compared with live and done jobs;
4. it is renamed into ``queue/<priority>/`` (queued) or ``queue/failed/`` with an error file.
``recover`` finishes what a crash interrupted: a row whose file never left the inbox is dropped
(the file is admitted again), a file left in ``queue/admitting/`` resumes at step 3.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.spool import JOB_SUFFIX, SIDECAR_SUFFIXES, Spool, job_id_of, move, sidecar_for, spool_name
from management.db import Job, ModelDB
from trainbox.atomic import atomic_write_json
from trainbox.config import ConfigError, DaemonConfig, load_sidecar
from trainbox.home import Home
from trainbox.records import validate_file
from trainbox.states import JobState, Priority

ADMITTING = "admitting"
LIVE_OR_DONE = [JobState.QUEUED, JobState.RUNNING, JobState.PAUSED, JobState.DONE]


@dataclass(frozen=True)
class Admitted:
    job_id: int
    state: JobState
    path: Path
    reason: str = ""


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_error(failed_file: Path, job_id: int, kind: str, reason: str, **details: Any) -> Path:
    """``<name>.error.json`` beside a failed job's file: what went wrong, readable by a person."""
    path = failed_file.with_name(failed_file.name + ".error.json")
    atomic_write_json(
        path,
        {"job_id": job_id, "file": failed_file.name, "class": kind, "reason": reason, "time": time.time(), **details},
    )
    return path


class Admission:
    def __init__(self, home: Home, spool: Spool, db: ModelDB, config: DaemonConfig) -> None:
        self.home, self.spool, self.db, self.config = home, spool, db, config

    def priority_of(self, path: Path) -> Priority:
        """A file in ``inbox/high/`` (etc.) asks for that priority; one in ``inbox/`` the default."""
        if path.parent != self.home.inbox:
            try:
                return Priority(path.parent.name)
            except ValueError:
                pass
        return self.config.default_priority

    def admit(self, path: Path) -> Admitted:
        """Take one complete inbox file through admission (steps 1-4)."""
        sidecar = sidecar_for(path) if path.suffix == JOB_SUFFIX else None
        with self.db.session() as s:
            job = Job(name=path.name, state=ADMITTING, priority=self.priority_of(path).value)
            s.add(job)
            s.flush()
            job_id = job.id
        name = spool_name(job_id, path.name)
        staged = move(path, self.spool.admitting, name)
        if sidecar is not None:
            move(sidecar, self.spool.admitting, Path(name).stem + sidecar.suffix)
        return self._decide(job_id, staged, sidecar_dir=sidecar.parent if sidecar else path.parent)

    def _decide(self, job_id: int, staged: Path, sidecar_dir: Path) -> Admitted:
        job = self.db.job(job_id)
        assert job is not None
        sidecar = next((p for p in (staged.with_suffix(s) for s in SIDECAR_SUFFIXES) if p.exists()), None)
        if staged.suffix != JOB_SUFFIX:
            return self._reject(job_id, staged, sidecar, "bad_input", f"not a {JOB_SUFFIX} file: {job.name}")
        size = staged.stat().st_size
        if size > self.config.max_file_bytes:
            return self._reject(job_id, staged, sidecar, "bad_input", f"{size} bytes, above daemon.max_file_bytes")
        overrides: dict[str, Any] = {}
        priority = Priority(job.priority)
        eval_source: Path | None = None
        if sidecar is not None:
            try:
                parsed = load_sidecar(sidecar)
            except ConfigError as e:
                return self._reject(job_id, staged, sidecar, "bad_input", f"sidecar: {e}")
            overrides = parsed.model_dump(mode="json", exclude_unset=True)
            priority = Priority(overrides.pop("priority", None) or priority.value)
            if "eval_file" in overrides:
                eval_source = Path(overrides.pop("eval_file")).expanduser()
                if not eval_source.is_absolute():
                    eval_source = sidecar_dir / eval_source
        report = validate_file(staged)
        if not report.ok:
            return self._reject(job_id, staged, sidecar, "bad_input", report.summary(), validation=report.to_json())
        run_dir = self.home.run_dir(job_id)
        if eval_source is not None:
            if not eval_source.is_file():
                return self._reject(job_id, staged, sidecar, "bad_input", f"eval_file not found: {eval_source}")
            eval_report = validate_file(eval_source)
            if not eval_report.ok:
                return self._reject(
                    job_id, staged, sidecar, "bad_input", f"eval_file {eval_source.name}: {eval_report.summary()}"
                )
            run_dir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(eval_source, run_dir / "eval.jsonl")
        digest = sha256_of(staged)
        duplicate = self.db.job_with_sha(digest, LIVE_OR_DONE)
        if duplicate is not None and duplicate.id != job_id:
            with self.db.session() as s:
                row = s.get(Job, job_id)
                assert row is not None
                row.duplicate_of = duplicate.id
                row.sha256 = digest
            return self._reject(
                job_id, staged, sidecar, "duplicate", f"duplicate of job {duplicate.id} ({duplicate.name})"
            )
        if sidecar is not None:
            run_dir.mkdir(parents=True, exist_ok=True)
            move(sidecar, run_dir, "sidecar" + sidecar.suffix)
        queued = move(staged, self.home.waiting(priority))
        with self.db.session() as s:
            row = s.get(Job, job_id)
            assert row is not None
            row.state = JobState.QUEUED.value
            row.spool_name = queued.name
            row.priority = priority.value
            row.sha256 = digest
            row.n_records = report.n_records
            row.data_format = report.data_format
            row.settings = overrides
            row.admitted_at = time.time()
        self.db.event("admitted", f"{job.name}: {report.summary()}, priority {priority.value}", job_id)
        return Admitted(job_id, JobState.QUEUED, queued)

    def _reject(
        self, job_id: int, staged: Path, sidecar: Path | None, kind: str, reason: str, **details: Any
    ) -> Admitted:
        failed = move(staged, self.home.failed)
        if sidecar is not None:
            move(sidecar, self.home.failed, failed.stem + sidecar.suffix)
        write_error(failed, job_id, kind, reason, **details)
        with self.db.session() as s:
            row = s.get(Job, job_id)
            assert row is not None
            row.state = JobState.REJECTED.value
            row.spool_name = failed.name
            row.error = reason
            row.finished_at = time.time()
        self.db.event("rejected", f"{failed.name}: {reason}", job_id)
        return Admitted(job_id, JobState.REJECTED, failed, reason)

    def _record_placed(self, job_id: int, path: Path) -> None:
        """Bring the row of a job whose file reached its queue folder up to date with the folder."""
        state = JobState.REJECTED if path.parent == self.home.failed else JobState.QUEUED
        report = validate_file(path) if state == JobState.QUEUED else None
        with self.db.session() as s:
            row = s.get(Job, job_id)
            assert row is not None
            row.state = state.value
            row.spool_name = path.name
            if path.parent != self.home.failed:
                row.priority = path.parent.name
            row.sha256 = sha256_of(path)
            if report is not None:
                row.n_records = report.n_records
                row.data_format = report.data_format
            kept = sidecar_for(self.home.run_dir(job_id) / "sidecar.jsonl")
            if kept is not None:  # the sidecar was filed with the run before the crash
                overrides = load_sidecar(kept).model_dump(mode="json", exclude_unset=True)
                overrides.pop("priority", None)
                overrides.pop("eval_file", None)
                row.settings = overrides
        self.db.event("admission_recovered", f"{path.name}: found in {path.parent.name}/", job_id)

    def recover(self) -> list[Admitted]:
        """Finish admissions a crash interrupted (see the module docstring)."""
        done = []
        staged_ids = {}
        for f in sorted(self.spool.admitting.iterdir()):
            jid = job_id_of(f.name)
            if jid is not None and f.suffix not in SIDECAR_SUFFIXES:
                staged_ids[jid] = f
        for job in self.db.jobs():
            if job.state != ADMITTING or job.id in staged_ids:
                continue
            placed = self.spool.find_job(job.id)
            if placed is not None:  # moved on before the crash, but the row was not updated
                self._record_placed(job.id, placed)
                continue
            with self.db.session() as s:  # its file never left the inbox: admit it afresh
                row = s.get(Job, job.id)
                if row is not None:
                    s.delete(row)
        for jid, f in staged_ids.items():
            if self.db.job(jid) is None:  # a row lost with the DB: make one so the file is accounted for
                with self.db.session() as s:
                    s.add(Job(id=jid, name=f.name.partition("__")[2], state=ADMITTING))
            done.append(self._decide(jid, f, sidecar_dir=self.home.inbox))
        return done
