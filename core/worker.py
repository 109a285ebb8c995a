"""One job's training in its own process: ``python -m core.worker --run-dir DIR``.

The daemon writes ``DIR/job.json`` (a JobSpec) and spawns this module; the worker reads the spec,
resumes from the newest complete checkpoint in ``DIR/checkpoints/`` if there is one, runs the
preflight checks (core.preflight), trains, and reports through ``DIR/metrics.jsonl``, the status
file, the model DB and its log (stdout/stderr). Its last act is ``DIR/result.json`` (a
WorkerResult), and the exit code says the same:
  0   completed: ``DIR/final/`` holds the trained model and tokenizer (an early stop on
      overfitting is completed too; the message says why)
  75  interrupted: SIGTERM/SIGINT (the newest checkpoint holds the progress; rerun to resume), or
      the disk is too full for the next save (``pause_reason = "disk full"``, ``failure_class =
      "disk"``, evidence needed vs free; nothing partial was written; rerun once there is space)
  1   failed: the traceback is on stderr; result.json has the message, the exception type and
      ``failure_class`` (bad_input, preflight, oom, nan, disk, crash), ``evidence`` and ``fix``
  73  locked: another worker holds ``DIR/worker.lock`` (trainbox.run_lock); this one exits at once,
      having written nothing (not even result.json): the folder is the other worker's
The lock is the first thing the worker (rank 0 under torchrun) does to ``DIR`` and is held until the
process ends, so two workers can never train one run folder, whatever the daemon knew when it
started them.
Every result carries ``micro_batch`` and ``grad_accum``: what the run ended with after any OOM
back-off (the effective batch, batch_size x grad_accum of the settings, never changes).

Signal handlers only set a flag; the training loop looks at it at every step boundary.

With ``training.nproc > 1`` the daemon starts this module under ``torchrun`` (core.distributed): every
rank trains its share of each global batch, the ranks agree on stopping at each step boundary, and rank 0
alone writes the status file, metrics, DB rows, checkpoints, result.json and the final model (the other
ranks report through a ``NullReporter``). With ``sharding = "fsdp"`` the model is sharded (core.sharding)
and every save starts with a gather on every rank.

``train_job`` only wires the pieces, each in its own module: the process set-up (core.runtime), loading
(core.loading), the loop (core.train), saving (core.saving), reporting (core.reporting) and the result
(core.result). Test-only hooks (``TRAINBOX_TEST_FAULT``, ``TRAINBOX_TEST_STEP_SLEEP``) are core.faults'.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import traceback
from pathlib import Path

from transformers.utils import logging as hf_logging

from core import distributed, example_losses
from core.energy import EnergyMeter
from core.errors import DiskFull
from core.events import WarningEvent
from core.faults import Faults
from core.heartbeat import StatusFile
from core.jobdb import JobDB
from core.loading import LoadedJob, RollbackTarget, load_job
from core.metrics import METRICS
from core.microbatch import CACHE_FILE, MicroBatchCache, MicroBatchMemory, cache_key
from core.preflight import PreflightReport, run_preflight
from core.reporting import NullReporter, Report, Reporter
from core.result import RunInfo, ended_result, failed_result, paused_result, sizes, trained_result
from core.runtime import AgreedStop, StopFlag
from core.saving import JobSaver
from core.tracking import open_tracking
from core.train import Trainer
from trainbox import run_lock
from trainbox.jobspec import JobSpec, WorkerResult
from trainbox.states import EXIT_COMPLETED, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_LOCKED, WorkerOutcome

log = logging.getLogger("core.worker")


def train_job(spec: JobSpec, stop: StopFlag, report: Report, info: RunInfo | None = None) -> WorkerResult:
    """One job from its spec to its result: load, check, train, save. Failures rise (``main`` turns them into a
    failed result); a stop request or a full disk end the run interrupted, to be resumed."""
    info = info if info is not None else RunInfo()
    faults = Faults.from_env()
    run_dir = Path(spec.run_dir)
    job = load_job(spec, report, faults)
    train, val = job.data.train, job.data.val
    # compiled kernels kept in the home's cache/, for the next job of the same model (core.compiling)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(spec.embedded_model_dir).parent / "inductor"))
    trainer = Trainer(job.model, job.cfg, train, val, job.tokenizer.pad_token_id, job.device, faults, job.ranks)
    info.trainer = trainer
    preflight, memory, starting = prepare_trainer(spec, job, trainer)
    s = trainer.state
    report.resumed_at(s.step, trainer.total_steps, s.last_val_loss, resumed=job.resumed_from is not None)
    should_stop = AgreedStop(stop, job.ranks)
    if should_stop():
        log.info("stop requested before training started")
        return trained_result(trainer, job.base, WorkerOutcome.INTERRUPTED, message="stopped before training started")
    saver = JobSaver(run_dir, spec.job_id, job, trainer, report, faults)
    report.start(job.cfg.log_every, s.step, memory.worked)
    what = f"resuming at step {s.step}" if job.resumed_from else "starting"
    log.info("%s: %d steps in all", what, trainer.total_steps)
    report.event("training_started", f"worker {what}", step=s.step, total_steps=trainer.total_steps, pid=os.getpid())
    energy = EnergyMeter(run_dir, job.device, enabled=job.ranks.is_main)  # for the job report's energy and cost
    try:
        for p in preflight.warnings:
            report.warning(WarningEvent(s.step, "preflight", p.message, {"check": p.code, **p.evidence}))
        if starting:
            report.warning(WarningEvent(s.step, "micro_batch", starting, sizes(trainer)))
        try:
            outcome = trainer.run(report, should_stop, saver.checkpoint, RollbackTarget(run_dir, job, trainer, report))
            final = saver.final_model() if outcome == "completed" else None
            if final is not None and job.ranks.is_main and not job.ranks.active:  # for the job report
                example_losses.record(run_dir, trainer, job.data.train_lines, report)
        except DiskFull as e:
            return paused_result(e, trainer, job.base, run_dir)
    finally:
        energy.stop()
        report.close_metrics()
        if trainer.hybrid is not None:
            report.hybrid_summary(trainer.hybrid, trainer.state.step, job.data.train_lines)
    return ended_result(trainer, job.base, outcome, final)


def prepare_trainer(spec: JobSpec, job: LoadedJob, trainer: Trainer) -> tuple[PreflightReport, MicroBatchMemory, str]:
    """Preflight (a job that cannot work fails here), then the resumed state, then the micro-batch to start
    at: (the preflight report, the job's view of the micro-batch cache, and the warning when a fresh run starts
    below the configured micro-batch, else ""). A resumed run keeps its checkpoint's micro-batch: the same
    run, exactly."""
    cfg, half = job.cfg, trainer.precision.half
    n_train, n_val = len(job.data.train), len(job.data.val)
    chunk = trainer.speedups.split.chunk if trainer.speedups.split is not None else 0
    preflight = run_preflight(cfg, job.model, job.device, n_train, n_val, bool(spec.eval_file), half, chunk)
    log.info("preflight: micro-batch %d fits (%s)", preflight.micro_batch, preflight.estimate)
    if job.saved is not None:
        trainer.load_state_dict(job.saved)
    n_params = sum(p.numel() for p in job.model.parameters())
    cache = MicroBatchCache(Path(spec.embedded_model_dir).parent / CACHE_FILE)
    key = cache_key(job.device_name, job.model.config, n_params, cfg.max_length, half)
    model = str(spec.init_model or "embedded")
    memory = MicroBatchMemory(cache, key, job.ranks.is_main, max_length=cfg.max_length, model=model)
    starting = ""
    if job.saved is None:
        start, why = memory.start(cfg.batch_size, preflight.micro_batch)
        if start < cfg.batch_size:
            trainer.set_micro_batch(start)
            starting = (
                f"starting at micro-batch {start} x {trainer.accum_steps} accumulation ({why}); "
                f"effective batch {trainer.effective_batch}"
            )
    memory.recorded = trainer.micro_batch_size
    return preflight, memory, starting


def finish(result: WorkerResult, run_dir: Path, report: Report | None) -> int:
    """The run's last acts: its end reported, ``result.json`` written (rank 0), the exit code."""
    if report is not None:
        report.finish(result)
    if distributed.from_env().is_main:
        result.save(run_dir)  # the last act: the daemon reads it after the exit
    log.info("%s at step %d/%d", result.outcome.value, result.step, result.total_steps)
    return {
        WorkerOutcome.COMPLETED: EXIT_COMPLETED,
        WorkerOutcome.INTERRUPTED: EXIT_INTERRUPTED,
        WorkerOutcome.FAILED: EXIT_FAILED,
    }[result.outcome]


def open_report(spec: JobSpec, ranks: distributed.Dist) -> Report:
    """Rank 0 reports for the job; any other rank gets the null reporter."""
    if not ranks.is_main:
        return NullReporter()
    status = StatusFile(Path(spec.status_file), spec.job_id, spec.job_name)
    if ranks.active:  # the process the daemon spawned (and the watchdog watches) is the torchrun agent
        status.status.pid = os.getppid()
    return Reporter(status, JobDB(spec.db_url, spec.job_id), Path(spec.run_dir) / METRICS, open_tracking(spec))


def claim_run_dir(run_dir: Path, ranks: distributed.Dist) -> run_lock.RunLock | int | None:
    """The run folder's lock, taken by the rank that writes there (rank 0) before anything touches the
    folder, and held until the process ends; other ranks never write there. An exit code instead when it
    cannot be taken: ``EXIT_LOCKED`` if another worker holds it (that worker owns the folder: nothing
    may be written, not even a result), ``EXIT_FAILED`` if the lock file is not a plain file."""
    if not ranks.is_main:
        return None
    try:
        return run_lock.acquire(run_dir)
    except run_lock.RunLockHeld as e:
        print(e, file=sys.stderr, flush=True)
        return EXIT_LOCKED
    except OSError as e:
        print(f"trainbox worker: cannot lock the run folder {run_dir}: {e}", file=sys.stderr, flush=True)
        return EXIT_FAILED


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m core.worker", description="Train one trainbox job.")
    parser.add_argument("--run-dir", required=True, type=Path, help="run folder holding job.json")
    args = parser.parse_args(argv)
    ranks = distributed.from_env()
    run_dir: Path = args.run_dir.resolve()
    lock = claim_run_dir(run_dir, ranks)  # held for the whole life of the process
    if isinstance(lock, int):
        return lock
    rank_tag = f" rank{ranks.rank}" if ranks.active else ""
    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format=f"%(asctime)s %(name)s{rank_tag} %(levelname)s %(message)s"
    )
    stop = StopFlag()
    stop.install()
    hf_logging.disable_progress_bar()  # progress bars are noise in a log file
    report: Report | None = None
    info = RunInfo()
    try:
        spec = JobSpec.load(run_dir)
        report = open_report(spec, ranks)
        result = train_job(spec, stop, report, info)
    except Exception as e:  # boundary: any failure becomes a result the daemon can read
        traceback.print_exc()
        sys.stderr.flush()
        result = failed_result(e, report, info)
    try:
        code = finish(result, run_dir, report)
        # its end is written: a late stop request must not turn "exit 75" into "killed by signal 15" while
        # the interpreter shuts down (Python restores the default handlers then); SIGKILL still ends it
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        return code
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
