"""Crash analysis: why a worker exited abnormally, and what to do about it.

``crash_report`` is a pure function of what a dead worker leaves behind: its exit status (code or
signal), its ``result.json`` (the worker's own failure class, evidence and fix, when it lived long
enough to write one), the tail of ``worker.log``, the host's OOM-kill counter moved while it ran,
and the watchdog's kill marker. Its class comes from ``trainbox.outcomes.classify_end``, the same
classification the daemon files the job by; the report adds the evidence (traceback, log tail,
signal, the finer ``detail``: a SIGKILL nobody in trainbox sent is ``deliberate_kill`` when the OOM
counter did not move, ``external_kill`` when it could not be read). ``analyse_run`` gathers those for
one run, writes ``runs/job-N/crash-report.json`` (the latest crash of the job) and a
``crash_report`` DB event (every crash), which ``trainbox health`` and the dashboard show.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from trainbox.atomic import atomic_write_json, read_json
from trainbox.jobspec import WORKER_LOG, WorkerResult
from trainbox.outcomes import RunEnd, classify_end, last_traceback
from trainbox.processes import describe_exit, last_start_lines, signal_name
from trainbox.states import FailureClass

CRASH_REPORT = "crash-report.json"
TAIL_LINES = 60


@dataclass
class CrashReport:
    """A crash report: the shared ``FailureClass`` (None: stopped on request) and the finer ``detail``
    (``cuda_oom``, ``host_oom``, ``cuda_error``, ``native_crash``, ``python_exception``, ...), with the
    evidence a person needs: exit status, signal, traceback, log tail."""

    failure_class: FailureClass | None
    summary: str
    action: str
    exit_status: str
    detail: str = ""
    returncode: int | None = None
    signal_name: str | None = None
    evidence: dict[str, Any] = field(default_factory=dict)
    traceback: list[str] = field(default_factory=list)
    log_tail: list[str] = field(default_factory=list)
    job_id: int | None = None
    run_id: int | None = None
    attempt: int | None = None
    time: float = 0.0

    @property
    def label(self) -> str:
        """What a person reads first: the class, and the finer cause when there is one."""
        cls = self.failure_class.value if self.failure_class else "stopped"
        return f"{cls} ({self.detail})" if self.detail else cls

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["failure_class"] = self.failure_class.value if self.failure_class else None
        return data


def crash_report(
    returncode: int | None,
    result: dict[str, Any] | None = None,
    log_lines: list[str] | None = None,
    host_oom_kills: int | None = None,
    watchdog_kill: dict[str, Any] | None = None,
    stop_requested: bool = False,
) -> CrashReport:
    """A crash report of a worker that ended abnormally. Pure: everything it looks at is passed in; the
    classification is ``trainbox.outcomes.classify_end``, the one the daemon's reaping uses."""
    lines = list(log_lines or [])
    try:
        worker_result = WorkerResult.model_validate(result) if result else None
    except ValueError:
        worker_result = None
    end = RunEnd(
        returncode,
        worker_result,
        stop_requested,
        kills=[watchdog_kill] if watchdog_kill else (),
        host_oom_kills=host_oom_kills,
        log_lines=lines,
    )
    c = classify_end(end)
    evidence = dict(c.evidence)
    if watchdog_kill:
        evidence["watchdog"] = watchdog_kill
    if host_oom_kills:
        evidence["host_oom_kills_during_run"] = host_oom_kills
    return CrashReport(
        failure_class=c.failure_class,
        summary=c.reason,
        action=c.fix,
        exit_status=describe_exit(returncode),
        detail=c.detail,
        returncode=returncode,
        signal_name=signal_name(-returncode) if returncode is not None and returncode < 0 else None,
        evidence=evidence,
        traceback=last_traceback(lines),
        log_tail=lines[-TAIL_LINES:],
    )


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
    report = crash_report(
        returncode,
        result if isinstance(result, dict) else None,
        last_start_lines(Path(run_dir) / WORKER_LOG, TAIL_LINES * 2),
        host_oom_kills,
        marker,
        stop_requested,
    )
    report.job_id, report.run_id, report.attempt = job_id, run_id, attempt
    report.time = time.time() if now is None else now
    write_report(run_dir, report)
    return report
