"""Crash analysis on realistic worker log tails: every class, and the report file and DB event."""

from __future__ import annotations

import json
from pathlib import Path

from daemon.outcome import decide
from safety.crash import analyse_run
from safety.crash import crash_report as classify
from trainbox.jobspec import WorkerResult
from trainbox.outcomes import last_traceback
from trainbox.processes import describe_exit, exit_parts, returncode_of
from trainbox.states import FailureClass

CUDA_OOM = """\
2025-01-01 10:00:00 core.worker INFO step 40/200 loss 2.1
Traceback (most recent call last):
  File "/opt/trainbox/core/worker.py", line 380, in main
    result = train_job(spec, stop, status, db)
  File "/opt/trainbox/core/train.py", line 240, in _optimizer_step
    loss.backward()
torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 23.65 GiB \
of which 1.12 GiB is free. Including non-PyTorch memory, this process has 22.5 GiB memory in use.
""".splitlines()

NAN = """\
2025-01-01 10:00:00 core.worker INFO step 12/100 loss 9.8
Traceback (most recent call last):
  File "/opt/trainbox/core/train.py", line 230, in _optimizer_step
    raise TrainingDiverged(
core.errors.TrainingDiverged: step 13: loss nan, gradient norm inf; lower learning_rate or check the data
""".splitlines()

CUDA_ERR = """\
Traceback (most recent call last):
  File "/opt/trainbox/core/train.py", line 221, in _optimizer_step
    logits = model(input_ids=b["input_ids"]).logits
RuntimeError: CUDA error: an illegal memory access was encountered
CUDA kernel errors might be asynchronously reported at some other API call.
""".splitlines()

ENOSPC = """\
2025-01-01 10:00:00 core.worker INFO checkpoint step 100
Traceback (most recent call last):
  File "/opt/trainbox/core/checkpoint.py", line 101, in fill
    torch.save(state, tmp / STATE)
OSError: [Errno 28] No space left on device
""".splitlines()

PY_EXC = """\
2025-01-01 10:00:00 core.worker INFO job 3 (x.jsonl): model /models/v0002 on cpu
Traceback (most recent call last):
  File "/opt/trainbox/core/worker.py", line 380, in main
    result = train_job(spec, stop, status, db)
  File "/usr/lib/python3/site-packages/transformers/modeling_utils.py", line 4100, in from_pretrained
    raise OSError(f"{path} does not appear to have a file named config.json")
OSError: /models/v0002 does not appear to have a file named config.json
""".splitlines()


def test_cuda_oom_from_traceback() -> None:
    r = classify(1, None, CUDA_OOM)
    assert (r.failure_class, r.detail) == (FailureClass.CRASH, "cuda_oom")  # no result: the log names the cause
    assert "batch_size" in r.action and "CUDA out of memory" in r.summary
    assert r.traceback[0].startswith("Traceback") and r.traceback[-1].startswith("torch.OutOfMemoryError")


def test_nan_cuda_error_disk_and_python_exception() -> None:
    assert classify(1, None, NAN).detail == "nan"
    assert classify(1, None, CUDA_ERR).detail == "cuda_error"
    assert classify(1, None, ENOSPC).detail == "disk_full"
    r = classify(1, None, PY_EXC)
    assert (r.failure_class, r.detail) == (FailureClass.CRASH, "python_exception")
    assert "config.json" in r.summary and r.exit_status == "exit code 1 (failed)"


def test_host_oom_kill_needs_evidence() -> None:
    tail = ["2025-01-01 core.worker INFO step 5/100 loss 3.0"]
    r = classify(-9, None, tail, host_oom_kills=1)
    assert (r.failure_class, r.detail) == (FailureClass.KILLED, "host_oom") and "out-of-memory killer" in r.summary
    kernel = [*tail, "Out of memory: Killed process 4242 (python) total-vm:20000000kB"]
    assert classify(-9, None, kernel).detail == "host_oom"
    plain = classify(-9, None, tail)  # no OOM counter read: someone outside, OOM killer unknown
    assert plain.failure_class == FailureClass.KILLED and plain.detail == "external_kill"
    assert plain.signal_name == "SIGKILL" and plain.evidence["oom_killer"] == "unknown" and "unknown" in plain.summary


def test_stop_requests_watchdog_and_worker_classes() -> None:
    stopped = classify(-9, None, [], stop_requested=True)
    assert stopped.failure_class is None and stopped.detail == "stopped_on_request"
    marker = {"pid": 1, "phase": "evaluating", "heartbeat_age_s": 31.0, "limit_s": 30.0}
    r = classify(-9, None, [], watchdog_kill=marker)
    assert (r.failure_class, r.detail) == (FailureClass.HANG, "killed_by_watchdog") and "evaluating" in r.summary
    worker = {
        "outcome": "failed",
        "failure_class": "oom",
        "message": "OOM at micro-batch 1",
        "fix": "use a smaller model",
    }
    r = classify(1, worker, CUDA_OOM)
    assert r.failure_class == FailureClass.OOM and r.action == "use a smaller model"
    segv = classify(-11, None, ["Fatal Python error: Segmentation fault"])
    assert (segv.failure_class, segv.detail) == (FailureClass.KILLED, "native_crash")
    assert classify(3, None, []).failure_class == FailureClass.CRASH


def test_the_daemon_and_crash_reports_say_the_same_thing() -> None:
    """One classification: the daemon's decision and the crash report agree on class and reason."""
    cases: list[tuple[int, dict[str, object] | None, list[str]]] = [
        (1, None, CUDA_OOM),
        (-9, None, []),
        (-11, None, ["Fatal Python error: Segmentation fault"]),
        (1, {"outcome": "failed", "failure_class": "nan", "message": "diverged"}, NAN),
        (3, None, PY_EXC),
    ]
    for rc, result, lines in cases:
        parsed = WorkerResult.model_validate(result) if result else None
        decision = decide(parsed, rc, False, False, attempts=9, max_retries=0, log_lines=lines)
        report = classify(rc, result, lines)
        assert decision.failure_class == report.failure_class, (rc, result)
        assert decision.reason.startswith(report.summary), (decision.reason, report.summary)


def test_exit_status_integers_round_trip_and_traceback_extraction() -> None:
    assert exit_parts(-9) == (None, 9) and returncode_of(*exit_parts(-9)) == -9
    assert exit_parts(1) == (1, None) and returncode_of(*exit_parts(1)) == 1
    assert exit_parts(None) == (None, None) and returncode_of(None, None) is None
    assert describe_exit(-9) == "killed by signal 9 (SIGKILL)" and describe_exit(1) == "exit code 1 (failed)"
    assert last_traceback(["no traceback here"]) == []


def test_analyse_run_writes_report_for_the_last_start_only(tmp_path: Path) -> None:
    run = tmp_path / "job-000007"
    run.mkdir()
    older = "\n".join(CUDA_OOM)
    (run / "worker.log").write_text(f"--- worker start 1 ---\n{older}\n--- worker start 2 ---\n" + "\n".join(NAN))
    report = analyse_run(run, 1, job_id=7, run_id=3, attempt=2)
    data = json.loads((run / "crash-report.json").read_text())
    assert report.detail == "nan" and data["failure_class"] == "crash" and data["detail"] == "nan"
    assert data["job_id"] == 7 and data["run_id"] == 3 and data["action"]
