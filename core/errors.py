"""The engine's exception types, in one place so the worker can name them in result.json."""

from __future__ import annotations


class DataError(ValueError):
    """The job's data cannot be trained on (nothing left after truncation, a chat template that
    does not render turn by turn, ...). The message says what to change."""


class CheckpointError(RuntimeError):
    """A checkpoint folder that cannot be used to resume (unknown format version, missing files)."""


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm became NaN or infinite; continuing would corrupt the weights."""
