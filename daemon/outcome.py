"""What a worker's exit means for its job: a pure decision, unit-tested apart from any process.

Inputs are what the daemon can see after the exit: the worker's ``result.json`` (if it got that
far), the exit status, whether the daemon itself asked the worker to stop, whether a control request
cancelled the job, whether the watchdog killed the worker as hung (and every earlier such kill), the
phase the worker last reported, and how many attempts the job has had. The decision says where the
job goes and why, in words a person can act on.

A worker that found its run folder locked by another (``EXIT_LOCKED``, trainbox/run_lock.py) wrote
nothing and failed at nothing: ``LOCKED``, neither a crash nor an attempt.

A watchdog kill counts as an attempt like a crash: a job that hangs every time (a file too big to
load within the limit, a deadlock) must end in ``failed/`` with class ``hang`` rather than be resumed
forever.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from trainbox.jobspec import WorkerResult
from trainbox.outcomes import CLASS_FIXES, RunEnd, classify_end
from trainbox.run_lock import LOCKED_MESSAGE
from trainbox.states import EXIT_INTERRUPTED, EXIT_LOCKED, FailureClass, WorkerOutcome

DISK_FULL = "disk full"


class JobVerdict(StrEnum):
    DONE = "done"  # all steps ran, a final model exists
    PAUSED = "paused"  # checkpointed on request (pause/stop); stays in processing/
    DISK_FULL = "disk_full"  # the worker stopped itself before a save that would not fit
    RETRY = "retry"  # a transient failure: back to its queue, resumed from its checkpoint later
    FAILED = "failed"  # to queue/failed/ with an error file
    CANCELLED = "cancelled"  # a control request cancelled it: to queue/failed/, its checkpoints kept
    LOCKED = "locked"  # another worker holds the run folder: this one wrote nothing; not an attempt


@dataclass(frozen=True)
class Decision:
    verdict: JobVerdict
    reason: str
    failure_class: FailureClass | None = None
    evidence: dict[str, Any] = field(default_factory=dict)
    fix: str = ""


def decide(
    result: WorkerResult | None,
    returncode: int,
    stop_requested: bool,
    final_model_exists: bool,
    attempts: int,
    max_retries: int,
    *,
    kills: Sequence[Mapping[str, Any]] = (),
    cancelled_in: str = "",
    phase: str = "",
    log_lines: Sequence[str] = (),
    host_oom_kills: int | None = None,
) -> Decision:
    """``attempts`` counts earlier failed attempts of this job (not pauses). ``kills``: the watchdog's
    evidence of every kill of this job's workers as hung, the last one this worker's; empty when the
    watchdog did not kill this worker. ``cancelled_in``: the phase the worker was in when a control
    request cancelled the job ("" if none did). ``phase``: the phase its status file last showed.
    ``log_lines``: its log since its start. ``host_oom_kills``: the kernel's OOM kills while it ran (None:
    not measured). Why a run failed is ``trainbox.outcomes.classify_end``, the
    classification crash reports use too."""
    if result is not None and result.outcome == WorkerOutcome.COMPLETED and returncode == 0 and final_model_exists:
        return Decision(JobVerdict.DONE, f"completed {result.step} steps")
    if cancelled_in:
        return _cancelled(result, cancelled_in)
    if locked_out(returncode, log_lines):
        return Decision(
            JobVerdict.LOCKED,
            "another worker holds the run folder's lock: this worker exited at once without writing; the job "
            "waits in processing/ until that worker has stopped",
            None,
            {"exit_code": returncode},
            "none: the daemon stops the other worker (it checkpoints), then resumes the job",
        )
    interrupted = (result is not None and result.outcome == WorkerOutcome.INTERRUPTED) or returncode == EXIT_INTERRUPTED
    if interrupted and not kills and result is not None and result.pause_reason == DISK_FULL:
        return Decision(
            JobVerdict.DISK_FULL,
            result.message or DISK_FULL,
            FailureClass.DISK,
            dict(result.evidence),
            result.fix or CLASS_FIXES[FailureClass.DISK],
        )
    if interrupted and not kills:
        return Decision(JobVerdict.PAUSED, f"paused at step {result.step if result is not None else '?'}")
    end = RunEnd(returncode, result, stop_requested, kills, phase, host_oom_kills, log_lines)
    c = classify_end(end)
    if c.failure_class is None:  # stopped on request: its checkpoint holds the progress
        return Decision(JobVerdict.PAUSED, f"paused at step {result.step if result is not None else '?'}")
    return _with_retries(
        Decision(JobVerdict.FAILED, c.reason, c.failure_class, c.evidence, c.fix), attempts, max_retries
    )


def locked_out(returncode: int, log_lines: Sequence[str] = ()) -> bool:
    """Whether the worker found its run folder locked by another: its own exit code, or (under torchrun,
    whose agent exits 1 when rank 0 does) rank 0's line in the log since this start."""
    if returncode == EXIT_LOCKED:
        return True
    return returncode > 0 and any(LOCKED_MESSAGE in line for line in log_lines)


def _with_retries(failure: Decision, attempts: int, max_retries: int) -> Decision:
    """A retryable failure with attempts left is retried; once they are spent it fails, saying so."""
    retryable = failure.failure_class is not None and failure.failure_class.retryable
    if not retryable:
        return failure
    if attempts < max_retries:
        return Decision(
            JobVerdict.RETRY,
            f"{failure.reason} (attempt {attempts + 1} of {max_retries + 1}; it will be retried)",
            failure.failure_class,
            failure.evidence,
            failure.fix,
        )
    return Decision(
        JobVerdict.FAILED,
        f"{failure.reason} (gave up after {attempts + 1} attempts)",
        failure.failure_class,
        failure.evidence,
        failure.fix,
    )


def _cancelled(result: WorkerResult | None, cancelled_in: str) -> Decision:
    """Cancelled: filed at once, never restarted; the step is where it stopped (and checkpointed)."""
    at = f" at step {result.step}" if result is not None else ""
    evidence: dict[str, Any] = {"phase": cancelled_in, "step": result.step if result is not None else None}
    return Decision(
        JobVerdict.CANCELLED,
        f"cancelled while {cancelled_in}{at}, by a control request",
        FailureClass.CANCELLED,
        evidence,
        "nothing to fix; submit the file again to train it (its checkpoints stay in the run folder)",
    )
