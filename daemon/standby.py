"""The daemon's warm worker (core/standby.py): one worker process started ahead and handed the next job.

Why: a worker's imports take 5-20 s, paid by every job on the path from drop to done. The daemon
keeps one standby importing while it is idle or while the previous job trains, and hands it the run
folder on its stdin when a job is dispatched; the run's row names the standby's pid before the
standby learns its job, so a daemon killed at any moment finds that worker at its next start.
A standby is the daemon's child like a cold-started worker (the same reaping, signals and process
group); one that is never given a job dies with the daemon.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from daemon.worker_process import QUIET_OFFLINE_ENV, WorkerProcess
from trainbox.processes import STANDBY_MODULE, child_env, describe_exit

log = logging.getLogger("trainbox.daemon")
RESPAWN_AFTER_DEATH = 60.0  # seconds: a standby that dies without a job (a broken install) is not restarted in a loop


class WarmWorker:
    def __init__(self, warm_model: Path | None = None) -> None:
        self.warm_model = warm_model  # whose modelling code the standby imports (the embedded default)
        self.popen: subprocess.Popen[bytes] | None = None
        self.died_at = 0.0

    @property
    def pid(self) -> int | None:
        """The waiting standby's pid, or None when none is alive to take a job."""
        popen = self.popen
        return popen.pid if popen is not None and popen.poll() is None else None

    def ensure(self, now: float) -> None:
        """Have one standby waiting: start one if there is none, or if the last one died on its own."""
        popen = self.popen
        if popen is not None:
            rc = popen.poll()
            if rc is None:
                return
            log.warning("warm worker pid %d exited before a job (%s)", popen.pid, describe_exit(rc))
            self.popen, self.died_at = None, now
        if now - self.died_at < RESPAWN_AFTER_DEATH:
            return
        argv = [sys.executable, "-m", STANDBY_MODULE]
        if self.warm_model is not None:
            argv += ["--warm-model", str(self.warm_model)]
        self.popen = subprocess.Popen(
            argv, stdin=subprocess.PIPE, start_new_session=True, env=child_env(defaults=QUIET_OFFLINE_ENV)
        )

    def take(self, job_id: int, run_dir: Path) -> WorkerProcess | None:
        """Hand the standby its job (it becomes ``python -m core.worker --run-dir run_dir``); None if
        there is no live standby, and the caller starts a worker cold."""
        popen, self.popen = self.popen, None
        if popen is None or popen.poll() is not None or popen.stdin is None:
            return None
        try:
            popen.stdin.write(f"{run_dir}\n".encode())
            popen.stdin.close()
        except OSError:  # it died between the poll and the write
            self._end(popen)
            return None
        return WorkerProcess(job_id, run_dir, popen, time.time())

    def stop(self) -> None:
        """The daemon stops: a standby without a job has touched nothing, so it is killed at once (one
        whose daemon is killed with -9 gets the kernel's parent-death SIGKILL)."""
        popen, self.popen = self.popen, None
        if popen is not None:
            self._end(popen)

    @staticmethod
    def _end(popen: subprocess.Popen[bytes]) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            popen.wait(10)
        if popen.stdin is not None:
            with contextlib.suppress(OSError):
                popen.stdin.close()
