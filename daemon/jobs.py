"""What the daemon does when a job starts and when its worker exits.

Kept apart from the main loop so the loop reads as wait, controls, admit, reap, dispatch.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from daemon import reports
from daemon.admission import write_error
from daemon.gate import GATE_PENDING, GateRequest, request_gate
from daemon.outcome import Decision, JobVerdict, decide
from daemon.spool import move
from daemon.standby import WarmWorker
from daemon.worker_process import WORKER_LOG, WorkerCommand, WorkerProcess, job_launch, log_tail
from management import registration
from management.db import Job, ModelDB, Run
from management.memory import replay_sources
from management.versions import starting_version
from trainbox import oom_counter
from trainbox.atomic import fsync_dir
from trainbox.config import Settings, job_training_config
from trainbox.control import Action
from trainbox.crashpoints import crash_point
from trainbox.home import Home
from trainbox.jobspec import JOB_SPEC, RESULT, JobSpec, MemorySpec, WorkerResult
from trainbox.markers import kills_of
from trainbox.processes import describe_exit, exit_parts, last_start_lines
from trainbox.spool import Spool, job_id_of
from trainbox.states import JobState, Priority
from trainbox.status import TRAINING_STATUS, TrainingStatus, read_status

WORKING_PHASES = ("loading", "training", "evaluating", "checkpointing")  # a worker's phases before its end
VERDICT_STATE = {
    JobVerdict.DONE: JobState.DONE,
    JobVerdict.PAUSED: JobState.PAUSED,
    JobVerdict.DISK_FULL: JobState.PAUSED,
    JobVerdict.RETRY: JobState.QUEUED,
    JobVerdict.FAILED: JobState.FAILED,
    JobVerdict.CANCELLED: JobState.CANCELLED,
    JobVerdict.LOCKED: JobState.PAUSED,  # in processing/, resumed once the worker holding its folder is gone
}


def latest_checkpoint(run_dir: Path) -> str | None:
    """The newest complete checkpoint folder of a run (what a cancelled job keeps), without torch."""
    done = sorted(p.parent for p in (run_dir / "checkpoints").glob("step-*/COMPLETE"))
    return str(done[-1]) if done else None


class JobRunner:
    def __init__(
        self,
        home: Home,
        spool: Spool,
        db: ModelDB,
        settings: Settings,
        worker_command: WorkerCommand | None = None,
        warm: WarmWorker | None = None,
    ) -> None:
        self.home, self.spool, self.db, self.settings = home, spool, db, settings
        self.worker_command = worker_command  # None: the real worker; tests pass a stub (WorkerProcess.spawn)
        self.warm = warm  # the standby a single-process job is handed to (daemon/standby.py); None: cold starts
        self.reports: reports.Reports | None = None  # the daemon's report children (set by Daemon.start)

    def start(self, processing_file: Path, lease_generation: int | None = None) -> WorkerProcess:
        """Spawn a worker for a job in ``queue/processing/``; a job that ran before resumes. The run row
        is committed before the process exists and its pid filled in after, so a daemon killed at any
        moment leaves a row its successor looks for a live worker of (``daemon/startup_runs.py``); the
        worker itself refuses a run folder another worker holds (``trainbox/run_lock.py``).
        ``lease_generation``: a fleet's claim of the job, recorded on the run."""
        job_id = job_id_of(processing_file.name)
        assert job_id is not None
        job = self.db.job(job_id)
        if job is None:  # its row was lost: the file is the truth, so make a row to record the run
            with self.db.session() as s:
                s.add(Job(id=job_id, name=processing_file.name.partition("__")[2], state="running"))
            job = self.db.job(job_id)
            assert job is not None
        run_dir = self.home.run_dir(job_id)
        run_dir.mkdir(parents=True, exist_ok=True)
        self._rebase_if_stale(job, run_dir)  # then no job.json: the spec is made anew from current
        try:
            spec = JobSpec.load(run_dir)
            spec.data_file = str(processing_file)
        except FileNotFoundError:
            spec = self._new_spec(job, processing_file, run_dir)
        spec.save()
        (run_dir / RESULT).unlink(missing_ok=True)  # a stale result must never speak for this run
        warm = self.warm if self.warm is not None and job_launch(run_dir).single else None
        attempt = len(self.db.runs(job_id)) + 1
        run_id = self._record_spawn(job_id, attempt, spec.init_model, warm.pid if warm else None, lease_generation)
        crash_point("spawn.before_popen")
        worker = (warm.take(job_id, run_dir) if warm else None) or self._spawn(job_id, run_dir, run_id)
        crash_point("spawn.after_popen")
        with self.db.session() as s:
            run = s.get(Run, run_id)
            assert run is not None
            run.pid = worker.pid
        verb = "resumed" if attempt > 1 else "started"
        self.db.event("job_" + verb, f"{job.name}: worker pid {worker.pid}, attempt {attempt}", job_id)
        return worker

    def _record_spawn(
        self, job_id: int, attempt: int, init_model: str, pid: int | None = None, lease_generation: int | None = None
    ) -> int:
        """The run row committed before the worker can act (pid NULL, or the warm worker's that is handed
        the job next): a daemon killed from here on leaves an open run that its successor looks for a live
        worker of (``daemon/startup_runs.py``), instead of a worker nobody knows about."""
        with self.db.session() as s:
            row = s.get(Job, job_id)
            assert row is not None
            row.state = JobState.RUNNING.value
            row.started_at = row.started_at or time.time()
            run = Run(
                job_id=job_id,
                attempt=attempt,
                pid=pid,
                init_model=init_model,
                host=self.settings.fleet.host,
                lease_generation=lease_generation,
                oom_count_at_start=oom_counter.oom_kill_count(),  # the worker runs in the daemon's cgroup
            )
            s.add(run)
            s.flush()
            return run.id

    def _spawn(self, job_id: int, run_dir: Path, run_id: int) -> WorkerProcess:
        """The worker for a recorded run; a spawn that fails closes the run, saying why, so no open row
        is left for a worker that never existed."""
        try:
            return WorkerProcess.spawn(job_id, run_dir, self.worker_command)
        except OSError as e:
            with self.db.session() as s:
                run = s.get(Run, run_id)
                if run is not None:
                    run.ended_at, run.outcome, run.exit_status = time.time(), "not_started", f"could not start: {e}"
            raise

    def _rebase_if_stale(self, job: Job, run_dir: Path) -> None:
        """One chain of versions: a job resuming from a version that is no longer ``models/current`` (it
        was retried, or paused, while another job's version was promoted) would end as a branch off an
        old version. Its training so far is discarded and it starts again from current, with an event.
        A job that named its own ``model`` keeps it (its version is gated as another branch)."""
        if not (run_dir / JOB_SPEC).exists():
            return
        if job_training_config(self.settings.training, job.settings or {}).model:
            return
        start = starting_version(self.home, self.db, job.lineage)
        if start is None or start.id == job.init_version:
            return  # nothing current to move to (never throw training away for the embedded model)
        self._discard_checkpoints(job.id, run_dir)
        (run_dir / JOB_SPEC).unlink()
        old = f"version {job.init_version}" if job.init_version is not None else "the base model"
        self.db.event(
            "job_rebased",
            f"{job.name}: started from {old}, but version {start.id} is current now: trained again from it",
            job.id,
            from_version=job.init_version,
            to_version=start.id,
        )

    def _discard_checkpoints(self, job_id: int, run_dir: Path) -> None:
        """The run's checkpoints go through ``trash/`` (a crash leaves them whole in one place or the
        other, and retention empties the trash), and their rows are marked deleted."""
        checkpoints = run_dir / "checkpoints"
        if checkpoints.is_dir():
            trash = self.home.trash
            trash.mkdir(parents=True, exist_ok=True)
            dest = trash / f"{time.time_ns()}-job-{job_id:06d}-rebased-checkpoints"
            os.rename(checkpoints, dest)
            fsync_dir(run_dir)
            shutil.rmtree(dest, ignore_errors=True)
        self.db.mark_checkpoints_deleted(job_id, time.time())

    def _new_spec(self, job: Job, data_file: Path, run_dir: Path) -> JobSpec:
        """First start: fix the settings and the starting model (continual training) for good."""
        training = job_training_config(self.settings.training, job.settings or {})
        init_model, init_version = training.model, None
        if not init_model:
            start = starting_version(self.home, self.db, job.lineage)  # its lineage's current version
            if start is not None:
                init_model, init_version = start.path, start.id
        with self.db.session() as s:
            row = s.get(Job, job.id)
            assert row is not None
            row.init_model = init_model
            row.init_version = init_version
        eval_copy = run_dir / "eval.jsonl"
        return JobSpec(
            job_id=job.id,
            job_name=job.name,
            data_file=str(data_file),
            eval_file=str(eval_copy) if eval_copy.exists() else None,
            init_model=init_model,
            embedded_model_dir=str(self.home.embedded_model),
            run_dir=str(run_dir),
            status_file=str(self.home.status / TRAINING_STATUS),
            db_url=self.settings.db.url_for(self.home.db_url),
            training=training,
            memory=self._memory_spec(init_version),
        )

    def _memory_spec(self, init_version: int | None) -> MemorySpec:
        """Where the job keeps its memory, its caps, and the earlier jobs' samples it may replay: those of
        the lineage of the version it starts from (issue 17, ``management/memory.py``)."""
        m = self.settings.models
        return MemorySpec(
            dir=str(self.home.memory),
            eval_examples=m.memory_eval_examples,
            train_examples=m.memory_train_examples,
            job_bytes=int(m.memory_job_mb * 1e6),
            total_bytes=int(m.memory_total_mb * 1e6),
            replay=replay_sources(self.db, init_version),
        )

    def worker_phase(self, worker: WorkerProcess) -> str:
        """The working phase this worker's status file last showed; "" if none (not written yet, another
        process's, or already finished)."""
        status = read_status(self.home.status / TRAINING_STATUS, TrainingStatus)
        if status is None or status.pid != worker.pid or status.phase not in WORKING_PHASES:
            return ""
        return status.phase

    def finish(
        self, worker: WorkerProcess, returncode: int, stop_was_requested: bool, cancelled_in: str = ""
    ) -> Decision:
        """Decide the job's fate from the worker's result file and exit status, and move its file.
        ``cancelled_in``: the phase the worker was in when a control request cancelled its job."""
        job_id = worker.job_id
        job = self.db.job(job_id)
        result = WorkerResult.load(worker.run_dir)
        exit_status = describe_exit(returncode)
        runs = self.db.runs(job_id)
        oom_kills = oom_counter.kills_since(runs[-1].oom_count_at_start if runs else None)
        final_exists = result is not None and result.final_model is not None and Path(result.final_model).is_dir()
        decision = decide(
            result,
            returncode,
            stop_was_requested,
            final_exists,
            attempts=job.attempts if job else 0,
            max_retries=self.settings.daemon.max_retries,
            kills=kills_of(worker.run_dir, worker.pid),  # a hang counts as an attempt, like a crash
            cancelled_in=cancelled_in,
            phase=self.worker_phase(worker),
            log_lines=last_start_lines(worker.run_dir / WORKER_LOG),
            host_oom_kills=oom_kills,
        )
        processing_file = self.spool.find_job(job_id, [self.home.processing])
        state = VERDICT_STATE[decision.verdict]
        # the run's end first: once the file shows up in done/ or failed/, its rows are already final
        with self.db.session() as s:
            run = s.query(Run).filter(Run.job_id == job_id).order_by(Run.id.desc()).first()
            if run is not None:
                run.ended_at = time.time()
                run.exit_status = exit_status
                run.exit_code, run.exit_signal = exit_parts(returncode)
                run.outcome = result.outcome.value if result else "crashed"
                if decision.verdict in (JobVerdict.CANCELLED, JobVerdict.LOCKED):  # a result there is not its
                    run.outcome = decision.verdict.value
                run.end_step = result.step if result else None
                run.oom_kills = oom_kills
        message = decision.reason
        retry_at = None
        if decision.verdict == JobVerdict.DONE and result is not None:
            version, filed = self.complete(job_id, result)
            message = f"done: model version {version}, val loss {result.val_loss}"
            if not filed:
                state = JobState.RUNNING  # until its gate has decided (Gates files it in done/)
        elif decision.verdict == JobVerdict.RETRY:
            attempts = (job.attempts if job else 0) + 1
            retry_at = time.time() + self.settings.daemon.retry_backoff * 2 ** (attempts - 1)
            if processing_file is not None:
                move(processing_file, self.home.waiting(Priority(job.priority if job else "normal")))
        elif decision.verdict in (JobVerdict.FAILED, JobVerdict.CANCELLED) and processing_file is not None:
            evidence = dict(decision.evidence)
            if decision.verdict == JobVerdict.CANCELLED:
                evidence["checkpoint"] = latest_checkpoint(worker.run_dir)  # kept: the run folder stays
            reports.request(self.home, job_id, self.reports)
            failed = move(processing_file, self.home.failed)
            crash_point("filing.moved")  # the row still says running: the next start's reconciliation fixes it
            write_error(
                failed,
                job_id,
                decision.failure_class.value if decision.failure_class else "crash",
                decision.reason,
                evidence=evidence,
                fix=decision.fix,
                exit_status=exit_status,
                error_type=result.error_type if result else "",
                log_tail=log_tail(worker.run_dir / WORKER_LOG, self.settings.daemon.log_tail_lines),
            )
        self._record(job_id, decision, state, message, retry_at, exit_status)
        return decision

    def _record(
        self, job_id: int, decision: Decision, state: JobState, message: str, retry_at: float | None, exit_status: str
    ) -> None:
        """The job row and a DB event for a decision; failed attempts (crashes, hangs) count toward retries."""
        with self.db.session() as s:
            row = s.get(Job, job_id)
            if row is not None:
                row.state = state.value
                if state in (JobState.DONE, JobState.FAILED, JobState.CANCELLED):
                    row.finished_at = time.time()
                if decision.verdict in (JobVerdict.RETRY, JobVerdict.FAILED):
                    row.attempts += 1
                    row.error = message
                    row.failure_class = decision.failure_class.value if decision.failure_class else None
                if decision.verdict == JobVerdict.CANCELLED:
                    row.error = message
                row.retry_at = retry_at
        self.db.event(
            "job_" + decision.verdict.value,
            f"{message} ({exit_status})",
            job_id,
            exit_status=exit_status,
            failure_class=decision.failure_class.value if decision.failure_class else None,
            evidence=decision.evidence,
        )

    def change_waiting(self, job_id: int, action: Action, priority: Priority | None) -> str:
        """Cancel or reprioritise a job that is still waiting, or cancel one in processing/ that no
        worker runs (paused, interrupted, waiting for disk space); anything else is refused, saying why.
        A job whose worker runs is the daemon's to stop first (``Daemon.job_control``)."""
        if action == Action.CANCEL and self.spool.find_job(job_id, [self.home.processing]) is not None:
            version = self.db.version_of_job(job_id)
            if version is not None:
                return f"refused: job {job_id} is trained; its model version {version.id} is being gated"
            return self.cancel_idle(job_id)
        waiting = self.spool.find_job(job_id, [self.home.waiting(p) for p in Priority])
        if waiting is None:
            where = self.spool.find_job(job_id)
            return f"refused: job {job_id} is not waiting ({'in ' + where.parent.name if where else 'unknown'})"
        if action == Action.PRIORITIZE and priority is not None:
            move(waiting, self.home.waiting(priority))
            with self.db.session() as s:
                row = s.get(Job, job_id)
                if row is not None:
                    row.priority = priority.value
            return f"moved from {waiting.parent.name} to {priority.value}"
        reports.request(self.home, job_id, self.reports)  # a retry waiting its turn has run before
        failed = move(waiting, self.home.failed)
        write_error(failed, job_id, "cancelled", "cancelled while waiting, by a control request")
        with self.db.session() as s:
            row = s.get(Job, job_id)
            if row is not None:
                row.state = JobState.CANCELLED.value
                row.finished_at = time.time()
                row.error = "cancelled while waiting"
        return "cancelled"

    def cancel_idle(self, job_id: int) -> str:
        """A job in processing/ with no worker: filed as cancelled at once, its checkpoints kept, any run
        a crashed daemon left open closed."""
        processing = self.spool.find_job(job_id, [self.home.processing])
        assert processing is not None
        runs = self.db.runs(job_id)
        last_step = next((r.end_step for r in reversed(runs) if r.end_step is not None), None)
        job = self.db.job(job_id)
        state = job.state if job is not None and job.state else JobState.PAUSED.value
        reason = f"cancelled while {state}" + (f" at step {last_step}" if last_step is not None else "")
        reason += ", by a control request"
        reports.request(self.home, job_id, self.reports)
        failed = move(processing, self.home.failed)
        checkpoint = latest_checkpoint(self.home.run_dir(job_id))
        write_error(
            failed,
            job_id,
            "cancelled",
            reason,
            evidence={"phase": state, "step": last_step, "checkpoint": checkpoint},
            fix="nothing to fix; submit the file again to train it (its checkpoints stay in the run folder)",
        )
        now = time.time()
        with self.db.session() as s:
            for run in s.query(Run).filter(Run.job_id == job_id, Run.ended_at.is_(None)):
                run.ended_at, run.outcome = now, JobVerdict.CANCELLED.value
            row = s.get(Job, job_id)
            if row is not None:
                row.state = JobState.CANCELLED.value
                row.finished_at = now
                row.error = reason
        return "cancelled"

    def complete(self, job_id: int, result: WorkerResult) -> tuple[int, bool]:
        """Register the model version (once, even if a crash makes this run twice) and request its gate;
        returns the version and whether the job is filed in done/ already. The job stays in processing/
        until its gate has decided whether the version becomes current (``daemon/gate.py`` then calls
        ``file_done``), so a job seen in done/ has its verdict, and the next job starts after it."""
        existing = self.db.version_of_job(job_id)
        if existing is not None and registration.is_pending(existing):  # a failed tick's registration
            self._settle_pending(job_id, existing.id)
        version = existing.id if existing is not None else self._register_version(job_id, result)
        if self.db.gates(version):  # gated before a crash: only the filing was left
            self.file_done(job_id)
            return version, True
        if existing is not None:  # a daemon died between registering and requesting the gate
            job = self.db.job(job_id)
            own = WorkerResult.load(self.home.run_dir(job_id)) if result.val_loss is None else result
            self._request_gate(job_id, version, job.init_version if job else None, own)
        return version, False

    def file_done(self, job_id: int) -> None:
        """The job's version is gated: the row first, so a reader who sees the file in done/ sees it final."""
        with self.db.session() as s:
            row = s.get(Job, job_id)
            if row is not None:
                row.state = JobState.DONE.value
                row.finished_at = row.finished_at or time.time()
        processing_file = self.spool.find_job(job_id, [self.home.processing])
        if processing_file is not None:
            reports.request(self.home, job_id, self.reports)  # before the move: a kill between asks again
            crash_point("filing.moved")  # here the row says done, the file is still in processing/
            move(processing_file, self.home.done)

    def _request_gate(
        self, job_id: int, version_id: int, init_version: int | None, result: WorkerResult | None
    ) -> None:
        run_dir = self.home.run_dir(job_id)
        if (run_dir / GATE_PENDING).exists():
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        request = GateRequest(
            version_id=version_id,
            job_id=job_id,
            init_version=init_version,
            own_val_loss=result.val_loss if result else None,
            own_first_val_loss=result.first_val_loss if result else None,
        )
        request_gate(run_dir, request)

    def _register_version(self, job_id: int, result: WorkerResult) -> int:
        """The final model becomes the next version, in the crash-safe order of
        ``management/registration.py``: row pending, folder ``models/vNNNN``, row final."""
        job = self.db.job(job_id)
        assert job is not None and result.final_model is not None
        version_id = self.db.add_pending_version(
            parent_id=job.init_version,
            job_id=job_id,
            base_model=job.init_model or "embedded",
            data_sha256=job.sha256,
            train_loss=result.train_loss,
            val_loss=result.val_loss,
            steps=result.step,
            kind="adapter" if result.adapter else "full",
            adapter_of=result.base_model if result.adapter else "",
            lineage=job.lineage,
        )
        crash_point("version.row_pending")
        self._place_pending(job_id, version_id, Path(result.final_model))
        # the eval gate runs as a child the daemon reaps in its tick (daemon/gate.py): only requested here
        self._request_gate(job_id, version_id, job.init_version, result)
        return version_id

    def _settle_pending(self, job_id: int, version_id: int) -> None:
        """Finish a registration an exception interrupted in this daemon's life (a kill's are settled at
        start-up by ``management/version_recovery.py``)."""
        final = self.home.run_dir(job_id) / "final"
        if final.is_dir():
            self._place_pending(job_id, version_id, final)
        else:  # renamed already: only the row was left
            registration.make_final(self.db, version_id, registration.version_folder(self.home, version_id))

    def _place_pending(self, job_id: int, version_id: int, final: Path) -> None:
        """Steps 2 and 3 of a registration: the folder into place, then the row final."""
        folder = registration.place(self.home, self.db, version_id, final, job_id)
        crash_point("version.renamed")
        registration.make_final(self.db, version_id, folder)
