"""Child processes as every trainbox process sees them: spawn one with its log, say how it ended,
and tell a trainbox worker from a stranger that reuses its pid.

One place for each, so the daemon (workers, the eval gate), the watchdog (a restarted daemon) and
``trainbox up`` (its children) spawn, describe and recognise processes the same way.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil

from trainbox.states import EXIT_COMPLETED, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_LOCKED

WORKER_MODULE = "core.worker"
STANDBY_MODULE = "core.standby"  # a warm worker: its run folder comes on stdin, not in its argv
_MEANING = {
    EXIT_COMPLETED: "completed",
    EXIT_FAILED: "failed",
    EXIT_INTERRUPTED: "interrupted",
    EXIT_LOCKED: "run folder locked by another worker",
}


def signal_name(sig: int) -> str | None:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return None


def exit_parts(returncode: int | None) -> tuple[int | None, int | None]:
    """``(exit_code, exit_signal)`` of a Popen return code (negative: killed by that signal); what
    the DB stores as integers."""
    if returncode is None:
        return None, None
    return (None, -returncode) if returncode < 0 else (returncode, None)


def returncode_of(exit_code: int | None, exit_signal: int | None) -> int | None:
    """The Popen return code back from the two integers (None: unknown)."""
    if exit_signal is not None:
        return -exit_signal
    return exit_code


def describe_exit(returncode: int | None) -> str:
    """A person-readable exit status: 'killed by signal 9 (SIGKILL)' is not 'exit code 1'."""
    if returncode is None:
        return "unknown exit"
    if returncode < 0:
        return f"killed by signal {-returncode} ({signal_name(-returncode) or 'unknown'})"
    meaning = _MEANING.get(returncode)
    return f"exit code {returncode}" + (f" ({meaning})" if meaning else "")


def cmdline(pid: int) -> list[str]:
    """A process's argv ([] if it is gone or unreadable)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def is_worker_pid(pid: int | None, run_dir: Path | None = None) -> bool:
    """Whether ``pid`` is a live trainbox worker (for ``run_dir``, when given): pids are reused, so
    never signal a stranger. A zombie has no cmdline and is not a worker."""
    if not pid:
        return False
    argv = cmdline(pid)
    if WORKER_MODULE in argv:
        return run_dir is None or str(run_dir) in argv
    if STANDBY_MODULE in argv:  # a warm worker: a worker once given a run, writing its log there
        return _has_open_file_under(pid, run_dir) if run_dir is not None else True
    return False


def _has_open_file_under(pid: int, folder: Path) -> bool:
    """A warm worker's argv does not name its run: once given one, its output goes to a log there."""
    prefix = str(folder).rstrip("/") + "/"
    try:
        return any(f.path.startswith(prefix) for f in psutil.Process(pid).open_files())
    except psutil.Error:
        return False


def spawn_logged(
    argv: list[str],
    log_path: Path,
    env: dict[str, str] | None = None,
    label: str = "",
    defaults: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """A child in its own session (STYLE 4: a Ctrl-C meant for us does not reach it, and killing its
    group takes its helpers along), stdin closed, stdout and stderr appended to ``log_path`` after a
    ``--- <label> start <time>`` line (crash reports read only the last start's output). ``env`` is
    laid over ``os.environ``, ``defaults`` under it (a user's environment can still override them)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    head = f"{label} start" if label else "start"
    with open(log_path, "ab") as out:
        out.write(f"\n--- {head} {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(argv)} ---\n".encode())
        out.flush()
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=child_env(env, defaults),
        )


def kill_group(popen: subprocess.Popen[bytes], wait: float = 10.0) -> None:
    """SIGKILL a child started by ``spawn_logged`` with its whole session's group, then reap it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):  # already gone
        os.killpg(popen.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):  # unkillable for now (D state): a later poll reaps it
        popen.wait(wait)


def kill_tree(pid: int) -> None:
    """SIGKILL to ``pid`` (to its whole group when it leads one) and to the group of each of its descendants,
    listed before anything is killed: torchrun starts every rank in a session of its own, so the agent's group
    alone would leave the ranks training on as orphans, holding the run folder's lock."""
    try:
        descendants = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        descendants = []
    for target in [pid, *(p.pid for p in descendants)]:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if os.getpgid(target) == target:
                os.killpg(target, signal.SIGKILL)
            else:
                os.kill(target, signal.SIGKILL)


def child_env(env: dict[str, str] | None = None, defaults: dict[str, str] | None = None) -> dict[str, str]:
    """A child's environment: ``env`` over ``os.environ`` over ``defaults``, output unbuffered (a log
    must hold everything up to a crash)."""
    return {**(defaults or {}), **os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}


def last_start_lines(path: Path, lines: int = 120) -> list[str]:
    """The last ``lines`` of a child's log written since its last ``--- ... start`` line (only the last
    start's output speaks for that run); [] if unreadable."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - 256 * 1024))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    marker = text.rfind("--- worker start")
    if marker >= 0:
        text = text[marker:]
    return text.splitlines()[-lines:]
