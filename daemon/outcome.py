"""What a worker's exit means for its job: a pure decision, unit-tested apart from any process.

Inputs are what the daemon can see after the exit: the worker's ``result.json`` (if it got that
far), the exit status, whether the daemon itself asked the worker to stop, whether a control request
cancelled the job, whether the watchdog killed the worker as hung (and every earlier such kill), the
phase the worker last reported, and how many attempts the job has had. The decision says where the
job goes and why, in words a person can act on.

A watchdog kill counts as an attempt like a crash: a job that hangs every time (a file too big to
load within the limit, a deadlock) must end in ``failed/`` with class ``hang`` rather than be resumed
forever.
"""

from __future__ import annotations

import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from trainbox.jobspec import WorkerResult
from trainbox.states import EXIT_INTERRUPTED, FailureClass, WorkerOutcome

DISK_FULL = "disk full"


class Verdict(StrEnum):
    DONE = "done"  # all steps ran, a final model exists
    PAUSED = "paused"  # checkpointed on request (pause/stop); stays in processing/
    DISK_FULL = "disk_full"  # the worker stopped itself before a save that would not fit
    RETRY = "retry"  # a transient failure: back to its queue, resumed from its checkpoint later
    FAILED = "failed"  # to queue/failed/ with an error file
    CANCELLED = "cancelled"  # a control request cancelled it: to queue/failed/, its checkpoints kept


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    reason: str
    failure_class: FailureClass | None = None
    evidence: dict[str, Any] = field(default_factory=dict)
    fix: str = ""


_FIXES = {
    FailureClass.KILLED: "nothing, if someone killed it on purpose; it resumes from its last checkpoint",
    FailureClass.CRASH: "read the traceback in the log tail; it is retried in case the cause was transient",
    FailureClass.DISK: "free disk space in the home; the job resumes when there is room",
}
HANG_FIX = (
    "read the worker log for where it stopped (a deadlock, a stuck filesystem or GPU); if it was only slow "
    "(a very large model or data file), raise that phase's [watchdog] floor, then submit the file again"
)


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
) -> Decision:
    """``attempts`` counts earlier failed attempts of this job (not pauses). ``kills``: the watchdog's
    evidence of every kill of this job's workers as hung, the last one this worker's; empty when the
    watchdog did not kill this worker. ``cancelled_in``: the phase the worker was in when a control
    request cancelled the job ("" if none did). ``phase``: the phase its status file last showed."""
    if result is not None and result.outcome == WorkerOutcome.COMPLETED and returncode == 0 and final_model_exists:
        return Decision(Verdict.DONE, f"completed {result.step} steps")
    if cancelled_in:
        return _cancelled(result, cancelled_in)
    if kills:
        return _with_retries(_hang(kills), attempts, max_retries)
    interrupted = (result is not None and result.outcome == WorkerOutcome.INTERRUPTED) or returncode == EXIT_INTERRUPTED
    if interrupted and result is not None and result.pause_reason == DISK_FULL:
        return Decision(
            Verdict.DISK_FULL,
            result.message or DISK_FULL,
            FailureClass.DISK,
            dict(result.evidence),
            result.fix or _FIXES[FailureClass.DISK],
        )
    # Asked to stop, then killed after the timeout, or gone before it could write a result (a torchrun
    # agent whose ranks were still importing exits 1): its checkpoint holds the progress either way.
    if interrupted or (stop_requested and (returncode < 0 or result is None)):
        step = result.step if result is not None else "?"
        return Decision(Verdict.PAUSED, f"paused at step {step}")
    return _with_retries(_classify(result, returncode, phase), attempts, max_retries)


def _with_retries(failure: Decision, attempts: int, max_retries: int) -> Decision:
    """A retryable failure with attempts left is retried; once they are spent it fails, saying so."""
    retryable = failure.failure_class is not None and failure.failure_class.retryable
    if not retryable:
        return failure
    if attempts < max_retries:
        return Decision(
            Verdict.RETRY,
            f"{failure.reason} (attempt {attempts + 1} of {max_retries + 1}; it will be retried)",
            failure.failure_class,
            failure.evidence,
            failure.fix,
        )
    return Decision(
        Verdict.FAILED,
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
        Verdict.CANCELLED,
        f"cancelled while {cancelled_in}{at}, by a control request",
        FailureClass.CANCELLED,
        evidence,
        "nothing to fix; submit the file again to train it (its checkpoints stay in the run folder)",
    )


def _hang(kills: Sequence[Mapping[str, Any]]) -> Decision:
    """The last kill says what happened now; every kill (time, phase, silence) is the evidence."""
    last = kills[-1]
    phase = str(last.get("phase", "?"))
    age, limit = last.get("heartbeat_age_s"), last.get("limit_s")
    reason = (
        f"worker hung in {phase}: no heartbeat for {_seconds(age)} (limit {_seconds(limit)}), killed by the watchdog"
    )
    if len(kills) > 1:
        reason += f"; killed as hung {len(kills)} times"
    evidence = {
        "phase": phase,
        "heartbeat_age_s": age,
        "limit_s": limit,
        "step": last.get("step"),
        "kills": [
            {k: kill.get(k) for k in ("time", "pid", "phase", "step", "heartbeat_age_s", "limit_s")} for kill in kills
        ],
    }
    return Decision(Verdict.FAILED, reason, FailureClass.HANG, evidence, HANG_FIX)


def _seconds(value: Any) -> str:
    return f"{value:.0f} s" if isinstance(value, int | float) else "?"


def _classify(result: WorkerResult | None, returncode: int, phase: str = "") -> Decision:
    """A death with no result says where it happened (``phase``): a worker that dies while loading,
    every time, is told apart from one that crashed mid-training."""
    during = f" while {phase}" if phase else ""
    where = {"phase": phase} if phase else {}
    if returncode < 0:
        sig = -returncode
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
        reason = f"worker killed by signal {sig} ({name}){during}"
        if sig == signal.SIGKILL:
            reason += "; if nobody killed it, the kernel's out-of-memory killer may have"
        evidence: dict[str, Any] = {"signal": sig, **where}
        return Decision(Verdict.FAILED, reason, FailureClass.KILLED, evidence, _FIXES[FailureClass.KILLED])
    if result is not None and result.outcome == WorkerOutcome.FAILED:
        try:
            cls = FailureClass(result.failure_class) if result.failure_class else FailureClass.CRASH
        except ValueError:
            cls = FailureClass.CRASH
        reason = result.message or f"worker failed ({result.error_type or 'no message'})"
        evidence = dict(result.evidence)
        if result.error_type:
            evidence.setdefault("error_type", result.error_type)
        return Decision(Verdict.FAILED, reason, cls, evidence, result.fix or _FIXES.get(cls, ""))
    return Decision(
        Verdict.FAILED,
        f"worker exited with code {returncode} without a result{during}",
        FailureClass.CRASH,
        {"exit_code": returncode, **where},
        _FIXES[FailureClass.CRASH],
    )
