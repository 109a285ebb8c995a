"""The status files: one per writer, each rewritten atomically, read by the CLI, watchdog and server.

``status/daemon.json`` is written only by the daemon, ``status/training.json`` only by the worker.
Both carry ``pid`` and ``heartbeat`` (unix time of the last write) so readers judge liveness from the
file rather than from process tables.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from trainbox.atomic import atomic_write_json, read_json
from trainbox.states import DaemonState

DAEMON_STATUS = "daemon.json"
TRAINING_STATUS = "training.json"


class _Status(BaseModel):
    model_config = ConfigDict(extra="ignore")


class JoinedNode(_Status):
    """This fleet host's node in a multi-node run another host claimed (``daemon/node_join.py``)."""

    job_id: int
    run_id: int
    node: int  # its node slot, 1 .. nnodes - 1 (the claiming host is node 0)
    pid: int  # this host's torchrun agent


class DaemonStatus(_Status):
    state: DaemonState = DaemonState.STARTING
    pid: int = 0
    started_at: float = 0.0
    heartbeat: float = 0.0
    paused: bool = False
    current_job: int | None = None
    current_job_name: str | None = None
    worker_pid: int | None = None
    queue: dict[str, int] = {}
    pending_controls: list[str] = []
    message: str = ""
    inbox_refused: list[str] = []  # inbox entries never opened or moved (symlinks, FIFOs, folders), and why
    joined: JoinedNode | None = None  # a node of another host's multi-node job this host runs


class TrainingStatus(_Status):
    job_id: int
    job_name: str = ""
    phase: str = "loading"  # loading, training, evaluating, checkpointing, finished, interrupted, failed
    pid: int = 0
    started_at: float = 0.0
    heartbeat: float = 0.0
    step: int = 0
    total_steps: int = 0
    epoch: int = 0
    loss: float | None = None
    val_loss: float | None = None
    learning_rate: float | None = None
    grad_norm: float | None = None
    tokens_per_s: float | None = None
    eta_s: float | None = None
    device: str = ""
    engine: str = "plain"
    engine_phase: str = ""  # hybrid: warmup, full, predict, plain
    speedup_estimate: float | None = None  # hybrid: running estimate over plain steps
    backward_skipped: int = 0  # hybrid: examples skipped so far (no forward or backward pass)
    skipped_share: float | None = None  # hybrid: share of the last step's examples skipped
    time_saved_s: float | None = None  # hybrid: estimated seconds saved so far (negative: lost to its overhead)
    predicted_final: float | None = None  # hybrid: the curve model's validation loss at the expected stop
    expected_stop: int | None = None  # hybrid: the step the curve model expects the run to stop at
    message: str = ""


S = TypeVar("S", bound=_Status)


def write_status(path: Path, status: _Status) -> None:
    atomic_write_json(path, status.model_dump(mode="json"))


def read_status(path: Path, model: type[S]) -> S | None:
    """The last status written, or None if there is none (or it is from an incompatible version)."""
    data = read_json(path)
    if data is None:
        return None
    try:
        return model.model_validate(data)
    except ValidationError:
        return None


def pid_alive(pid: int | None) -> bool:
    """Whether a process with this pid exists on this machine (readers run beside the writers)."""
    if not pid or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def heartbeat_limit(poll_interval: float) -> float:
    """A daemon heartbeat older than this means hung: twenty missed ticks, at least 15 s (admitting
    a large file holds up one tick)."""
    return max(15.0, 20 * poll_interval)


def daemon_liveness(status: DaemonStatus | None, now: float, poll_interval: float) -> str:
    """absent (never ran here), stopped (exited cleanly), down (died), stale (hung), or up."""
    if status is None:
        return "absent"
    if status.state == DaemonState.STOPPED:
        return "stopped"
    if not pid_alive(status.pid):
        return "down"
    return "stale" if now - status.heartbeat > heartbeat_limit(poll_interval) else "up"
