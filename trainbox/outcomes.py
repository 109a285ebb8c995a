"""Why a worker's run ended badly: one pure classification, shared by the daemon's reaping
(``daemon/outcome.py``) and crash reports (``safety/crash.py``), so both say the same thing.

Plain values in (``RunEnd``: the worker's result, its return code, whether a stop was asked for, the
watchdog's kills, the phase it last reported, the host's OOM-kill counter, its log's last start),
one ``Classified`` out: a ``FailureClass`` (None for a stop that was asked for), a reason a person
can act on, the evidence and the fix. ``detail`` keeps the finer cause the log or the machine shows
(``cuda_oom``, ``host_oom``, ``cuda_error``, ``native_crash``, ``python_exception``,
``stopped_on_request``, ``killed_by_watchdog``, and for a SIGKILL nobody here sent ``deliberate_kill``
(the kernel's OOM killer ruled out by its counter) or ``external_kill`` (not ruled out)): it refines
the reason and the fix, never the class, which follows from what the worker reported and how it
exited (and so decides retries the same way whether or not a log was readable). The worker's own
exception -> class mapping is ``core.worker.classify``; its class, evidence and fix arrive here through ``result.json``.
"""

from __future__ import annotations

import re
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from trainbox.jobspec import WorkerResult
from trainbox.processes import describe_exit, signal_name
from trainbox.states import FailureClass, WorkerOutcome

CLASS_FIXES = {
    FailureClass.KILLED: "nothing, if someone killed it on purpose; it resumes from its last checkpoint",
    FailureClass.CRASH: "read the traceback in the log tail; it is retried in case the cause was transient",
    FailureClass.DISK: "free disk space in the home; the job resumes when there is room",
    FailureClass.HANG: "read the worker log for where it stopped (a deadlock, a stuck filesystem or GPU); if it was "
    "only slow (a very large model or data file), raise that phase's [watchdog] floor, then submit the file again",
}
DETAIL_FIXES = {
    "cuda_oom": "lower training.batch_size or training.max_length (raise grad_accum to keep the effective batch), "
    "then drop the file in again",
    "host_oom": "the kernel killed the worker for host memory: lower batch_size/max_length, stop other memory "
    "users, or add RAM/swap; the job resumes from its last checkpoint when retried",
    "nan": "training diverged: lower training.learning_rate (or raise warmup_ratio), check the data for empty or "
    "garbage examples",
    "cuda_error": "a CUDA/driver fault: check `nvidia-smi` and the kernel log (Xid errors); a reboot or driver "
    "reinstall may be needed; retrying resumes from the last checkpoint",
    "disk_full": "free disk space in the home (run `trainbox retention`, lower keep_checkpoints or "
    "retention.max_total_gb), then resume",
    "native_crash": "the interpreter or a native library crashed: check the log tail; update torch or the driver "
    "if it repeats",
    "stopped_on_request": "none: it was stopped on request and resumes from its last checkpoint",
}
DELIBERATE_KILL = "deliberate_kill"  # SIGKILLed from outside trainbox, the kernel's OOM killer ruled out
EXTERNAL_KILL = "external_kill"  # SIGKILLed from outside trainbox; whether by the OOM killer is unknown
DETAIL_FIXES[DELIBERATE_KILL] = (
    "nothing, if it was killed on purpose (`kill -9`); it resumes from its last checkpoint while retries remain"
)
DETAIL_FIXES[EXTERNAL_KILL] = (
    "if nobody killed it on purpose, look for the kernel's out-of-memory killer (`dmesg`, `journalctl -k`) and "
    "lower batch_size/max_length; it resumes from its last checkpoint while retries remain"
)
# log patterns, most specific first: they name the finer cause (``detail``)
_PATTERNS: list[tuple[str, re.Pattern[str]]] = [
    ("cuda_oom", re.compile(r"CUDA out of memory|OutOfMemoryError|CUBLAS_STATUS_ALLOC_FAILED", re.I)),
    ("disk_full", re.compile(r"No space left on device|\bENOSPC\b|\[Errno 28\]|Disk quota exceeded")),
    ("nan", re.compile(r"TrainingDiverged|loss (is )?nan\b|non-finite (loss|gradient)|norm nan", re.I)),
    (
        "cuda_error",
        re.compile(
            r"CUDA error|CUDA driver|cudaError|CUBLAS_STATUS|CUDNN_STATUS|device-side assert|illegal memory access"
            r"|NCCL error|NVML|\bXid\b|unspecified launch failure|no CUDA-capable device|GPU is lost",
        ),
    ),
    ("host_oom", re.compile(r"\bMemoryError\b|Out of memory: Killed process|oom-kill|oom_reaper")),
]
_NATIVE = (signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS, signal.SIGILL, signal.SIGFPE)
_TRACEBACK_START = "Traceback (most recent call last):"


@dataclass(frozen=True)
class RunEnd:
    """What is known about a worker that exited."""

    returncode: int | None
    result: WorkerResult | None = None
    stop_requested: bool = False
    kills: Sequence[Mapping[str, Any]] = ()  # the watchdog's kills of this job's workers, this one's last
    phase: str = ""  # the phase its status file last showed
    host_oom_kills: int | None = None  # the kernel's OOM kills while it ran (None: not measured)
    log_lines: Sequence[str] = ()  # its log since its start


@dataclass(frozen=True)
class Classified:
    failure_class: FailureClass | None  # None: stopped on request, not a failure
    reason: str
    evidence: dict[str, Any] = field(default_factory=dict)
    fix: str = ""
    detail: str = ""  # the finer cause, when the log or the machine shows one


def last_traceback(lines: Sequence[str]) -> list[str]:
    """The last Python traceback in ``lines``: from its header through the exception line."""
    starts = [i for i, line in enumerate(lines) if line.strip().startswith(_TRACEBACK_START)]
    if not starts:
        return []
    block = list(lines[starts[-1] :])
    out = [block[0]]
    for line in block[1:]:
        out.append(line)
        # the exception line is the first unindented line after the frames
        if line and not line.startswith((" ", "\t")) and not line.startswith(_TRACEBACK_START):
            break
    return out


def log_cause(lines: Sequence[str]) -> tuple[str, str] | None:
    """The finer cause a log shows, and the line that shows it (the newest evidence wins)."""
    newest_first = list(reversed(lines))
    for detail, pattern in _PATTERNS:
        for line in newest_first:
            if pattern.search(line):
                return detail, line.strip()
    return None


def classify_end(end: RunEnd) -> Classified:
    """Why a worker's run ended without completing. Pure: everything it looks at is passed in."""
    if end.kills:
        return _hang(end.kills)
    result, rc = end.result, end.returncode
    # asked to stop, then killed after the timeout, or gone before it could write a result (a torchrun
    # agent whose ranks were still importing exits 1): its checkpoint holds the progress either way
    if end.stop_requested and (result is None or (rc is not None and rc < 0)):
        step = result.step if result is not None else "?"
        reason = f"stopped on request at step {step} ({describe_exit(rc)})"
        return Classified(None, reason, {}, DETAIL_FIXES["stopped_on_request"], "stopped_on_request")
    if result is not None and result.outcome == WorkerOutcome.FAILED:
        return _reported(result)
    if rc is not None and rc < 0:
        return _signalled(end, -rc)
    return _no_result(end)


def _reported(result: WorkerResult) -> Classified:
    """The worker lived to say why: its class, evidence and fix."""
    try:
        cls = FailureClass(result.failure_class) if result.failure_class else FailureClass.CRASH
    except ValueError:
        cls = FailureClass.CRASH
    reason = result.message or f"worker failed ({result.error_type or 'no message'})"
    evidence = dict(result.evidence)
    if result.error_type:
        evidence.setdefault("error_type", result.error_type)
    return Classified(cls, reason, evidence, result.fix or CLASS_FIXES.get(cls, "") or DETAIL_FIXES.get(cls.value, ""))


def _signalled(end: RunEnd, sig: int) -> Classified:
    """Killed by a signal nobody here asked for: the kernel's OOM killer when its counter or the log
    says so, a native crash, or someone."""
    during = f" while {end.phase}" if end.phase else ""
    evidence: dict[str, Any] = {"signal": sig, **({"phase": end.phase} if end.phase else {})}
    reason = f"worker killed by signal {sig} ({signal_name(sig) or sig}){during}"
    cause = log_cause(end.log_lines)
    if cause is not None:
        evidence["log_line"] = cause[1]
    if end.host_oom_kills:
        evidence["host_oom_kills_during_run"] = end.host_oom_kills
    detail = ""
    if sig == signal.SIGKILL:
        detail, reason = _sigkill(end, cause, reason, evidence)
    elif sig in _NATIVE:
        detail = cause[0] if cause is not None else "native_crash"
    elif cause is not None:
        detail = cause[0]
    fix = DETAIL_FIXES.get(detail, CLASS_FIXES[FailureClass.KILLED])
    return Classified(FailureClass.KILLED, reason, evidence, fix, detail)


def _sigkill(end: RunEnd, cause: tuple[str, str] | None, reason: str, evidence: dict[str, Any]) -> tuple[str, str]:
    """A SIGKILL that reaches here was sent by neither the daemon (its kills follow a stop request) nor
    the watchdog (its kills leave a marker): the kernel's OOM killer, when its counter moved or the log
    says so; else someone, on purpose when the counter is known not to have moved."""
    if end.host_oom_kills or (cause is not None and cause[0] == "host_oom"):
        evidence["oom_killer"] = "yes"
        return "host_oom", reason + ": by the kernel's out-of-memory killer"
    outside = ": from outside trainbox (neither the daemon nor the watchdog sent it)"
    if end.host_oom_kills == 0:
        evidence["oom_killer"] = "ruled out"
        return DELIBERATE_KILL, reason + outside + ", not by the out-of-memory killer (its counter did not move)"
    evidence["oom_killer"] = "unknown"
    return EXTERNAL_KILL, reason + outside + "; the kernel's out-of-memory killer: unknown (its counter was not read)"


def _no_result(end: RunEnd) -> Classified:
    """Exited with a code but no failed result: the log says what it can."""
    during = f" while {end.phase}" if end.phase else ""
    evidence: dict[str, Any] = {"exit_code": end.returncode, **({"phase": end.phase} if end.phase else {})}
    reason = f"worker exited with code {end.returncode} without a result{during}"
    cause, tb = log_cause(end.log_lines), last_traceback(end.log_lines)
    detail = ""
    if cause is not None:
        detail, evidence["log_line"] = cause[0], cause[1]
        reason += f": {cause[1][:300]}"
    elif tb:
        detail = "python_exception"
        reason += f": {tb[-1].strip()[:300]}"
    return Classified(
        FailureClass.CRASH, reason, evidence, DETAIL_FIXES.get(detail, CLASS_FIXES[FailureClass.CRASH]), detail
    )


def _hang(kills: Sequence[Mapping[str, Any]]) -> Classified:
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
    return Classified(FailureClass.HANG, reason, evidence, CLASS_FIXES[FailureClass.HANG], "killed_by_watchdog")


def _seconds(value: Any) -> str:
    return f"{value:.0f} s" if isinstance(value, int | float) else "?"
