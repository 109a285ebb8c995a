"""Crash analysis: why a worker exited abnormally, and what to do about it.

``classify`` is a pure function of what a dead worker leaves behind: its exit status (code or
signal), its ``result.json`` (the worker's own failure class, evidence and fix, when it lived long
enough to write one), the tail of ``worker.log``, the host's OOM-kill counter moved while it ran,
and the watchdog's kill marker. ``analyse_run`` gathers those for one run, writes
``runs/job-N/crash-report.json`` (the latest crash of the job) and a ``crash_report`` DB event
(every crash), which ``trainbox health`` and the dashboard show.
"""

from __future__ import annotations

import re
import signal
import time
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from trainbox.atomic import atomic_write_json, read_json

CRASH_REPORT = "crash-report.json"
LOG_NAME = "worker.log"
TAIL_LINES = 60


class CrashClass(StrEnum):
    CUDA_OOM = "cuda_oom"
    HOST_OOM = "host_oom"
    NAN = "nan"
    CUDA_ERROR = "cuda_error"
    DISK_FULL = "disk_full"
    KILLED_BY_USER = "killed_by_user"
    KILLED_BY_WATCHDOG = "killed_by_watchdog"
    KILLED = "killed"  # a signal nobody here asked for
    NATIVE_CRASH = "native_crash"  # SIGSEGV, SIGABRT, SIGBUS outside CUDA
    PYTHON_EXCEPTION = "python_exception"
    BAD_INPUT = "bad_input"
    UNKNOWN = "unknown"


ACTIONS: dict[CrashClass, str] = {
    CrashClass.CUDA_OOM: "lower training.batch_size or training.max_length (raise grad_accum to keep the "
    "effective batch), then drop the file in again",
    CrashClass.HOST_OOM: "the kernel killed the worker for host memory: lower batch_size/max_length, stop "
    "other memory users, or add RAM/swap; the job resumes from its last checkpoint when retried",
    CrashClass.NAN: "training diverged: lower training.learning_rate (or raise warmup_ratio), check the data "
    "for empty or garbage examples",
    CrashClass.CUDA_ERROR: "a CUDA/driver fault: check `nvidia-smi` and the kernel log (Xid errors); a reboot or "
    "driver reinstall may be needed; retrying resumes from the last checkpoint",
    CrashClass.DISK_FULL: "free disk space in the home (run `trainbox retention`, lower keep_checkpoints or "
    "retention.max_total_gb), then resume",
    CrashClass.KILLED_BY_USER: "none: it was stopped on request and resumes from its last checkpoint",
    CrashClass.KILLED_BY_WATCHDOG: "the worker hung and the watchdog killed it; the job resumes from its last "
    "checkpoint while daemon.max_retries allows, then fails as 'hang'. If it repeats in the same phase, look at "
    "the worker log around the phase start",
    CrashClass.KILLED: "killed by a signal nobody in trainbox sent (an admin, a cluster manager, an OOM killer "
    "whose trace was not readable): check the kernel log, then retry",
    CrashClass.NATIVE_CRASH: "the interpreter or a native library crashed: check the log tail; update torch or "
    "the driver if it repeats",
    CrashClass.PYTHON_EXCEPTION: "read the traceback; fix the cause (data, settings, model folder) and drop the "
    "file in again",
    CrashClass.BAD_INPUT: "the data or its settings cannot work: fix the file or sidecar and drop it in again",
    CrashClass.UNKNOWN: "read the worker log (runs/job-N/worker.log)",
}

# log patterns, most specific first
_PATTERNS: list[tuple[CrashClass, re.Pattern[str]]] = [
    (CrashClass.CUDA_OOM, re.compile(r"CUDA out of memory|OutOfMemoryError|CUBLAS_STATUS_ALLOC_FAILED", re.I)),
    (CrashClass.DISK_FULL, re.compile(r"No space left on device|\bENOSPC\b|\[Errno 28\]|Disk quota exceeded")),
    (CrashClass.NAN, re.compile(r"TrainingDiverged|loss (is )?nan\b|non-finite (loss|gradient)|norm nan", re.I)),
    (
        CrashClass.CUDA_ERROR,
        re.compile(
            r"CUDA error|CUDA driver|cudaError|CUBLAS_STATUS|CUDNN_STATUS|device-side assert|illegal memory access"
            r"|NCCL error|NVML|\bXid\b|unspecified launch failure|no CUDA-capable device|GPU is lost",
        ),
    ),
    (CrashClass.HOST_OOM, re.compile(r"\bMemoryError\b|Out of memory: Killed process|oom-kill|oom_reaper")),
]
_WORKER_CLASSES = {
    "oom": CrashClass.CUDA_OOM,
    "nan": CrashClass.NAN,
    "disk": CrashClass.DISK_FULL,
    "bad_input": CrashClass.BAD_INPUT,
    "preflight": CrashClass.BAD_INPUT,
    "duplicate": CrashClass.BAD_INPUT,
}
_TRACEBACK_START = "Traceback (most recent call last):"


@dataclass
class CrashReport:
    crash_class: CrashClass
    summary: str
    action: str
    exit_status: str
    returncode: int | None = None
    signal_name: str | None = None
    evidence: dict[str, Any] = field(default_factory=dict)
    traceback: list[str] = field(default_factory=list)
    log_tail: list[str] = field(default_factory=list)
    job_id: int | None = None
    run_id: int | None = None
    attempt: int | None = None
    time: float = 0.0

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["crash_class"] = self.crash_class.value
        return data


def describe_returncode(returncode: int | None) -> tuple[str, str | None]:
    if returncode is None:
        return "unknown exit", None
    if returncode < 0:
        try:
            name: str | None = signal.Signals(-returncode).name
        except ValueError:
            name = None
        return f"killed by signal {-returncode} ({name or 'unknown'})", name
    return f"exit code {returncode}", None


def parse_exit_status(text: str | None) -> int | None:
    """The return code back from the daemon's ``describe_exit`` text ('killed by signal 9 (SIGKILL)')."""
    if not text:
        return None
    m = re.match(r"killed by signal (\d+)", text)
    if m:
        return -int(m.group(1))
    m = re.match(r"exit code (-?\d+)", text)
    return int(m.group(1)) if m else None


def last_traceback(lines: list[str]) -> list[str]:
    """The last Python traceback in ``lines``: from its header through the exception line."""
    starts = [i for i, line in enumerate(lines) if line.strip().startswith(_TRACEBACK_START)]
    if not starts:
        return []
    block = lines[starts[-1] :]
    out = [block[0]]
    for line in block[1:]:
        out.append(line)
        # the exception line is the first unindented line after the frames
        if line and not line.startswith((" ", "\t")) and not line.startswith(_TRACEBACK_START):
            break
    return out


def _first_match(lines: list[str]) -> tuple[CrashClass, str] | None:
    text_lines = list(reversed(lines))  # the newest evidence wins
    for cls, pattern in _PATTERNS:
        for line in text_lines:
            if pattern.search(line):
                return cls, line.strip()
    return None


def classify(
    returncode: int | None,
    result: dict[str, Any] | None = None,
    log_lines: list[str] | None = None,
    host_oom_kills: int | None = None,
    watchdog_kill: dict[str, Any] | None = None,
    stop_requested: bool = False,
) -> CrashReport:
    """Why a worker ended abnormally. Pure: everything it looks at is passed in."""
    lines = list(log_lines or [])
    exit_status, sig = describe_returncode(returncode)
    tb = last_traceback(lines)
    evidence: dict[str, Any] = {}
    result = result or {}

    def report(cls: CrashClass, summary: str, action: str | None = None) -> CrashReport:
        return CrashReport(
            crash_class=cls,
            summary=summary,
            action=action or ACTIONS[cls],
            exit_status=exit_status,
            returncode=returncode,
            signal_name=sig,
            evidence=evidence,
            traceback=tb,
            log_tail=lines[-TAIL_LINES:],
        )

    if watchdog_kill:
        evidence["watchdog"] = watchdog_kill
        phase = watchdog_kill.get("phase", "?")
        age, limit = watchdog_kill.get("heartbeat_age_s"), watchdog_kill.get("limit_s")
        return report(
            CrashClass.KILLED_BY_WATCHDOG,
            f"hung in phase {phase}: no heartbeat for {age}s (limit {limit}s); {exit_status}",
        )
    if host_oom_kills:
        evidence["host_oom_kills_during_run"] = host_oom_kills
    worker_class = str(result.get("failure_class") or "")
    if worker_class in _WORKER_CLASSES:
        evidence.update(result.get("evidence") or {})
        cls = _WORKER_CLASSES[worker_class]
        return report(cls, str(result.get("message") or worker_class), str(result.get("fix") or "") or None)

    if sig in ("SIGKILL", "SIGTERM", "SIGINT") and stop_requested:
        return report(CrashClass.KILLED_BY_USER, f"stopped on request ({exit_status})")
    matched = _first_match(lines)
    if sig == "SIGKILL":
        if host_oom_kills or (matched and matched[0] == CrashClass.HOST_OOM):
            if matched:
                evidence["log_line"] = matched[1]
            return report(CrashClass.HOST_OOM, f"killed by the kernel's OOM killer ({exit_status})")
        return report(CrashClass.KILLED, f"{exit_status}; no OOM-kill evidence was readable")
    if matched is not None:
        cls, line = matched
        evidence["log_line"] = line
        return report(cls, line[:300])
    if sig in ("SIGSEGV", "SIGABRT", "SIGBUS", "SIGILL", "SIGFPE"):
        return report(CrashClass.NATIVE_CRASH, f"native crash: {exit_status}")
    if sig is not None:
        return report(CrashClass.KILLED, exit_status)
    if tb:
        return report(CrashClass.PYTHON_EXCEPTION, tb[-1].strip()[:300])
    message = str(result.get("message") or "")
    if message:
        etype = str(result.get("error_type") or "")
        return report(CrashClass.PYTHON_EXCEPTION, f"{etype}: {message}" if etype else message)
    return report(CrashClass.UNKNOWN, f"{exit_status} without a traceback or result")


# --- evidence from the machine ---------------------------------------------------------------------


def _counter(path: Path, key: str) -> int | None:
    try:
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0] == key:
                return int(parts[1])
    except (OSError, ValueError):
        return None
    return None


def oom_kill_count() -> int | None:
    """OOM kills so far: the cgroup's ``memory.events`` when readable (a container), else /proc/vmstat."""
    try:
        rel = Path("/proc/self/cgroup").read_text().splitlines()[0].split(":", 2)[2]
        cg = _counter(Path("/sys/fs/cgroup") / rel.lstrip("/") / "memory.events", "oom_kill")
        if cg is not None:
            return cg
    except (OSError, IndexError):
        pass
    return _counter(Path("/proc/vmstat"), "oom_kill")


def read_log_tail(path: Path, lines: int = TAIL_LINES * 2) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - 256 * 1024))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    # only the last worker start's output speaks for this run
    marker = text.rfind("--- worker start")
    if marker >= 0:
        text = text[marker:]
    return text.splitlines()[-lines:]


def write_report(run_dir: Path, report: CrashReport) -> Path:
    path = Path(run_dir) / CRASH_REPORT
    atomic_write_json(path, report.to_json())
    return path


def read_report(run_dir: Path) -> dict[str, Any] | None:
    data = read_json(Path(run_dir) / CRASH_REPORT)
    return data if isinstance(data, dict) else None


def analyse_run(
    run_dir: Path,
    returncode: int | None,
    *,
    job_id: int | None = None,
    run_id: int | None = None,
    attempt: int | None = None,
    host_oom_kills: int | None = None,
    stop_requested: bool = False,
    worker_pid: int | None = None,
    now: float | None = None,
) -> CrashReport:
    """Classify one ended run from its folder and write ``crash-report.json``."""
    from trainbox.markers import read_kill_marker

    result = read_json(Path(run_dir) / "result.json")
    marker = read_kill_marker(run_dir, worker_pid)
    report = classify(
        returncode,
        result if isinstance(result, dict) else None,
        read_log_tail(Path(run_dir) / LOG_NAME),
        host_oom_kills,
        marker,
        stop_requested,
    )
    report.job_id, report.run_id, report.attempt = job_id, run_id, attempt
    report.time = time.time() if now is None else now
    write_report(run_dir, report)
    return report
