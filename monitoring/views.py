"""What the API shows, built from the files (the truth about where jobs are) and the model DB
(the record of what happened). Every function here only reads.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from management import fleet_view
from management.db import Event, Job, ModelDB, ModelVersion, display_url
from management.memory_matrix import memory_matrix
from management.versions import starting_version
from monitoring import queries
from monitoring.metrics_log import MetricsCache
from monitoring.schemas import (
    CheckpointView,
    DaemonView,
    EventsPage,
    EventView,
    FailedItem,
    FleetResponse,
    JobDetail,
    JobsPage,
    JobSummary,
    MetricsSummary,
    RunView,
    StatusResponse,
    TrainingView,
    VersionView,
)
from trainbox import control
from trainbox.atomic import read_json
from trainbox.home import Home
from trainbox.jobspec import JOB_SPEC, RESULT
from trainbox.spool import Spool, job_id_of
from trainbox.status import (
    DAEMON_STATUS,
    TRAINING_STATUS,
    DaemonStatus,
    TrainingStatus,
    daemon_liveness,
    pid_alive,
    read_status,
)

FINAL_PHASES = {"finished", "interrupted", "failed"}
METRICS_FILE = "metrics.jsonl"
ERROR_SUFFIX = ".error.json"


def _safe_status(path: Path, model: Any) -> Any:
    try:
        return read_status(path, model)
    except (ValueError, OSError):  # a file from a foreign writer, or unreadable: no status rather than a 500
        return None


def daemon_view(home: Home, poll_interval: float, now: float) -> DaemonView:
    st: DaemonStatus | None = _safe_status(home.status / DAEMON_STATUS, DaemonStatus)
    if st is None:
        return DaemonView(liveness="absent", alive=False)
    age = max(0.0, now - st.heartbeat)
    alive_pid = pid_alive(st.pid)
    liveness = daemon_liveness(st, now, poll_interval)
    return DaemonView(
        liveness=liveness, alive=liveness == "up", heartbeat_age_s=round(age, 3), pid_alive=alive_pid, status=st
    )


def training_view(home: Home, daemon: DaemonView, now: float) -> TrainingView | None:
    st: TrainingStatus | None = _safe_status(home.status / TRAINING_STATUS, TrainingStatus)
    if st is None:
        return None
    alive = pid_alive(st.pid)
    current = daemon.status is not None and daemon.status.current_job == st.job_id
    progress = min(1.0, st.step / st.total_steps) if st.total_steps > 0 else None
    return TrainingView(
        status=st,
        current=current,
        active=alive and st.phase not in FINAL_PHASES,
        heartbeat_age_s=round(max(0.0, now - st.heartbeat), 3),
        pid_alive=alive,
        progress=progress,
    )


def status(home: Home, spool: Spool, poll_interval: float) -> StatusResponse:
    now = time.time()
    daemon = daemon_view(home, poll_interval, now)
    return StatusResponse(
        time=now,
        daemon=daemon,
        training=training_view(home, daemon, now),
        queue=spool.counts(),
        pending_controls=[r.describe() for r in control.pending(home.control)],
    )


def _read_error(path: Path) -> dict[str, Any] | None:
    try:
        data = read_json(path)
    except (ValueError, OSError):
        return None
    return data if isinstance(data, dict) else None


def failed_item(path: Path, mtime: float) -> FailedItem:
    """One ``failed/<name>.error.json`` as the queue lists it; an unreadable one still shows, as such."""
    data = _read_error(path)
    if data is None:
        data = {"reason": "unreadable error file"}
    file = str(data.get("file") or path.name[: -len(ERROR_SUFFIX)])
    job_id = data.get("job_id")
    recorded = data.get("time")
    return FailedItem(
        job_id=job_id if isinstance(job_id, int) and not isinstance(job_id, bool) else job_id_of(file),
        name=file.partition("__")[2] or file,
        file=file,
        error_class=str(data.get("class", "")),
        reason=str(data.get("reason", "")),
        time=recorded if isinstance(recorded, int | float) and not isinstance(recorded, bool) else mtime,
        error=data,
    )


def error_of_job(home: Home, job_id: int) -> dict[str, Any] | None:
    for path in sorted(home.failed.glob(f"{job_id:06d}__*{ERROR_SUFFIX}")) if home.failed.is_dir() else []:
        return _read_error(path)
    return None


def job_summary(job: Job, version: ModelVersion | None) -> JobSummary:
    return JobSummary(
        id=job.id,
        name=job.name,
        state=job.state,
        priority=job.priority,
        lineage=job.lineage,
        admitted_at=job.admitted_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        n_records=job.n_records,
        data_format=job.data_format,
        error=job.error,
        duplicate_of=job.duplicate_of,
        init_version=job.init_version,
        version=version.id if version else None,
    )


def jobs(db: ModelDB, state: str | None, limit: int, before: int | None) -> JobsPage:
    """One page, newest first; one row more than asked for tells whether there is a next page."""
    rows = queries.jobs(db, state, limit + 1, before)
    more = len(rows) > limit
    rows = rows[:limit]
    versions = queries.versions_by_job(db, [j.id for j in rows])
    return JobsPage(items=[job_summary(j, versions.get(j.id)) for j in rows], next=rows[-1].id if more else None)


def events(db: ModelDB, since_id: int | None, before_id: int | None, job_id: int | None, limit: int) -> EventsPage:
    """A page of events, oldest first, with the cursors to either side of it."""
    items = [event_view(e) for e in queries.events(db, since_id, limit, job_id, before_id)]
    if items:
        first, last = items[0].id, items[-1].id
        newer = last if queries.event_exists(db, job_id, above=last) else None
        older = first if queries.event_exists(db, job_id, below=first) else None
    else:
        newer = None
        older = before_id if before_id is not None and queries.event_exists(db, job_id, below=before_id) else None
    return EventsPage(items=items, newer=newer, older=older)


def event_view(e: Event) -> EventView:
    return EventView(id=e.id, time=e.time, job_id=e.job_id, kind=e.kind, message=e.message, data=e.data or {})


def _ancestors(version_id: int, parents: dict[int, int | None]) -> list[int]:
    out: list[int] = []
    seen = {version_id}
    parent = parents.get(version_id)
    while parent is not None and parent not in seen:  # a cycle would be a DB bug: stop rather than loop
        out.append(parent)
        seen.add(parent)
        parent = parents.get(parent)
    return out


def models(home: Home, db: ModelDB, lineage: str | None = None) -> list[VersionView]:
    """Newest first; ``lineage``: that lineage's only."""
    versions = db.versions(lineage=lineage)
    parents = {v.id: v.parent_id for v in versions}
    names = {
        j.id: j.name for j in queries.jobs_by_id(db, [v.job_id for v in versions if v.job_id is not None]).values()
    }
    current = _current_ids(home, db, {v.lineage for v in versions})
    matrix = {r.version: r for r in memory_matrix(db, lineage).rows}
    out = []
    for v in reversed(versions):
        view = version_view(v, parents, names, current)
        if (row := matrix.get(v.id)) is not None:
            view.trained_on, view.memory_losses = row.trained_on, row.losses
        out.append(view)
    return out


def _current_ids(home: Home, db: ModelDB, lineages: Iterable[str]) -> set[int]:
    """What each lineage's next job starts from (its pointer; before the pointer existed, its newest)."""
    starts = (starting_version(home, db, name) for name in set(lineages))
    return {start.id for start in starts if start is not None}


def version_view(
    v: ModelVersion, parents: dict[int, int | None], names: dict[int, str], current: set[int]
) -> VersionView:
    return VersionView(
        id=v.id,
        path=v.path,
        parent_id=v.parent_id,
        job_id=v.job_id,
        job_name=names.get(v.job_id) if v.job_id is not None else None,
        base_model=v.base_model,
        data_sha256=v.data_sha256,
        train_loss=v.train_loss,
        val_loss=v.val_loss,
        steps=v.steps,
        created_at=v.created_at,
        current=v.id in current,
        lineage=v.lineage,
        ancestors=_ancestors(v.id, parents),
    )


def _json_file(path: Path) -> dict[str, Any] | None:
    try:
        data = read_json(path)
    except (ValueError, OSError):
        return None
    return data if isinstance(data, dict) else None


def _spec(run_dir: Path) -> dict[str, Any] | None:
    """job.json as the API shows it: the DB URL the worker needs may hold a password."""
    spec = _json_file(run_dir / JOB_SPEC)
    if spec is not None and isinstance(spec.get("db_url"), str):
        spec["db_url"] = display_url(spec["db_url"])
    return spec


def job_detail(home: Home, db: ModelDB, cache: MetricsCache, job_id: int) -> JobDetail | None:
    job = db.job(job_id)
    if job is None:
        return None
    run_dir = home.run_dir(job_id)
    version = db.version_of_job(job_id)
    all_versions = db.versions()
    parents = {v.id: v.parent_id for v in all_versions}
    events = [event_view(e) for e in db.events(job_id=job_id)]
    series = cache.get(run_dir / METRICS_FILE)
    return JobDetail(
        job=job_summary(job, version),
        settings=job.settings or {},
        sha256=job.sha256,
        spec=_spec(run_dir),
        result=_json_file(run_dir / RESULT),
        runs=[RunView.model_validate(r, from_attributes=True) for r in db.runs(job_id)],
        checkpoints=[CheckpointView.model_validate(c, from_attributes=True) for c in db.checkpoints(job_id)],
        events=events,
        warnings=[e for e in events if "warn" in e.kind.lower()],
        phase_history=[e for e in events if e.kind.lower().startswith("phase")],
        model_version=version_view(version, parents, {job.id: job.name}, _current_ids(home, db, [version.lineage]))
        if version
        else None,
        error=error_of_job(home, job_id),
        metrics=MetricsSummary(
            train_points=len(series.train), eval_points=len(series.eval), last_step=series.last_step
        ),
    )


def fleet(db: ModelDB) -> FleetResponse:
    now = time.time()
    return FleetResponse.model_validate({"time": now, **fleet_view.read(db, now)})


def current_job_id(home: Home) -> int | None:
    """The job whose metrics are live: the daemon's current job, else the last training.json's."""
    d: DaemonStatus | None = _safe_status(home.status / DAEMON_STATUS, DaemonStatus)
    if d is not None and d.current_job is not None:
        return d.current_job
    t: TrainingStatus | None = _safe_status(home.status / TRAINING_STATUS, TrainingStatus)
    return t.job_id if t is not None else None


def dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), default=str)
