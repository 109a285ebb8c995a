"""Everything the job report says, gathered from the run folder, the spool and the model DB.

The only I/O of the report besides writing it: the sections, the diagnosis and the Markdown are pure
functions of the ``JobFacts`` made here. Each source may be missing (a job that failed while loading
has no metrics, one cancelled early no version): the fact is then None or empty, never an error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from management.db import ModelDB
from management.diagnosis import GateFacts
from management.report_sections import RunSpan
from management.run_series import Series, read_series
from trainbox import energy_log
from trainbox.config import TrainingConfig
from trainbox.data_stats import DataStats
from trainbox.energy_log import EnergyRecord
from trainbox.home import Home
from trainbox.jobspec import JobSpec, WorkerResult
from trainbox.spool import Spool
from trainbox.tracker_runs import TrackerRuns


@dataclass(frozen=True)
class PreviousJob:
    job_id: int
    name: str
    training: dict[str, Any]
    init_model: str


@dataclass
class JobFacts:
    job_id: int
    name: str = ""
    state: str = ""
    error: str = ""
    failure_class: str = ""
    admitted_at: float | None = None
    finished_at: float | None = None
    n_records: int = 0
    spec: JobSpec | None = None
    result: WorkerResult | None = None
    series: Series = field(default_factory=Series)
    stats: DataStats | None = None
    runs: list[RunSpan] = field(default_factory=list)
    checkpoint_times: list[tuple[int, float]] = field(default_factory=list)  # (step, time) of checkpoint events
    init_version: int | None = None
    version_id: int | None = None
    gate: GateFacts | None = None
    previous: PreviousJob | None = None
    hybrid: dict[str, Any] | None = None  # the last hybrid_summary event's numbers
    spool_file: Path | None = None
    energy: list[EnergyRecord] = field(default_factory=list)  # one per run that reached its training loop
    trackers: TrackerRuns = field(default_factory=TrackerRuns)  # the MLflow and W&B runs the worker logged to

    @property
    def cfg(self) -> TrainingConfig:
        return self.spec.training if self.spec is not None else TrainingConfig()


def load_spec(run_dir: Path) -> JobSpec | None:
    try:
        return JobSpec.load(run_dir)
    except (FileNotFoundError, ValueError, ValidationError):
        return None


def load_result(run_dir: Path) -> WorkerResult | None:
    try:
        return WorkerResult.load(run_dir)
    except (ValueError, ValidationError):
        return None


def previous_job(home: Home, job_id: int) -> PreviousJob | None:
    """The newest earlier job that got as far as a job.json (rejected files never do)."""
    ids = sorted(
        (int(p.name[4:]) for p in home.runs.glob("job-*") if p.name[4:].isdigit() and int(p.name[4:]) < job_id),
        reverse=True,
    )
    for other in ids[:200]:  # a bounded look back: far enough for any queue, cheap for a long history
        spec = load_spec(home.run_dir(other))
        if spec is not None:
            return PreviousJob(other, spec.job_name, spec.training.model_dump(mode="json"), spec.init_model)
    return None


def _gate(db: ModelDB, version_id: int) -> GateFacts | None:
    gates = db.gates(version_id)
    if not gates:
        return None
    g = gates[-1]
    return GateFacts(
        version_id, g.promoted, g.reason, g.new_loss, g.current_id, g.current_loss, g.tolerance, g.eval_set
    )


def gather(home: Home, db: ModelDB, job_id: int) -> JobFacts:
    run_dir = home.run_dir(job_id)
    facts = JobFacts(job_id=job_id)
    job = db.job(job_id)
    if job is not None:
        facts.name, facts.state, facts.error = job.name, job.state, job.error or ""
        facts.failure_class, facts.n_records = job.failure_class or "", job.n_records
        facts.admitted_at, facts.finished_at, facts.init_version = job.admitted_at, job.finished_at, job.init_version
    facts.spec = load_spec(run_dir)
    if facts.spec is not None and not facts.name:
        facts.name = facts.spec.job_name
    facts.result = load_result(run_dir)
    facts.series = read_series(run_dir)
    facts.energy = energy_log.read(run_dir)
    facts.trackers = TrackerRuns.load(run_dir)
    facts.stats = DataStats.load(run_dir)
    facts.runs = [RunSpan(r.attempt, r.started_at, r.ended_at, r.outcome or "") for r in db.runs(job_id)]
    for e in db.events(job_id):
        if e.kind == "checkpoint" and isinstance((e.data or {}).get("step"), int):
            facts.checkpoint_times.append((e.data["step"], e.time))
        elif e.kind == "hybrid_summary":
            facts.hybrid = dict(e.data or {})
    version = db.version_of_job(job_id)
    if version is not None and version.path:
        facts.version_id = version.id
        facts.gate = _gate(db, version.id)
    facts.previous = previous_job(home, job_id)
    facts.spool_file = Spool(home).find_job(job_id)
    return facts
