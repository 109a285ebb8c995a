"""``runs/job-N/data-stats.json``: what the worker found in a job's data, for the job report.

The worker writes it once the data is encoded (``core/loading.py``); the report's diagnosis
(``management/diagnosis.py``) reads it. Counts only, never the data itself: the report may be served
to anyone who can read the dashboard. ``example_losses`` is filled in after training when the worker
scored the training examples under its final model.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from trainbox.atomic import atomic_write_json, read_json

DATA_STATS = "data-stats.json"
SHORT_TOKENS = 2  # an example training on at most this many tokens counts as very short


class ExampleLoss(BaseModel):
    line: int = Field(description="line of the data file (1-based)")
    loss: float = Field(description="mean loss per trained token under the final model")


class ExampleLosses(BaseModel):
    """Training examples scored under the final model; those far above the rest were never learned."""

    scored: int = Field(description="examples scored (the first ones of the training set, up to a cap)")
    median: float
    p25: float = Field(description="lower quartile of the losses")
    p75: float = Field(description="upper quartile of the losses")
    threshold: float = Field(description="max(p75 + 3 x (p75 - p25), median + 1.5): above it, never learned")
    never_learned: list[ExampleLoss] = Field(default_factory=list, description="worst first, at most 200")


class DataStats(BaseModel):
    model_config = ConfigDict(extra="ignore")

    records: int = Field(0, description="lines read from the data file")
    train_examples: int = Field(0, description="training examples kept after encoding")
    val_examples: int = Field(0, description="validation examples kept")
    dropped: int = Field(0, description="training examples with nothing to train within max_length")
    truncated: int = Field(0, description="training examples longer than max_length (cut)")
    longest: int = Field(0, description="tokens of the longest training example before cutting")
    duplicates: int = Field(0, description="training examples identical (as tokens) to an earlier one")
    short: int = Field(0, description="training examples that train on at most short_tokens tokens")
    short_tokens: int = SHORT_TOKENS
    example_losses: ExampleLosses | None = None

    def save(self, run_dir: Path) -> None:
        atomic_write_json(Path(run_dir) / DATA_STATS, self.model_dump(mode="json"))

    @classmethod
    def load(cls, run_dir: Path) -> DataStats | None:
        """None when absent or unreadable: a report is written without it."""
        try:
            data = read_json(Path(run_dir) / DATA_STATS)
            return None if data is None else cls.model_validate(data)
        except ValueError:
            return None
