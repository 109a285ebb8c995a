"""Crash analysis on realistic worker log tails: every class, and the report file and DB event."""

from __future__ import annotations

import json
from pathlib import Path

from safety.crash import CrashClass, analyse_run, classify, last_traceback
from trainbox.processes import describe_exit, exit_parts, returncode_of

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
    assert r.crash_class == CrashClass.CUDA_OOM
    assert "batch_size" in r.action
    assert r.traceback[0].startswith("Traceback") and r.traceback[-1].startswith("torch.OutOfMemoryError")


def test_nan_cuda_error_disk_and_python_exception() -> None:
    assert classify(1, None, NAN).crash_class == CrashClass.NAN
    assert classify(1, None, CUDA_ERR).crash_class == CrashClass.CUDA_ERROR
    assert classify(1, None, ENOSPC).crash_class == CrashClass.DISK_FULL
    r = classify(1, None, PY_EXC)
    assert r.crash_class == CrashClass.PYTHON_EXCEPTION
    assert "config.json" in r.summary and r.exit_status == "exit code 1 (failed)"


def test_host_oom_kill_needs_evidence() -> None:
    tail = ["2025-01-01 core.worker INFO step 5/100 loss 3.0"]
    assert classify(-9, None, tail, host_oom_kills=1).crash_class == CrashClass.HOST_OOM
    kernel = [*tail, "Out of memory: Killed process 4242 (python) total-vm:20000000kB"]
    assert classify(-9, None, kernel).crash_class == CrashClass.HOST_OOM
    plain = classify(-9, None, tail)
    assert plain.crash_class == CrashClass.KILLED and plain.signal_name == "SIGKILL"


def test_stop_requests_watchdog_and_worker_classes() -> None:
    assert classify(-9, None, [], stop_requested=True).crash_class == CrashClass.KILLED_BY_USER
    marker = {"pid": 1, "phase": "evaluating", "heartbeat_age_s": 31.0, "limit_s": 30.0}
    r = classify(-9, None, [], watchdog_kill=marker)
    assert r.crash_class == CrashClass.KILLED_BY_WATCHDOG and "evaluating" in r.summary
    worker = {"failure_class": "oom", "message": "OOM at micro-batch 1", "fix": "use a smaller model"}
    r = classify(1, worker, CUDA_OOM)
    assert r.crash_class == CrashClass.CUDA_OOM and r.action == "use a smaller model"
    assert classify(-11, None, ["Fatal Python error: Segmentation fault"]).crash_class == CrashClass.NATIVE_CRASH
    assert classify(3, None, []).crash_class == CrashClass.UNKNOWN


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
    assert report.crash_class == CrashClass.NAN and data["crash_class"] == "nan"
    assert data["job_id"] == 7 and data["run_id"] == 3 and data["action"]
