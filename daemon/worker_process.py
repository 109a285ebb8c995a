"""One trainer worker as seen from the daemon: spawn, poll, ask to stop, kill, decode the exit.

The worker is a fresh interpreter (``python -m core.worker``) in its own session (STYLE 4): a crash,
an OOM or a CUDA fault cannot take the daemon down, GPU memory is really freed between jobs, and
killing the process group takes any helper processes along.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
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
from trainbox.processes import STANDBY_MODULE, is_worker_pid, kill_tree, spawn_logged

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


@dataclass(frozen=True)
class Launch:
    """How a job's processes start, from its ``job.json``: ``nproc`` per host (0 already resolved) on
    ``nnodes`` hosts that meet at ``rdzv_endpoint``."""

    job_id: int
    nproc: int = 1
    nnodes: int = 1
    rdzv_endpoint: str = ""

    @property
    def single(self) -> bool:
        """One process on one host: the only kind of job a warm standby worker may take."""
        return self.nproc == 1 and self.nnodes == 1


def job_launch(run_dir: Path) -> Launch:
    """The launch settings of the job in ``run_dir`` (``training.nproc``: 0 is one per visible GPU, or 1
    without GPUs). A job.json that cannot be read gives one process: the worker reports what is wrong."""
    try:
        spec = json.loads((run_dir / JOB_SPEC).read_text(encoding="utf-8"))
        training = spec.get("training", {})
        configured = int(training.get("nproc", 1))
        nnodes, endpoint = int(training.get("nnodes", 1)), str(training.get("rdzv_endpoint", ""))
        job_id = int(spec.get("job_id", 0))
    except (OSError, ValueError, TypeError, AttributeError):
        return Launch(0)
    nproc = configured if configured > 0 else max(1, visible_gpus())
    return Launch(job_id, nproc, nnodes, endpoint) if nnodes > 1 else Launch(job_id, nproc)


def worker_command(run_dir: Path, nproc: int) -> list[str]:
    """The worker itself, or torchrun starting ``nproc`` of it (core.distributed); either way one
    process group, so killing the group takes every rank along. torchrun forwards SIGTERM to the ranks."""
    worker = ["-m", "core.worker", "--run-dir", str(run_dir)]
    if nproc <= 1:
        return [sys.executable, *worker]
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    return [sys.executable, *launcher, *worker]


def node_command(run_dir: Path, launch: Launch, *, claiming: bool) -> list[str]:
    """This host's part of the job: for one host, ``worker_command``; for ``nnodes`` hosts, one torchrun agent
    per host starting ``nproc`` ranks, all meeting at the job's c10d rendezvous (``--rdzv-id trainbox-job-N``
    at ``rdzv_endpoint``). ``claiming``: this is the host that claimed the job; it hosts the rendezvous store
    and gets global rank 0 (core.multinode). Every other host runs the same command with ``claiming=False``
    for the same run folder, on the shared storage (the fleet starts it when a daemon joins the job). No
    agent restarts its ranks (``--max-restarts 0``): a failed node fails the run, and the daemon's retry
    (``daemon.max_retries``) resumes it from its last checkpoint."""
    if launch.nnodes <= 1:
        return worker_command(run_dir, launch.nproc)
    launcher = [
        "-m",
        "core.multinode",
        f"--nnodes={launch.nnodes}",
        f"--nproc-per-node={launch.nproc}",
        "--rdzv-backend=trainbox-c10d",  # core.multinode.BACKEND (the daemon does not import torch)
        f"--rdzv-endpoint={launch.rdzv_endpoint}",
        f"--rdzv-id=trainbox-job-{launch.job_id}",
        f"--rdzv-conf=is_host={int(claiming)}",
        "--max-restarts=0",
    ]
    return [sys.executable, *launcher, "-m", "core.worker", "--run-dir", str(run_dir)]


def node_log(run_dir: Path, *, claiming: bool, host: str) -> Path:
    """Where a host's agent of a job logs: the claiming host's in the job's ``worker.log`` (its daemon reads it for
    the outcome), a joining host's in ``worker.<host>.log``: on shared storage two hosts appending to one file
    interleave their lines, and NFS clients can overwrite each other's appends."""
    if claiming:
        return run_dir / WORKER_LOG
    return run_dir / f"worker.{re.sub(r'[^A-Za-z0-9.-]', '_', host)}.log"


@dataclass
class WorkerProcess:
    job_id: int
    run_dir: Path
    popen: subprocess.Popen[bytes]
    started_at: float
    stop_requested_at: float | None = None
    killed_at: float | None = None

    @classmethod
    def spawn(cls, job_id: int, run_dir: Path, command: WorkerCommand | None = None) -> WorkerProcess:
        """``command``: the argv for a run folder and a process count; None: the real worker, this host's
        part of it as the claiming host (``node_command``). Tests pass a stub that writes a result and exits
        (``Daemon``'s ``worker_command`` argument), so queue decisions are tested without training."""
        run_dir.mkdir(parents=True, exist_ok=True)
        launch = job_launch(run_dir)
        argv = command(run_dir, launch.nproc) if command else node_command(run_dir, launch, claiming=True)
        popen = spawn_logged(argv, run_dir / WORKER_LOG, label="worker", defaults=QUIET_OFFLINE_ENV)
        return cls(job_id, run_dir, popen, time.time())

    @property
    def pid(self) -> int:
        return self.popen.pid

    def poll(self) -> int | None:
        return self.popen.poll()

    def request_stop(self, now: float) -> None:
        """Warm stop: the worker checkpoints at its next step boundary and exits. One SIGTERM per worker,
        however often a stop is asked for (a stop signal, a pause, a cancel; the tick asks on every pass):
        a second one could reach it after it wrote its result, while the interpreter shuts down, and turn
        "exit 75" into "killed by signal 15". Past ``daemon.worker_stop_timeout`` the reap kills it."""
        if self.stop_requested_at is not None:
            return
        self.stop_requested_at = now
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """Cold stop: the whole process group and every rank's, at once (once: later calls do nothing)."""
        if self.killed_at is not None:
            return
        self.killed_at = time.time()
        kill_tree(self.popen.pid)

    def wait(self, timeout: float) -> int | None:
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None


STOPPED_BY_SIGTERM = "stopped after SIGTERM"  # it exited when asked: trainbox's stop, not its failure


@dataclass(frozen=True)
class Stopped:
    """How a process that is not our child ended when we stopped it: its exit status is not ours to
    read, so only what we did is known (``exit_signal``: SIGKILL when we had to send it)."""

    evidence: str
    exit_signal: int | None = None


def stop_process(pid: int, timeout: float) -> str:
    """Warm stop of a process that is not our child: SIGTERM, wait, then SIGKILL its group."""
    return stop_processes([pid], timeout)[pid].evidence


def stop_processes(pids: list[int], timeout: float) -> dict[int, Stopped]:
    """Warm stop of processes that are not our children, all at once: one SIGTERM each (they
    checkpoint), a wait of up to ``timeout`` for all of them, then SIGKILL to the process group of each
    one still alive (to the process itself when it leads no group)."""
    out: dict[int, Stopped] = {}
    procs: list[psutil.Process] = []
    for pid in dict.fromkeys(pids):
        try:
            proc = psutil.Process(pid)
            proc.send_signal(signal.SIGTERM)
            procs.append(proc)
        except psutil.NoSuchProcess:
            out[pid] = Stopped("already gone")
    _gone, alive = psutil.wait_procs(procs, timeout)
    for proc in alive:
        kill_tree(proc.pid)
    psutil.wait_procs(alive, 10)
    for proc in procs:
        if proc in alive:
            out[proc.pid] = Stopped("killed after the stop timeout", signal.SIGKILL)
        else:
            out[proc.pid] = Stopped(STOPPED_BY_SIGTERM)
    return out


def run_dir_argument(argv: list[str]) -> str | None:
    """The ``--run-dir`` a worker's argv names (the worker's, its torchrun agent's), or None."""
    for i, arg in enumerate(argv):
        if arg == "--run-dir" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--run-dir="):
            return arg.partition("=")[2]
    return None


def serves_run(pid: int | None, run_dir: Path) -> bool:
    """Whether ``pid`` is a live process started for ``run_dir`` (a worker, or its torchrun agent):
    pids are reused, so a pid from the DB or a lock file is signalled only after this check."""
    if not pid:
        return False
    try:
        argv = psutil.Process(pid).cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
    if STANDBY_MODULE in argv:  # a warm worker: its argv names no run, its log is open in its run folder
        return is_worker_pid(pid, run_dir)
    return run_dir_argument(argv) == str(run_dir)


def run_processes(runs_root: Path) -> dict[Path, list[int]]:
    """Live processes that lead their own group (what ``spawn_logged`` starts: the worker, or its
    torchrun agent) and were started for a run folder directly under ``runs_root``, by folder."""
    found: dict[Path, list[int]] = {}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        argv = proc.info.get("cmdline") or []
        named = run_dir_argument(argv)
        if named is None or Path(named).parent != runs_root:
            continue
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if os.getpgid(proc.pid) == proc.pid:
                found.setdefault(Path(named), []).append(proc.pid)
    return found
