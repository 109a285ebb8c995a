"""The engine's exception types, in one place so the worker can name them in result.json.

A ``JobFailure`` carries what the daemon's error file needs: the failure class (see
``trainbox.states.FailureClass``), the evidence (numbers) and the fix a person can apply. ``short_error``
is how the best-effort writers (status file, DB) log the errors they swallow.
"""

from __future__ import annotations

from typing import Any


class JobFailure(RuntimeError):
    """A failure the worker can explain; subclasses set the class."""

    failure_class = "crash"

    def __init__(self, message: str, *, evidence: dict[str, Any] | None = None, fix: str = "") -> None:
        super().__init__(message)
        self.evidence: dict[str, Any] = evidence or {}
        self.fix = fix


class DataError(ValueError):
    """The job's data cannot be trained on (a bad line, nothing left after truncation, a chat template
    that does not render turn by turn, ...). The message says what to change."""

    def __init__(
        self,
        message: str,
        *,
        evidence: dict[str, Any] | None = None,
        fix: str = "",
        failure_class: str = "bad_input",
    ) -> None:
        super().__init__(message)
        self.evidence: dict[str, Any] = evidence or {}
        self.fix = fix
        self.failure_class = failure_class


class CheckpointError(RuntimeError):
    """A checkpoint folder that cannot be used to resume (unknown format version, missing files)."""


class PreflightError(JobFailure):
    """A check before the first step says the job cannot work (settings, model, device, memory)."""

    failure_class = "preflight"


class OutOfMemory(JobFailure):
    """Out of memory even at micro-batch 1 (or evaluation batch 1)."""

    failure_class = "oom"


class TrainingDiverged(JobFailure):
    """The loss or gradients stayed NaN/infinite through the allowed rollbacks, or could not be rolled back."""

    failure_class = "nan"


class DiskFull(Exception):
    """Not enough free space for a save, even after deleting this run's older checkpoints.

    Not a failure: the worker exits interrupted (75) with ``pause_reason = "disk full"``; nothing was
    written, so the newest complete checkpoint stays valid and the job resumes when space returns."""

    def __init__(self, what: str, needed: int, free: int, path: str, margin: int) -> None:
        super().__init__(
            f"not enough disk space for the {what}: needs {needed / 1e6:.1f} MB + {margin / 1e6:.1f} MB margin, "
            f"{free / 1e6:.1f} MB free in {path}"
        )
        self.what, self.needed, self.free, self.path, self.margin = what, needed, free, path, margin

    @property
    def evidence(self) -> dict[str, Any]:
        return {
            "what": self.what,
            "needed_bytes": self.needed,
            "margin_bytes": self.margin,
            "free_bytes": self.free,
            "path": self.path,
        }


def short_error(e: Exception) -> str:
    """An error for a log line that must stay one line: SQLAlchemy's messages append the SQL and parameters."""
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
