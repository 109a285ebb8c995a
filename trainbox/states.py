"""The states a job and the daemon can be in: one enum each, shared by DB rows, status JSON and CLI."""

from __future__ import annotations

from enum import StrEnum


class Priority(StrEnum):
    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"

    @property
    def rank(self) -> int:
        """Dispatch order: lower runs first."""
        return {"high": 0, "normal": 1, "low": 2}[self.value]


class JobState(StrEnum):
    QUEUED = "queued"  # in queue/<priority>/
    RUNNING = "running"  # in queue/processing/, a worker is training it
    PAUSED = "paused"  # in queue/processing/, checkpointed, waiting for resume
    DONE = "done"  # in queue/done/, a model version exists
    FAILED = "failed"  # in queue/failed/ with an error file (training failed)
    REJECTED = "rejected"  # in queue/failed/ with an error file (never admitted: bad input, duplicate)
    CANCELLED = "cancelled"  # in queue/failed/ with an error file: cancelled by a control request


class DaemonState(StrEnum):
    STARTING = "starting"
    IDLE = "idle"
    TRAINING = "training"
    PAUSED = "paused"
    DISK_FULL = "disk_full"  # intake and training wait for free space
    STOPPING = "stopping"
    STOPPED = "stopped"


class WorkerOutcome(StrEnum):
    """What a worker reports in runs/<job>/result.json when it exits."""

    COMPLETED = "completed"  # every step ran, final model saved
    INTERRUPTED = "interrupted"  # asked to stop (pause/stop); a checkpoint holds its progress
    FAILED = "failed"  # an error; the message says what


# Exit codes of the worker process, so the daemon can tell outcomes apart even without result.json.
EXIT_COMPLETED = 0
EXIT_FAILED = 1
EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: try again later
# EX_CANTCREAT: another worker holds the run folder's lock (trainbox/run_lock.py); this one wrote
# nothing and the job is not at fault: neither a crash nor an attempt, it waits for that worker to stop
EXIT_LOCKED = 73


class FailureClass(StrEnum):
    """Why a job failed; decides whether it is retried (see ``retryable``)."""

    BAD_INPUT = "bad_input"  # the data or its settings cannot work: never retried
    DUPLICATE = "duplicate"  # the same content was already trained
    PREFLIGHT = "preflight"  # a check before the first step says it cannot work: never retried
    OOM = "oom"  # out of memory even at micro-batch 1 (GPU), or the host's OOM killer
    NAN = "nan"  # non-finite loss or gradients after the allowed rollbacks
    DISK = "disk"  # not enough free space for a checkpoint
    KILLED = "killed"  # killed by a signal nobody asked for
    CRASH = "crash"  # any other exception
    # judged by the daemon, never reported by a worker: a hung worker cannot report its own hang, a
    # cancelled one does not know why it was stopped, and admission errors happen before any worker
    HANG = "hang"  # killed by the watchdog for a stale heartbeat, as many times as retries allow
    CANCELLED = "cancelled"  # cancelled by a control request (trainbox cancel, the API)
    INTERNAL = "internal"  # admission itself failed on this file (a bug, or a file built to break it)

    @property
    def retryable(self) -> bool:
        return self in (FailureClass.KILLED, FailureClass.CRASH, FailureClass.DISK, FailureClass.HANG)
