"""One trainer worker as seen from the daemon: spawn, poll, ask to stop, kill, decode the exit.

The worker is a fresh interpreter (``python -m core.worker``) in its own session (STYLE 4): a crash,
an OOM or a CUDA fault cannot take the daemon down, GPU memory is really freed between jobs, and
killing the process group takes any helper processes along.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

from trainbox.jobspec import JOB_SPEC, WORKER_LOG
from trainbox.processes import spawn_logged

# argv of a worker for a run folder and a process count (the seam tests use for a stub worker)
WorkerCommand = Callable[[Path, int], list[str]]
# Models load from local folders only, and progress bars would fill the log: defaults a user's
# own environment can still override.
QUIET_OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1"}


def log_tail(path: Path, lines: int) -> list[str]:
    if lines <= 0 or not path.exists():
        return []
    with open(path, encoding="utf-8", errors="replace") as f:
        return [line.rstrip("\n") for line in deque(f, maxlen=lines)]


def visible_gpus() -> int:
    """CUDA GPUs a worker would see (CUDA_VISIBLE_DEVICES narrows them); 0 without a driver."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return len([d for d in env.split(",") if d.strip() and d.strip() != "-1"])
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetCount())
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # boundary: no driver, no library: no GPU, a normal state
        return 0


def job_nproc(run_dir: Path) -> int:
    """``training.nproc`` of the job in ``run_dir`` (0: one per visible GPU, or 1 without GPUs)."""
    try:
        spec = json.loads((run_dir / JOB_SPEC).read_text(encoding="utf-8"))
        configured = int(spec.get("training", {}).get("nproc", 1))
    except (OSError, ValueError, TypeError, AttributeError):
        return 1  # the worker reports what is wrong with job.json
    return configured if configured > 0 else max(1, visible_gpus())


def worker_command(run_dir: Path, nproc: int) -> list[str]:
    """The worker itself, or torchrun starting ``nproc`` of it (core.distributed); either way one
    process group, so killing the group takes every rank along. torchrun forwards SIGTERM to the ranks."""
    worker = ["-m", "core.worker", "--run-dir", str(run_dir)]
    if nproc <= 1:
        return [sys.executable, *worker]
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    return [sys.executable, *launcher, *worker]


@dataclass
class WorkerProcess:
    job_id: int
    run_dir: Path
    popen: subprocess.Popen[bytes]
    started_at: float
    stop_requested_at: float | None = None

    @classmethod
    def spawn(cls, job_id: int, run_dir: Path, command: WorkerCommand | None = None) -> WorkerProcess:
        """``command``: the argv for a run folder and a process count; None: the real worker
        (``worker_command``). Tests pass a stub that writes a result and exits (``Daemon``'s
        ``worker_command`` argument), so queue decisions are tested without training."""
        run_dir.mkdir(parents=True, exist_ok=True)
        argv = (command or worker_command)(run_dir, job_nproc(run_dir))
        popen = spawn_logged(argv, run_dir / WORKER_LOG, label="worker", defaults=QUIET_OFFLINE_ENV)
        return cls(job_id, run_dir, popen, time.time())

    @property
    def pid(self) -> int:
        return self.popen.pid

    def poll(self) -> int | None:
        return self.popen.poll()

    def request_stop(self, now: float) -> None:
        """Warm stop: the worker checkpoints at its next step boundary and exits."""
        if self.stop_requested_at is None:
            self.stop_requested_at = now
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """Cold stop: the whole process group, at once."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)

    def wait(self, timeout: float) -> int | None:
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None


def stop_process(pid: int, timeout: float) -> str:
    """Warm stop of a process that is not our child: SIGTERM, wait, then SIGKILL its group."""
    try:
        proc = psutil.Process(pid)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout)
        return "stopped after SIGTERM"
    except psutil.NoSuchProcess:
        return "already gone"
    except psutil.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(psutil.NoSuchProcess, psutil.TimeoutExpired):
            psutil.Process(pid).wait(10)
        return "killed after the stop timeout"
