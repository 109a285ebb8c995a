"""The two files between daemon and worker: what to train (job.json) and how it ended (result.json).

The daemon writes ``runs/<job>/job.json`` before each worker start; the worker writes
``runs/<job>/result.json`` as its last act. Both are self-describing, so a run folder alone tells
what was trained, from which model, with which settings, and how it ended.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from trainbox.atomic import atomic_write_json, read_json
from trainbox.config import TrainingConfig
from trainbox.states import WorkerOutcome

JOB_SPEC = "job.json"
RESULT = "result.json"
WORKER_LOG = "worker.log"  # the worker's stdout and stderr, each start after a "--- worker start" line


class ReplaySource(BaseModel):
    """An earlier job's kept training sample (``memory/<sha256>.jsonl``) this job may replay."""

    model_config = ConfigDict(extra="forbid")

    job_id: int
    sha256: str
    n_examples: int


class MemorySpec(BaseModel):
    """Where the job keeps its memory sets and with which caps, and the earlier jobs' training samples it
    replays (issue 17: ``management/memory.py``). Fixed at the job's first start, with the rest of the spec."""

    model_config = ConfigDict(extra="forbid")

    dir: str  # the home's memory/ folder
    eval_examples: int = 256
    train_examples: int = 512
    job_bytes: int = 8_000_000
    total_bytes: int = 512_000_000
    replay: list[ReplaySource] = []


class JobSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    job_id: int
    job_name: str
    data_file: str  # absolute path, inside queue/processing/
    eval_file: str | None = None  # absolute path to the job's own copy, or None: hold out a fraction
    init_model: str = ""  # folder to start from; "" = the embedded tiny model (built if missing)
    embedded_model_dir: str  # where the embedded model is cached
    run_dir: str
    status_file: str
    db_url: str
    training: TrainingConfig
    memory: MemorySpec | None = None  # None: keeps no memory sets and replays nothing (specs from before)

    def save(self) -> None:
        atomic_write_json(Path(self.run_dir) / JOB_SPEC, self.model_dump(mode="json"))

    @classmethod
    def load(cls, run_dir: Path) -> JobSpec:
        data = read_json(Path(run_dir) / JOB_SPEC)
        if data is None:
            raise FileNotFoundError(Path(run_dir) / JOB_SPEC)
        return cls.model_validate(data)


class WorkerResult(BaseModel):
    model_config = ConfigDict(extra="ignore")

    outcome: WorkerOutcome
    step: int = 0
    total_steps: int = 0
    final_model: str | None = None  # folder with the trained model, set when outcome is completed
    train_loss: float | None = None
    val_loss: float | None = None
    first_val_loss: float | None = None
    message: str = ""
    error_type: str = ""  # exception class name when outcome is failed
    # Why it failed, for the error file and retries (see FailureClass): bad_input, preflight, oom,
    # nan, disk, killed, crash; with the evidence (numbers) and the fix a person can apply.
    failure_class: str = ""
    evidence: dict[str, Any] = {}
    fix: str = ""
    # An interruption the worker chose itself (e.g. "disk full"), as opposed to a pause/stop request.
    pause_reason: str = ""
    # The micro-batch and accumulation it ended with (after any OOM back-off).
    micro_batch: int | None = None
    grad_accum: int | None = None
    # The folder the job started from, and whether final_model is a LoRA adapter on it (not a full model).
    base_model: str = ""
    adapter: bool = False

    def save(self, run_dir: Path) -> None:
        atomic_write_json(Path(run_dir) / RESULT, self.model_dump(mode="json"))

    @classmethod
    def load(cls, run_dir: Path) -> WorkerResult | None:
        data = read_json(Path(run_dir) / RESULT)
        return None if data is None else cls.model_validate(data)
