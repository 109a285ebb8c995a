"""What the daemon does when a job starts and when its worker exits.

Kept apart from the main loop so the loop reads as wait, controls, admit, reap, dispatch.
"""

from __future__ import annotations

import time
from pathlib import Path

from daemon.admission import write_error
from daemon.spool import Spool, job_id_of, move
from daemon.worker_process import LOG_NAME, WorkerProcess, describe_exit, log_tail
from management.db import Job, ModelDB, ModelVersion, Run
from trainbox.config import Settings, job_training_config
from trainbox.home import Home
from trainbox.jobspec import RESULT, JobSpec, WorkerResult
from trainbox.states import EXIT_INTERRUPTED, JobState, WorkerOutcome
from trainbox.status import TRAINING_STATUS


class JobRunner:
    def __init__(self, home: Home, spool: Spool, db: ModelDB, settings: Settings) -> None:
        self.home, self.spool, self.db, self.settings = home, spool, db, settings

    def start(self, processing_file: Path) -> WorkerProcess:
        """Spawn a worker for a job in ``queue/processing/``; a job that ran before resumes."""
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
        try:
            spec = JobSpec.load(run_dir)
            spec.data_file = str(processing_file)
        except FileNotFoundError:
            spec = self._new_spec(job, processing_file, run_dir)
        spec.save()
        (run_dir / RESULT).unlink(missing_ok=True)  # a stale result must never speak for this run
        worker = WorkerProcess.spawn(job_id, run_dir)
        attempt = len(self.db.runs(job_id)) + 1
        with self.db.session() as s:
            row = s.get(Job, job_id)
            assert row is not None
            row.state = JobState.RUNNING.value
            row.started_at = row.started_at or time.time()
            s.add(Run(job_id=job_id, attempt=attempt, pid=worker.pid, init_model=spec.init_model))
        verb = "resumed" if attempt > 1 else "started"
        self.db.event("job_" + verb, f"{job.name}: worker pid {worker.pid}, attempt {attempt}", job_id)
        return worker

    def _new_spec(self, job: Job, data_file: Path, run_dir: Path) -> JobSpec:
        """First start: fix the settings and the starting model (continual training) for good."""
        training = job_training_config(self.settings.training, job.settings or {})
        init_model, init_version = training.model, None
        if not init_model:
            latest = self.db.latest_version()
            if latest is not None:
                init_model, init_version = latest.path, latest.id
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
            db_url=self.home.db_url,
            training=training,
        )

    def finish(self, worker: WorkerProcess, returncode: int, stop_was_requested: bool) -> JobState:
        """Decide the job's fate from the worker's result file and exit status, and move its file."""
        job_id = worker.job_id
        result = WorkerResult.load(worker.run_dir)
        exit_status = describe_exit(returncode)
        processing_file = next((p for p in self.spool.processing() if job_id_of(p.name) == job_id), None)
        completed = (
            returncode == 0
            and result is not None
            and result.outcome == WorkerOutcome.COMPLETED
            and result.final_model is not None
            and Path(result.final_model).is_dir()
        )
        interrupted = (result is not None and result.outcome == WorkerOutcome.INTERRUPTED) or (
            returncode == EXIT_INTERRUPTED
        )
        if completed and result is not None:
            state = JobState.DONE
            version = self._register_version(job_id, result)
            if processing_file is not None:
                move(processing_file, self.home.done)
            message = f"done: model version {version}, val loss {result.val_loss}"
        elif interrupted or (stop_was_requested and returncode < 0):
            state = JobState.PAUSED  # stays in processing/, resumes from its last checkpoint
            message = f"paused at step {result.step if result else '?'} ({exit_status})"
        else:
            state = JobState.FAILED
            reason = result.message if result and result.message else f"worker {exit_status}"
            if processing_file is not None:
                failed = move(processing_file, self.home.failed)
                write_error(
                    failed,
                    job_id,
                    "training",
                    reason,
                    exit_status=exit_status,
                    error_type=result.error_type if result else "",
                    log_tail=log_tail(worker.run_dir / LOG_NAME, self.settings.daemon.log_tail_lines),
                )
            message = f"failed: {reason} ({exit_status})"
        with self.db.session() as s:
            row = s.get(Job, job_id)
            if row is not None:
                row.state = state.value
                if state in (JobState.DONE, JobState.FAILED):
                    row.finished_at = time.time()
                if state == JobState.FAILED:
                    row.error = message
            run = s.query(Run).filter(Run.job_id == job_id).order_by(Run.id.desc()).first()
            if run is not None:
                run.ended_at = time.time()
                run.exit_status = exit_status
                run.outcome = result.outcome.value if result else "crashed"
                run.end_step = result.step if result else None
        self.db.event("job_" + state.value, message, job_id, exit_status=exit_status)
        return state

    def _register_version(self, job_id: int, result: WorkerResult) -> int:
        """The final model becomes the next version: its folder is renamed under models/."""
        job = self.db.job(job_id)
        assert job is not None and result.final_model is not None
        with self.db.session() as s:
            version = ModelVersion(
                path="",
                parent_id=job.init_version,
                job_id=job_id,
                base_model=job.init_model or "embedded",
                data_sha256=job.sha256,
                train_loss=result.train_loss,
                val_loss=result.val_loss,
                steps=result.step,
            )
            s.add(version)
            s.flush()
            target = move(Path(result.final_model), self.home.models, f"v{version.id:04d}")
            version.path = str(target)
            return version.id
