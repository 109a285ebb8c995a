"""The daemon's reading of a worker's exit: every case goes to exactly one verdict, with a reason."""

from __future__ import annotations

import signal

from daemon.outcome import DISK_FULL, Verdict, decide
from trainbox.jobspec import WorkerResult
from trainbox.states import EXIT_FAILED, EXIT_INTERRUPTED, FailureClass, WorkerOutcome


def _decide(result: WorkerResult | None, rc: int, stop: bool = False, final: bool = False, attempts: int = 0):  # type: ignore[no-untyped-def]
    return decide(result, rc, stop, final, attempts=attempts, max_retries=2)


def test_completed_needs_exit_zero_and_the_model() -> None:
    ok = WorkerResult(outcome=WorkerOutcome.COMPLETED, step=30, final_model="/x")
    assert _decide(ok, 0, final=True).verdict == Verdict.DONE
    assert _decide(ok, 0, final=False).verdict == Verdict.RETRY  # no model: never "done"
    assert _decide(ok, -9, final=True).verdict == Verdict.RETRY


def test_pause_and_stop_never_mark_done() -> None:
    interrupted = WorkerResult(outcome=WorkerOutcome.INTERRUPTED, step=12)
    d = _decide(interrupted, EXIT_INTERRUPTED, stop=True)
    assert d.verdict == Verdict.PAUSED and "12" in d.reason
    assert _decide(None, EXIT_INTERRUPTED).verdict == Verdict.PAUSED
    assert _decide(None, -signal.SIGKILL, stop=True).verdict == Verdict.PAUSED  # killed after the stop timeout
    assert _decide(None, EXIT_FAILED, stop=True).verdict == Verdict.PAUSED  # stopped before it wrote a result
    assert _decide(None, EXIT_FAILED).verdict == Verdict.RETRY  # the same exit, unasked: a crash


def test_disk_full_pause_carries_what_is_needed() -> None:
    r = WorkerResult(
        outcome=WorkerOutcome.INTERRUPTED, pause_reason=DISK_FULL, message="need 5 MB", evidence={"needed_bytes": 5}
    )
    d = _decide(r, EXIT_INTERRUPTED)
    assert d.verdict == Verdict.DISK_FULL and d.evidence == {"needed_bytes": 5} and d.fix


def test_unrequested_kill_is_retried_then_given_up() -> None:
    d = _decide(None, -signal.SIGKILL)
    assert d.verdict == Verdict.RETRY and d.failure_class == FailureClass.KILLED
    assert "signal 9 (SIGKILL)" in d.reason and "out-of-memory" in d.reason
    gave_up = _decide(None, -signal.SIGKILL, attempts=2)
    assert gave_up.verdict == Verdict.FAILED and "gave up after 3 attempts" in gave_up.reason


def test_worker_failure_classes() -> None:
    bad = WorkerResult(outcome=WorkerOutcome.FAILED, message="line 3: bad", failure_class="bad_input", fix="fix it")
    d = _decide(bad, EXIT_FAILED)
    assert (d.verdict, d.failure_class, d.fix) == (Verdict.FAILED, FailureClass.BAD_INPUT, "fix it")
    nan = WorkerResult(outcome=WorkerOutcome.FAILED, message="diverged", failure_class="nan", evidence={"step": 7})
    assert _decide(nan, EXIT_FAILED).failure_class == FailureClass.NAN
    crash = WorkerResult(outcome=WorkerOutcome.FAILED, message="boom", error_type="RuntimeError")
    d = _decide(crash, EXIT_FAILED)
    assert d.verdict == Verdict.RETRY and d.failure_class == FailureClass.CRASH
    assert d.evidence["error_type"] == "RuntimeError"
    silent = _decide(None, 3)
    assert silent.failure_class == FailureClass.CRASH and "without a result" in silent.reason
