"""Admission: a complete file in the inbox becomes a queued job or a rejected one, never neither.

The steps, each safe to crash after:
1. a job row is inserted (state ``admitting``) to get the job id, and an intent file names the
   unit's sources (daemon/staging.py);
2. the sidecar(s), an eval file beside them, then the data file are claimed from the inbox into
   ``queue/admitting/`` (renames that follow no symlink);
3. the file is validated line by line in slices (a time budget per daemon tick, so a file of
   millions of lines never stops the heartbeat), its settings checked, its sha256 compared;
4. it is renamed into ``queue/<priority>/`` (queued) or ``queue/failed/`` with an error file.
Any exception while admitting one file sends that file to ``queue/failed/`` (class ``internal``,
with the traceback's last frames) and the daemon goes on. ``recover`` finishes what a crash
interrupted (daemon/admission_recovery.py).
"""

from __future__ import annotations

import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from daemon.admission_settings import SettingsCheck, resolve_eval_file
from daemon.inbox_scan import placement
from daemon.spool import claim, move
from daemon.staging import Intent, eval_name_beside, sidecars_beside
from management.db import Event, Job, ModelDB
from trainbox.atomic import atomic_write_json
from trainbox.config import ConfigError, DaemonConfig, TrainingConfig, load_sidecar
from trainbox.crashpoints import crash_point
from trainbox.home import Home
from trainbox.lineage import MAIN
from trainbox.records import Limits, Validation
from trainbox.safefs import NotRegularFile, copy_regular, display_name, lstat_kind
from trainbox.spool import JOB_SUFFIX, Spool, spool_name
from trainbox.states import JobState, Priority

ADMITTING = "admitting"
LIVE = [JobState.QUEUED, JobState.RUNNING, JobState.PAUSED]
LIVE_OR_DONE = [*LIVE, JobState.DONE]
TRACEBACK_FRAMES = 6


@dataclass(frozen=True)
class Admitted:
    job_id: int
    state: JobState
    path: Path
    reason: str = ""


def requeued(db: ModelDB, requeue_of: int | None, sha256: str) -> bool:
    """A file ``trainbox requeue`` put back (its sidecar's ``requeue_of`` names a done job with the same
    content): only a waiting or training copy makes it a duplicate, not the trained one (issue 17: a file
    retrained on top of an earlier version after ``models rollback --before-job``)."""
    if requeue_of is None:
        return False
    job = db.job(requeue_of)
    return job is not None and job.sha256 == sha256 and job.state == JobState.DONE.value


class Rejected(Exception):
    """A file that cannot be a job: the reason a person reads, and the error file's class."""

    def __init__(self, kind: str, reason: str, **details: Any) -> None:
        super().__init__(reason)
        self.kind, self.reason, self.details = kind, reason, details


@dataclass
class Staged:
    """A unit being decided: its intent, where its files are now, and the validations in progress."""

    intent: Intent
    data: Path
    sidecars: list[Path]
    eval_file: Path | None = None  # the eval file claimed from the inbox (in the run folder)
    validations: list[Validation] = field(default_factory=list)
    overrides: dict[str, Any] = field(default_factory=dict)
    priority: Priority = Priority.NORMAL
    eval_source: Path | None = None  # an eval file elsewhere in the home, copied when queued
    requeue_of: int | None = None  # ``trainbox requeue``: job N's file again, not a duplicate of it
    lineage: str | None = None  # the sidecar's ``lineage`` (None: the folder's, already on the row)

    @property
    def job_id(self) -> int:
        return self.intent.job_id


def write_error(failed_file: Path, job_id: int, kind: str, reason: str, **details: Any) -> Path:
    """``<name>.error.json`` beside a failed job's file: what went wrong, readable by a person."""
    path = failed_file.with_name(failed_file.name + ".error.json")
    atomic_write_json(
        path,
        {"job_id": job_id, "file": failed_file.name, "class": kind, "reason": reason, "time": time.time(), **details},
    )
    return path


def traceback_tail(exc: BaseException) -> list[str]:
    frames = traceback.format_exception(type(exc), exc, exc.__traceback__)
    return [line.rstrip() for line in frames[-TRACEBACK_FRAMES:]]


class Admission:
    def __init__(
        self,
        home: Home,
        spool: Spool,
        db: ModelDB,
        config: DaemonConfig,
        training: TrainingConfig | None = None,
        gpus: int = 0,
    ) -> None:
        self.home, self.spool, self.db, self.config = home, spool, db, config
        self.limits = Limits(max_line_bytes=config.max_line_bytes, max_depth=config.max_json_depth)
        self.settings_check = SettingsCheck(training or TrainingConfig(), gpus=gpus)
        self.clock: Callable[[], float] = time.monotonic
        self.handled: list[Path] = []
        self.current: Staged | None = None
        self.backlog: list[Staged] = []  # staged files a restart found, decided before new ones
        self.set_aside: set[Path] = set()  # inbox paths that could not even be quarantined

    def priority_of(self, path: Path) -> Priority:
        """A file in ``inbox/high/`` or ``inbox/<lineage>/high/`` (any case) asks for that priority; one
        elsewhere the default (a sidecar's ``priority`` wins later)."""
        where = placement(self.home.inbox, path)
        return where.priority if where is not None and where.priority is not None else self.config.default_priority

    def lineage_of(self, path: Path) -> str:
        """A file in ``inbox/<lineage>/`` belongs to that lineage; one elsewhere to ``main`` (a sidecar's
        ``lineage`` wins later)."""
        where = placement(self.home.inbox, path)
        return where.lineage if where is not None and where.lineage is not None else MAIN

    # the daemon's entry: admit ready files within a time budget
    def work(self, ready: list[Path], budget_s: float, clock: Callable[[], float] = time.monotonic) -> list[Admitted]:
        """Advance the file being validated, then start on ready files, until ``budget_s`` is spent.
        Small lone files go in batches (daemon/admission_batch.py), others one at a time. Returns what
        was decided; ``self.handled`` lists the ready paths taken (the rest stay ready)."""
        from daemon.admission_batch import BATCH_SIZE, admit_batch, batchable

        self.clock = clock
        deadline = clock() + budget_s
        out: list[Admitted] = []
        self.handled = []
        if not self._advance_current(out, deadline):
            return out
        batch: list[Path] = []
        for path in ready:
            if clock() >= deadline:
                break
            self.handled.append(path)
            if path in self.set_aside or not self.in_inbox(path) or not os.path.lexists(path):
                continue
            if batchable(path):
                batch.append(path)
                if len(batch) >= BATCH_SIZE:
                    out.extend(admit_batch(self, batch))
                    batch = []
                continue
            out.extend(admit_batch(self, batch) if batch else [])
            batch = []
            begun = self._guard_begin(path)
            if isinstance(begun, Admitted):
                out.append(begun)
            elif begun is not None:
                self.current = begun
                if not self._advance_current(out, deadline):
                    break
        out.extend(admit_batch(self, batch) if batch else [])
        return out

    def _advance_current(self, out: list[Admitted], deadline: float) -> bool:
        """Decide the file in progress and the backlog; False when time ran out first."""
        while self.current is not None or self.backlog:
            if self.current is None:
                self.current = self.backlog.pop(0)
            decided = self._guard_advance(self.current, max(0.0, deadline - self.clock()))
            if decided is None:
                return False
            self.current = None
            out.append(decided)
        return True

    def in_inbox(self, path: Path) -> bool:
        """Directly in the inbox or in one of its real priority or lineage folders: an event from
        anywhere else (a watch that strayed through a symlinked folder) is never admitted."""
        if placement(self.home.inbox, path) is None:
            return False
        folder = path.parent
        while folder != self.home.inbox:
            if os.path.islink(folder):
                return False
            folder = folder.parent
        return True

    @property
    def busy(self) -> bool:
        """Whether admission work is left over from the last tick (the loop then does not sleep)."""
        return self.current is not None or bool(self.backlog)

    def recover(self) -> list[Admitted]:
        from daemon.admission_recovery import recover  # recovery builds on this module

        return recover(self)

    def admit(self, path: Path) -> Admitted:
        """Admit one file to the end, with no time budget (uploads, tests)."""
        begun = self._guard_begin(path)
        if begun is None:
            raise NotRegularFile(f"{display_name(path.name)}: not a regular file; left where it is")
        if isinstance(begun, Admitted):
            return begun
        decided = None
        while decided is None:
            decided = self._guard_advance(begun, 3600.0)
        return decided

    # step 1-2: claim the unit
    def _guard_begin(self, path: Path) -> Staged | Admitted | None:
        try:
            return self.begin(path)
        except (NotRegularFile, FileNotFoundError):
            return None  # gone, or swapped for a symlink since the scan (which reports it)
        except Exception as e:  # boundary: one file never stops the daemon
            return self._quarantine_inbox(path, e)

    def begin(self, path: Path) -> Staged | Admitted:
        """Steps 1-2; once the intent exists, anything odd rejects the unit instead of raising."""
        if (kind := lstat_kind(path)) is not None:
            raise NotRegularFile(kind)
        sidecars = sidecars_beside(path)
        eval_name = self._eval_beside(path, sidecars)
        with self.db.session() as s:
            job = Job(
                name=display_name(path.name),
                state=ADMITTING,
                priority=self.priority_of(path).value,
                lineage=self.lineage_of(path),
            )
            s.add(job)
            s.flush()
            job_id = job.id
        name = spool_name(job_id, path.name)
        intent = Intent(job_id, name, str(path.parent), path.name, [p.name for p in sidecars], eval_name)
        intent.save(self.spool.admitting)
        return self.claim_unit(intent, self.priority_of(path))

    def _eval_beside(self, data: Path, sidecars: list[Path]) -> str | None:
        """The name of an eval file that the (single, readable) sidecar names in the same folder."""
        chosen = eval_name_beside(sidecars[0]) if len(sidecars) == 1 else None
        return chosen if chosen and chosen != data.name and os.path.lexists(data.parent / chosen) else None

    def claim_unit(self, intent: Intent, priority: Priority | None = None) -> Staged | Admitted:
        """Claim every source of the unit still in the inbox (sidecars first), idempotently. A
        source that is not a regular file is left where it is and the unit is rejected."""
        admitting, source = self.spool.admitting, intent.source
        stem = Path(intent.spool_name).stem
        refused: list[str] = []
        for name in intent.sidecar_names[len(intent.staged_sidecars) :]:
            staged_name = ""
            try:
                if os.path.lexists(source / name):
                    staged_name = claim(source / name, admitting, stem + Path(name).suffix.lower()).name
            except NotRegularFile as e:
                refused.append(f"its sidecar {display_name(name)} is {e}")
            intent.staged_sidecars.append(staged_name)
            intent.save(admitting)
            crash_point("admission.between_renames")  # the sidecar claimed, the data file not yet
        if intent.eval_name and not intent.eval_claimed:
            try:
                if os.path.lexists(source / intent.eval_name):
                    claim(source / intent.eval_name, self.home.run_dir(intent.job_id), "eval.jsonl")
            except NotRegularFile as e:
                refused.append(f"its eval file {display_name(intent.eval_name)} is {e}")
            intent.eval_claimed = True
            intent.save(admitting)
        data = admitting / intent.spool_name
        try:
            if not os.path.lexists(data):
                data = claim(source / intent.data_name, admitting, intent.spool_name)
        except (NotRegularFile, FileNotFoundError) as e:
            refused.append(f"the data file is {e}" if isinstance(e, NotRegularFile) else "the data file is gone")
        staged = self.staged_of(intent, data, priority)
        if refused:
            return self.reject(staged, "bad_input", "; ".join(refused) + " (never opened or moved)")
        return staged

    def staged_of(self, intent: Intent, data: Path, priority: Priority | None = None) -> Staged:
        sidecars = [self.spool.admitting / n for n in intent.staged_sidecars if n]
        eval_copy = self.home.run_dir(intent.job_id) / "eval.jsonl"
        claimed_eval = eval_copy if intent.eval_claimed and eval_copy.exists() else None
        if priority is None:
            job = self.db.job(intent.job_id)
            priority = Priority(job.priority) if job is not None else self.config.default_priority
        return Staged(intent, data, sidecars, eval_file=claimed_eval, priority=priority)

    # step 3-4: decide
    def _guard_advance(self, staged: Staged, budget_s: float) -> Admitted | None:
        try:
            return self.advance(staged, budget_s)
        except Rejected as r:
            return self.reject(staged, r.kind, r.reason, **r.details)
        except Exception as e:  # boundary: one file never stops the daemon
            return self.reject(
                staged, "internal", f"admission failed: {type(e).__name__}: {e}", traceback=traceback_tail(e)
            )

    def advance(self, staged: Staged, budget_s: float) -> Admitted | None:
        if not staged.validations:
            staged.intent.decide_attempts += 1  # counted before deciding: recovery's crash-loop guard
            staged.intent.save(self.spool.admitting)
            self._prepare(staged)
        for validation in staged.validations:
            if not validation.done and not validation.feed(budget_s, self.clock):
                return None
        return self._conclude(staged)

    def _prepare(self, staged: Staged) -> None:
        """Everything decided before the lines are read: name, size, sidecar, eval file, settings."""
        label = display_name(staged.intent.data_name)
        if not staged.data.name.lower().endswith(JOB_SUFFIX):
            raise Rejected("bad_input", f"not a {JOB_SUFFIX} file: {label}")
        if len(staged.sidecars) > 1:
            names = ", ".join(display_name(n) for n in staged.intent.sidecar_names)
            raise Rejected("bad_input", f"two sidecars for one file ({names}): keep one")
        if len(staged.intent.sidecar_names) == 1 and not staged.sidecars:
            raise Rejected("bad_input", "its sidecar disappeared while the job was admitted")
        data = Validation(staged.data, self.limits)
        size = os.fstat(data.fileno()).st_size
        if size > self.config.max_file_bytes:
            data.close()
            raise Rejected("bad_input", f"{size} bytes, above daemon.max_file_bytes ({self.config.max_file_bytes})")
        staged.validations = [data]
        if staged.sidecars:
            self._read_sidecar(staged)
        if staged.eval_file is not None or staged.eval_source is not None:
            staged.validations.append(self._eval_validation(staged))

    def _read_sidecar(self, staged: Staged) -> None:
        try:
            parsed = load_sidecar(staged.sidecars[0])
        except ConfigError as e:
            raise Rejected("bad_input", f"sidecar: {e}") from e
        overrides = parsed.model_dump(mode="json", exclude_unset=True)
        staged.priority = Priority(overrides.pop("priority", None) or staged.priority.value)
        staged.lineage = overrides.pop("lineage", None)
        chosen = overrides.pop("eval_file", None)
        staged.requeue_of = overrides.pop("requeue_of", None)
        problems = self.settings_check.problems(overrides)
        if problems:
            raise Rejected("bad_input", "sidecar: " + "; ".join(problems))
        staged.overrides = overrides
        if chosen and staged.eval_file is None:
            staged.eval_source = resolve_eval_file(chosen, staged.intent.source, self.home, self.config)

    def _eval_validation(self, staged: Staged) -> Validation:
        path = staged.eval_file or staged.eval_source
        assert path is not None
        try:
            validation = Validation(path, self.limits)
        except NotRegularFile as e:
            raise Rejected("bad_input", f"eval_file {display_name(path.name)}: {e}") from e
        if os.fstat(validation.fileno()).st_size > self.config.max_file_bytes:
            validation.close()
            raise Rejected("bad_input", f"eval_file {display_name(path.name)}: above daemon.max_file_bytes")
        return validation

    def check_validated(self, staged: Staged) -> None:
        """The validations' verdicts (all read by now): ``Rejected`` naming the bad lines."""
        report = staged.validations[0].report
        if not report.ok:
            raise Rejected("bad_input", report.summary(), validation=report.to_json())
        if len(staged.validations) > 1 and not (ev := staged.validations[1].report).ok:
            name = display_name((staged.eval_file or staged.eval_source or staged.data).name)
            raise Rejected("bad_input", f"eval_file {name}: {ev.summary()}")

    def reject_duplicate(self, staged: Staged, duplicate_id: int, duplicate_name: str) -> Admitted:
        with self.db.session() as s:
            row = s.get(Job, staged.job_id)
            assert row is not None
            row.duplicate_of, row.sha256 = duplicate_id, staged.validations[0].sha256
        return self.reject(staged, "duplicate", f"duplicate of job {duplicate_id} ({duplicate_name})")

    def _conclude(self, staged: Staged) -> Admitted:
        self.check_validated(staged)
        sha = staged.validations[0].sha256
        duplicate = self.db.job_with_sha(sha, LIVE if requeued(self.db, staged.requeue_of, sha) else LIVE_OR_DONE)
        if duplicate is not None and duplicate.id != staged.job_id:
            return self.reject_duplicate(staged, duplicate.id, duplicate.name)
        queued = self.place(staged)
        with self.db.session() as s:
            self.record_queued(s, staged, queued)
        staged.intent.remove(self.spool.admitting)
        return Admitted(staged.job_id, JobState.QUEUED, queued)

    def place(self, staged: Staged, sync: bool = True) -> Path:
        """Step 4's renames: eval copy and sidecar into the run folder, the file into its queue."""
        run_dir = self.home.run_dir(staged.job_id)
        if staged.eval_source is not None and not copy_regular(
            staged.eval_source, run_dir / "eval.jsonl", self.config.max_file_bytes
        ):
            raise Rejected("bad_input", "eval_file: above daemon.max_file_bytes")
        if staged.sidecars:
            move(staged.sidecars[0], run_dir, "sidecar" + staged.sidecars[0].suffix)
        return move(staged.data, self.home.waiting(staged.priority), sync=sync)

    def record_queued(self, s: Session, staged: Staged, queued: Path, row: Job | None = None) -> None:
        report, digest = staged.validations[0].report, staged.validations[0].sha256
        row = row or s.get(Job, staged.job_id)
        assert row is not None
        row.state = JobState.QUEUED.value
        row.spool_name = queued.name
        row.priority = staged.priority.value
        if staged.lineage is not None:  # the sidecar's; else the folder's, set when the row was made
            row.lineage = staged.lineage
        row.sha256 = digest
        row.n_records = report.n_records
        row.data_format = report.data_format
        row.settings = staged.overrides
        row.admitted_at = time.time()
        message = f"{row.name}: {report.summary()}, priority {staged.priority.value}"
        if row.lineage != MAIN:
            message += f", lineage {row.lineage}"
        s.add(Event(kind="admitted", message=message, job_id=staged.job_id, data={}))

    def reject(self, staged: Staged, kind: str, reason: str, **details: Any) -> Admitted:
        """File the unit in ``queue/failed/``: the data file, its sidecars and a claimed eval file."""
        for validation in staged.validations:
            validation.close()
        if os.path.lexists(staged.data):
            failed = move(staged.data, self.home.failed)
        else:  # the data file never arrived: the error file still says what happened to the unit
            failed = self.home.failed / staged.intent.spool_name
        for sidecar in staged.sidecars:
            if os.path.lexists(sidecar):
                move(sidecar, self.home.failed, failed.stem + sidecar.suffix)
        if staged.eval_file is not None and staged.eval_file.exists():
            move(staged.eval_file, self.home.failed, failed.name + ".eval")
        write_error(failed, staged.job_id, kind, reason, **details)
        with self.db.session() as s:
            row = s.get(Job, staged.job_id)
            if row is None:
                row = Job(id=staged.job_id, name=failed.name.partition("__")[2])
                s.add(row)
            row.state = JobState.REJECTED.value
            row.spool_name = failed.name
            row.error = reason
            row.failure_class = kind
            row.finished_at = time.time()
            s.add(Event(kind="rejected", message=f"{failed.name}: {reason}", job_id=staged.job_id, data={}))
        staged.intent.remove(self.spool.admitting)
        return Admitted(staged.job_id, JobState.REJECTED, failed, reason)

    def _quarantine_inbox(self, path: Path, exc: Exception) -> Admitted | None:
        """An exception while claiming: the unit goes to failed/ if its intent was written (its
        sources claimed as far as they can be); otherwise the path is remembered and reported once,
        so it is not tried again every tick."""
        reason = f"admission failed: {type(exc).__name__}: {exc}"
        intent = next((i for i in Intent.all(self.spool.admitting) if i.source / i.data_name == path), None)
        if intent is not None:
            try:
                data = self.spool.admitting / intent.spool_name
                if not os.path.lexists(data) and lstat_kind(path) is None and os.path.lexists(path):
                    data = claim(path, self.spool.admitting, intent.spool_name)
                return self.reject(self.staged_of(intent, data), "internal", reason, traceback=traceback_tail(exc))
            except Exception:
                pass
        self.set_aside.add(path)
        self.db.event(
            "admission_error",
            f"{display_name(path.name)}: {reason}; left in the inbox, not retried until restart",
            traceback=traceback_tail(exc),
        )
        return None
