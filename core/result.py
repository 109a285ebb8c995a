"""How a worker's run ends, as the ``WorkerResult`` the daemon reads (``result.json``).

A run that trained reports from the trainer's state (``trained_result``, ``paused_result`` for a full disk); a
run that raised becomes a failed result (``failed_result``) whose failure class, evidence and fix come from
the exception (``classify``). Every result carries the micro-batch and accumulation the run ended with
(``sizes``): what the OOM back-off found.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from core import checkpoint
from core.disk import DISK_ERRNOS
from core.errors import DataError, DiskFull, JobFailure
from core.events import Outcome
from core.reporting import Report, json_safe
from core.train import Trainer
from trainbox.jobspec import WorkerResult
from trainbox.states import WorkerOutcome

log = logging.getLogger("core.worker")


@dataclass
class RunInfo:
    """What the failure path needs from a job that got far enough to have a trainer."""

    trainer: Trainer | None = None


def sizes(trainer: Trainer | None) -> dict[str, Any]:
    if trainer is None:
        return {}
    return {"micro_batch": trainer.micro_batch_size, "grad_accum": trainer.accum_steps}


def trained_result(trainer: Trainer, base: Path, outcome: WorkerOutcome, **fields: Any) -> WorkerResult:
    """A run that got to train, from where its trainer stands."""
    st = trainer.state
    return WorkerResult(
        outcome=outcome,
        step=st.step,
        total_steps=trainer.total_steps,
        train_loss=st.train_loss,
        val_loss=st.last_val_loss,
        first_val_loss=st.first_val_loss,
        **sizes(trainer),
        base_model=str(base),
        adapter=trainer.cfg.lora,
        **fields,
    )


def paused_result(e: DiskFull, trainer: Trainer, base: Path, run_dir: Path) -> WorkerResult:
    """The disk is too full for the next save: interrupted, not failed (nothing partial was written), and the
    job resumes from its newest complete checkpoint once there is space."""
    last = checkpoint.latest_complete(run_dir)
    resume_step = last.step if last else 0
    log.warning("%s; pausing (resumes from step %d)", e, resume_step)
    return trained_result(
        trainer,
        base,
        WorkerOutcome.INTERRUPTED,
        message=f"disk full: {e}; the job resumes from step {resume_step} once there is space",
        pause_reason="disk full",
        failure_class="disk",
        evidence={**e.evidence, "step": trainer.state.step, "resume_step": resume_step},
        fix=f"free at least {(e.needed + e.margin - e.free) / 1e6:.0f} MB on the disk holding {run_dir} "
        "(or lower keep_checkpoints)",
    )


def ended_result(trainer: Trainer, base: Path, outcome: Outcome, final: Path | None) -> WorkerResult:
    """A run whose loop returned: interrupted (its newest checkpoint holds the progress) or completed (maybe
    early on purpose, saying why)."""
    s = trainer.state
    if outcome == "interrupted":
        saved = "; checkpoint saved" if s.last_checkpoint_step == s.step else "; no step done, no checkpoint"
        return trained_result(trainer, base, WorkerOutcome.INTERRUPTED, message=f"interrupted at step {s.step}{saved}")
    log.info("final model: %s", final)
    early: dict[str, Any] = {}
    if s.stop_reason:
        early = {"message": s.stop_reason, "evidence": {"stopped_early": s.stop_reason, "step": s.step}}
    return trained_result(trainer, base, WorkerOutcome.COMPLETED, final_model=str(final), **early)


def classify(e: BaseException) -> tuple[str, dict[str, Any], str]:
    """(failure class, evidence, fix) of an exception that ended a job; see trainbox.states.FailureClass."""
    if isinstance(e, JobFailure):
        return e.failure_class, e.evidence, e.fix
    if isinstance(e, DataError):
        return e.failure_class, e.evidence, e.fix or "fix the data as the message says, then submit it again"
    if isinstance(e, torch.OutOfMemoryError):
        return (
            "oom",
            {"error": str(e).splitlines()[0] if str(e) else ""},
            ("lower max_length or batch_size, use LoRA or a smaller model, or free the GPU"),
        )
    if isinstance(e, OSError) and e.errno in DISK_ERRNOS:
        return "disk", {"error": str(e)}, "free space on the disk holding the home"
    return (
        "crash",
        {"error_type": type(e).__name__},
        "see the worker log (runs/job-N/worker.log); the job may be retried",
    )


def failed_result(e: Exception, report: Report | None, info: RunInfo) -> WorkerResult:
    """The result a failed run leaves for the daemon: its class, evidence and fix, and how far it got (as last
    reported; a rank that reports nothing counts its trainer's steps)."""
    failure_class, evidence, fix = classify(e)
    reached = report.reached() if report is not None else None
    if reached is None and info.trainer is not None:
        reached = info.trainer.state.step, info.trainer.total_steps
    step, total_steps = reached or (0, 0)
    return WorkerResult(
        outcome=WorkerOutcome.FAILED,
        message=str(e) or type(e).__name__,
        error_type=type(e).__name__,
        step=step,
        total_steps=total_steps,
        failure_class=failure_class,
        evidence=json_safe(evidence),
        fix=fix,
        **sizes(info.trainer),
    )
