"""What a worker's exit means for its job: a pure decision, unit-tested apart from any process.

Inputs are what the daemon can see after the exit: the worker's ``result.json`` (if it got that
far), the exit status, whether the daemon itself asked the worker to stop, and how many attempts
the job has had. The decision says where the job goes and why, in words a person can act on.
"""

from __future__ import annotations

import signal
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


def decide(
    result: WorkerResult | None,
    returncode: int,
    stop_requested: bool,
    final_model_exists: bool,
    attempts: int,
    max_retries: int,
) -> Decision:
    """``attempts`` counts earlier failed attempts of this job (not pauses)."""
    if result is not None and result.outcome == WorkerOutcome.COMPLETED and returncode == 0 and final_model_exists:
        return Decision(Verdict.DONE, f"completed {result.step} steps")
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
    failure = _classify(result, returncode)
    retry = failure.failure_class is not None and failure.failure_class.retryable and attempts < max_retries
    if retry:
        return Decision(
            Verdict.RETRY,
            f"{failure.reason} (attempt {attempts + 1} of {max_retries + 1}; it will be retried)",
            failure.failure_class,
            failure.evidence,
            failure.fix,
        )
    if failure.failure_class is not None and failure.failure_class.retryable:
        return Decision(
            Verdict.FAILED,
            f"{failure.reason} (gave up after {attempts + 1} attempts)",
            failure.failure_class,
            failure.evidence,
            failure.fix,
        )
    return failure


def _classify(result: WorkerResult | None, returncode: int) -> Decision:
    if returncode < 0:
        sig = -returncode
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
        reason = f"worker killed by signal {sig} ({name})"
        if sig == signal.SIGKILL:
            reason += "; if nobody killed it, the kernel's out-of-memory killer may have"
        return Decision(Verdict.FAILED, reason, FailureClass.KILLED, {"signal": sig}, _FIXES[FailureClass.KILLED])
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
        f"worker exited with code {returncode} without a result",
        FailureClass.CRASH,
        {"exit_code": returncode},
        _FIXES[FailureClass.CRASH],
    )
