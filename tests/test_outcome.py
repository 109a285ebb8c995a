"""The daemon's reading of a worker's exit: every case goes to exactly one verdict, with a reason."""

from __future__ import annotations

import signal

from daemon.outcome import DISK_FULL, JobVerdict, decide
from trainbox.jobspec import WorkerResult
from trainbox.states import EXIT_FAILED, EXIT_INTERRUPTED, FailureClass, WorkerOutcome


def _decide(result: WorkerResult | None, rc: int, stop: bool = False, final: bool = False, attempts: int = 0):  # type: ignore[no-untyped-def]
    return decide(result, rc, stop, final, attempts=attempts, max_retries=2)


def test_completed_needs_exit_zero_and_the_model() -> None:
    ok = WorkerResult(outcome=WorkerOutcome.COMPLETED, step=30, final_model="/x")
    assert _decide(ok, 0, final=True).verdict == JobVerdict.DONE
    assert _decide(ok, 0, final=False).verdict == JobVerdict.RETRY  # no model: never "done"
    assert _decide(ok, -9, final=True).verdict == JobVerdict.RETRY


def test_pause_and_stop_never_mark_done() -> None:
    interrupted = WorkerResult(outcome=WorkerOutcome.INTERRUPTED, step=12)
    d = _decide(interrupted, EXIT_INTERRUPTED, stop=True)
    assert d.verdict == JobVerdict.PAUSED and "12" in d.reason
    assert _decide(None, EXIT_INTERRUPTED).verdict == JobVerdict.PAUSED
    assert _decide(None, -signal.SIGKILL, stop=True).verdict == JobVerdict.PAUSED  # killed after the stop timeout
    assert _decide(None, EXIT_FAILED, stop=True).verdict == JobVerdict.PAUSED  # stopped before it wrote a result
    assert _decide(None, EXIT_FAILED).verdict == JobVerdict.RETRY  # the same exit, unasked: a crash


def test_disk_full_pause_carries_what_is_needed() -> None:
    r = WorkerResult(
        outcome=WorkerOutcome.INTERRUPTED, pause_reason=DISK_FULL, message="need 5 MB", evidence={"needed_bytes": 5}
    )
    d = _decide(r, EXIT_INTERRUPTED)
    assert d.verdict == JobVerdict.DISK_FULL and d.evidence == {"needed_bytes": 5} and d.fix


def test_unrequested_kill_is_retried_then_given_up() -> None:
    d = _decide(None, -signal.SIGKILL)
    assert d.verdict == JobVerdict.RETRY and d.failure_class == FailureClass.KILLED
    assert "signal 9 (SIGKILL)" in d.reason and "out-of-memory" in d.reason
    gave_up = _decide(None, -signal.SIGKILL, attempts=2)
    assert gave_up.verdict == JobVerdict.FAILED and "gave up after 3 attempts" in gave_up.reason


def test_worker_failure_classes() -> None:
    bad = WorkerResult(outcome=WorkerOutcome.FAILED, message="line 3: bad", failure_class="bad_input", fix="fix it")
    d = _decide(bad, EXIT_FAILED)
    assert (d.verdict, d.failure_class, d.fix) == (JobVerdict.FAILED, FailureClass.BAD_INPUT, "fix it")
    nan = WorkerResult(outcome=WorkerOutcome.FAILED, message="diverged", failure_class="nan", evidence={"step": 7})
    assert _decide(nan, EXIT_FAILED).failure_class == FailureClass.NAN
    crash = WorkerResult(outcome=WorkerOutcome.FAILED, message="boom", error_type="RuntimeError")
    d = _decide(crash, EXIT_FAILED)
    assert d.verdict == JobVerdict.RETRY and d.failure_class == FailureClass.CRASH
    assert d.evidence["error_type"] == "RuntimeError"
    silent = _decide(None, 3)
    assert silent.failure_class == FailureClass.CRASH and "without a result" in silent.reason


def _kill(pid: int, t: float, phase: str = "loading", age: float = 130.0) -> dict[str, object]:
    return {"pid": pid, "time": t, "phase": phase, "step": 0, "heartbeat_age_s": age, "limit_s": 120.0}


def test_watchdog_kill_counts_as_an_attempt_then_fails_as_hang() -> None:
    first = [_kill(11, 1000.0)]
    d = decide(None, -signal.SIGKILL, False, False, attempts=0, max_retries=2, kills=first)
    assert d.verdict == JobVerdict.RETRY and d.failure_class == FailureClass.HANG
    assert "hung in loading" in d.reason and "130 s" in d.reason and "attempt 1 of 3" in d.reason
    # a hung worker that did answer the SIGTERM (exit 75, "interrupted") hung all the same: not a pause
    interrupted = WorkerResult(outcome=WorkerOutcome.INTERRUPTED, step=0)
    d = decide(interrupted, EXIT_INTERRUPTED, True, False, attempts=1, max_retries=2, kills=first)
    assert d.verdict == JobVerdict.RETRY and d.failure_class == FailureClass.HANG
    three = [_kill(11, 1000.0), _kill(12, 1200.0), _kill(13, 1400.0, age=125.0)]
    d = decide(None, -signal.SIGKILL, False, False, attempts=2, max_retries=2, kills=three)
    assert d.verdict == JobVerdict.FAILED and d.failure_class == FailureClass.HANG
    assert "gave up after 3 attempts" in d.reason and "killed as hung 3 times" in d.reason
    assert d.evidence["phase"] == "loading" and d.evidence["heartbeat_age_s"] == 125.0
    assert [k["time"] for k in d.evidence["kills"]] == [1000.0, 1200.0, 1400.0]
    assert "floor" in d.fix


def test_hang_attempts_share_the_limit_with_crashes() -> None:
    """attempts counts every failed attempt: two crashes, then a hang, with max_retries=2 is the end."""
    d = decide(None, -signal.SIGKILL, False, False, attempts=2, max_retries=2, kills=[_kill(5, 1.0, "training")])
    assert d.verdict == JobVerdict.FAILED and d.failure_class == FailureClass.HANG and "hung in training" in d.reason


def test_a_hung_worker_that_completed_anyway_is_done() -> None:
    ok = WorkerResult(outcome=WorkerOutcome.COMPLETED, step=30, final_model="/x")
    assert decide(ok, 0, False, True, attempts=0, max_retries=0, kills=[_kill(5, 1.0)]).verdict == JobVerdict.DONE


def test_repeated_deaths_while_loading_without_a_result_fail_saying_where() -> None:
    for rc in (-signal.SIGKILL, 1):
        for attempts in (0, 1):
            d = decide(None, rc, False, False, attempts=attempts, max_retries=2, phase="loading")
            assert d.verdict == JobVerdict.RETRY and "while loading" in d.reason
        d = decide(None, rc, False, False, attempts=2, max_retries=2, phase="loading")
        assert d.verdict == JobVerdict.FAILED and "while loading" in d.reason and "gave up after 3" in d.reason
        assert d.evidence["phase"] == "loading"
        assert d.failure_class == (FailureClass.KILLED if rc < 0 else FailureClass.CRASH)


def test_cancel_files_the_job_whatever_the_exit() -> None:
    stopped = WorkerResult(outcome=WorkerOutcome.INTERRUPTED, step=12)
    d = decide(stopped, EXIT_INTERRUPTED, True, False, attempts=0, max_retries=2, cancelled_in="training")
    assert d.verdict == JobVerdict.CANCELLED and d.failure_class == FailureClass.CANCELLED
    assert d.reason == "cancelled while training at step 12, by a control request"
    assert d.evidence == {"phase": "training", "step": 12}
    # killed after the stop timeout, or before it wrote anything: cancelled, never retried or paused
    d = decide(None, -signal.SIGKILL, True, False, attempts=5, max_retries=2, cancelled_in="loading")
    assert d.verdict == JobVerdict.CANCELLED and d.reason == "cancelled while loading, by a control request"
    hung = decide(
        None, -signal.SIGKILL, True, False, attempts=0, max_retries=2, cancelled_in="loading", kills=[_kill(1, 1.0)]
    )
    assert hung.verdict == JobVerdict.CANCELLED
    # the run finished before the cancel reached it: the model exists, the job is done
    ok = WorkerResult(outcome=WorkerOutcome.COMPLETED, step=30, final_model="/x")
    assert decide(ok, 0, True, True, attempts=0, max_retries=2, cancelled_in="training").verdict == JobVerdict.DONE


def test_a_worker_locked_out_of_its_run_folder_is_neither_a_crash_nor_an_attempt() -> None:
    from trainbox.run_lock import LOCKED_MESSAGE
    from trainbox.states import EXIT_LOCKED

    for attempts in (0, 2):  # even with no retries left: nothing failed
        d = _decide(None, EXIT_LOCKED, attempts=attempts)
        assert d.verdict == JobVerdict.LOCKED and d.failure_class is None and "lock" in d.reason
    # under torchrun the agent exits 1 when rank 0 exits EXIT_LOCKED: rank 0's line in the log says why
    line = f"{LOCKED_MESSAGE} (pid 41): /home/runs/job-000001"
    torchrun = decide(None, EXIT_FAILED, False, False, attempts=0, max_retries=2, log_lines=["x", line])
    assert torchrun.verdict == JobVerdict.LOCKED
    assert _decide(None, EXIT_FAILED).verdict == JobVerdict.RETRY  # exit 1 without that line: a crash
    killed = decide(None, -signal.SIGKILL, False, False, attempts=0, max_retries=2, log_lines=[line])
    assert killed.verdict == JobVerdict.RETRY  # a signal is never the lock
