"""The read-only routes: status, queue, jobs, metrics, models, system, events, the SSE stream, /metrics.

Registered per app by ``router(read_requires_token)`` from one table, because whether reads need
the token is part of what the OpenAPI schema must declare, and that is fixed when the app is made.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import PlainTextResponse, StreamingResponse
from prometheus_client import generate_latest

from monitoring import prometheus, queries, queue_view, stream, views
from monitoring.auth import errors, read_guard
from monitoring.downsample import downsample
from monitoring.params import MAX_ID, MAX_STEP, JobIdPath, JobIdQuery, Limit, MaxPoints, StepSince
from monitoring.prometheus_history import read_history, step_seconds
from monitoring.schemas import (
    EventsPage,
    FleetResponse,
    JobDetail,
    JobsPage,
    MetricsResponse,
    QueueResponse,
    StatusResponse,
    VersionView,
)
from monitoring.state import ServerState, State
from monitoring.system import SystemInfo, read_system
from trainbox.states import JobState, Priority
from trainbox.status import DAEMON_STATUS, TRAINING_STATUS

RECENT = 50
QUEUE_PAGE = 100
STATE_HELP = "only jobs in this state: admitting, " + ", ".join(s.value for s in JobState)

Cursor = Annotated[
    str | None,
    Query(
        pattern=queue_view.CURSOR_PATTERN,
        description="continue a queue after this cursor (a previous response's next[priority]); opaque",
    ),
]


async def get_status(st: State) -> StatusResponse:
    """The daemon (liveness judged from heartbeat age and pid) and the last training status.

    Async on purpose: it reads two small files and counts a few folders (~0.2 ms), cheaper in the
    event loop than a hop through the thread pool, and it is the endpoint every client polls."""
    return views.status(st.home, st.spool, st.poll_interval)


def get_queue(
    st: State,
    limit: Limit = QUEUE_PAGE,
    priority: Annotated[Priority | None, Query(description="list only this queue")] = None,
    after: Cursor = None,
    recent: Annotated[int, Query(ge=1, le=1000, description="how many failed and done jobs")] = RECENT,
) -> QueueResponse:
    """Waiting jobs in dispatch order, at most ``limit`` per priority queue, with every queue's count
    and a cursor per queue for the rest; the one processing; the most recent failed and done."""
    try:
        cursor = queue_view.Cursor.parse(after) if after is not None else None
        return queue_view.queue(st.home, st.spool, st.db, recent, limit, priority, cursor)
    except queue_view.CursorError as e:
        raise HTTPException(400, str(e)) from None


def get_jobs(
    st: State,
    state: Annotated[str | None, Query(pattern=r"^[a-z_]{1,32}$", description=STATE_HELP)] = None,
    limit: Limit = 200,
    before: Annotated[int | None, Query(ge=1, le=MAX_ID, description="only jobs older than this id")] = None,
) -> JobsPage:
    """Jobs from the model DB, newest first, a page at a time (``next`` is the next page's ``before``)."""
    return views.jobs(st.db, state, limit, before)


def get_job(st: State, job_id: JobIdPath) -> JobDetail:
    """One job: its config (runs/<job>/job.json), runs, checkpoints, events, model version, error."""
    detail = views.job_detail(st.home, st.db, st.metrics, job_id)
    if detail is None:
        raise HTTPException(404, f"no job {job_id}")
    return detail


def get_metrics(st: State, job_id: JobIdPath, since: StepSince = -1, max_points: MaxPoints = 2000) -> MetricsResponse:
    """The job's metrics.jsonl, paged by step and downsampled on the server (min/max per bucket)."""
    path = st.home.run_dir(job_id) / views.METRICS_FILE
    if not path.exists() and st.db.job(job_id) is None:
        raise HTTPException(404, f"no job {job_id}")
    series = st.metrics.get(path)
    train, evals = series.train_since(since), series.eval_since(since)
    train_out = downsample(train, max_points, "loss")
    eval_out = downsample(evals, max_points, "val_loss")
    return MetricsResponse(
        job_id=job_id,
        since=since,
        last_step=series.last_step,
        total_train_points=len(train),
        total_eval_points=len(evals),
        downsampled=len(train_out) < len(train) or len(eval_out) < len(evals),
        train=train_out,
        eval=eval_out,
        predicted=series.predicted,
    )


def get_models(
    st: State,
    lineage: Annotated[str | None, Query(max_length=32, description="only this lineage's versions")] = None,
) -> list[VersionView]:
    """Model versions, newest first, each with its lineage, ancestors (parent, grandparent, ...) and losses."""
    return views.models(st.home, st.db, lineage)


def get_system(st: State) -> SystemInfo:
    """CPU, RAM and disk of the home's filesystem; GPUs via NVML, or gpu_state "no GPU: ..."."""
    return read_system(st.home.root, st.gpus)


def get_fleet(st: State) -> FleetResponse:
    """The daemons sharing this model DB: state, heartbeat age (alive, or stale past 3 beats), job, pid, version."""
    return views.fleet(st.db)


def get_events(
    st: State,
    since_id: Annotated[
        int | None, Query(ge=0, le=MAX_ID, description="only events with a larger id, oldest first")
    ] = None,
    before_id: Annotated[int | None, Query(ge=1, le=MAX_ID, description="only events with a smaller id")] = None,
    job_id: JobIdQuery = None,
    limit: Limit = 200,
) -> EventsPage:
    """Model DB events, oldest first: after since_id, else the newest ``limit`` (below before_id)."""
    return views.events(st.db, since_id, before_id, job_id, limit)


async def get_stream(
    request: Request,
    st: State,
    metrics_since: Annotated[
        int | None, Query(ge=-1, le=MAX_STEP, description="send the current job's metrics after this step")
    ] = None,
) -> StreamingResponse:
    """Server-Sent Events: status, metrics, events, reset (see monitoring/stream.py)."""
    return StreamingResponse(
        stream.event_stream(_sources(st), request.is_disconnected, metrics_since),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def get_prometheus(st: State) -> PlainTextResponse:
    """Prometheus text format: step, loss, val loss, tokens/s, queue depth, jobs by state, GPU memory (gauges);
    jobs by outcome, steps and tokens trained, gate verdicts, restarts (counters); step time (histogram)."""
    text = generate_latest(prometheus.registry_for(lambda: _reading(st)))
    return PlainTextResponse(text, media_type=prometheus.CONTENT_TYPE)


ROUTES: list[tuple[str, Callable[..., Any], dict[str, Any]]] = [
    ("/api/status", get_status, {"response_model": StatusResponse}),
    ("/api/queue", get_queue, {"response_model": QueueResponse, "responses": errors(400)}),
    ("/api/jobs", get_jobs, {"response_model": JobsPage}),
    ("/api/jobs/{job_id}", get_job, {"response_model": JobDetail, "responses": errors(404)}),
    ("/api/jobs/{job_id}/metrics", get_metrics, {"response_model": MetricsResponse, "responses": errors(404)}),
    ("/api/models", get_models, {"response_model": list[VersionView]}),
    ("/api/system", get_system, {"response_model": SystemInfo}),
    ("/api/events", get_events, {"response_model": EventsPage}),
    ("/api/fleet", get_fleet, {"response_model": FleetResponse}),
    (
        "/api/stream",
        get_stream,
        {
            "response_class": StreamingResponse,
            "responses": {200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}}},
        },
    ),
    (
        "/metrics",
        get_prometheus,
        {
            "response_class": PlainTextResponse,
            "responses": {200: {"content": {prometheus.CONTENT_TYPE: {"schema": {"type": "string"}}}}},
        },
    ),
]


def router(read_requires_token: bool) -> APIRouter:
    """The read routes, guarded by the token when ``read_requires_token``."""
    guard, guard_codes = read_guard(read_requires_token)
    r = APIRouter(dependencies=guard, tags=["read"], responses=errors(*guard_codes))
    for path, endpoint, options in ROUTES:
        r.add_api_route(path, endpoint, methods=["GET"], **options)
    return r


def _sources(st: ServerState) -> stream.StreamSources:
    def events_after(event_id: int) -> list[dict[str, Any]]:
        return [views.event_view(e).model_dump() for e in queries.events(st.db, event_id, 500)]

    return stream.StreamSources(
        watched=(st.home.status / DAEMON_STATUS, st.home.status / TRAINING_STATUS),
        status=lambda: views.status(st.home, st.spool, st.poll_interval).model_dump(mode="json"),
        current_job=lambda: views.current_job_id(st.home),
        metrics_file=lambda job: st.home.run_dir(job) / views.METRICS_FILE,
        series=st.metrics.get,
        events_after=events_after,
        last_event_id=lambda: queries.last_event_id(st.db),
        stopping=st.stopping,
        poll_s=st.stream_poll_s,
    )


def _reading(st: ServerState) -> prometheus.Reading:
    """One scrape: the gauges' snapshot, the DB's history, the current job's recent step times."""
    snapshot = _snapshot(st)
    seconds: list[float] = []
    if snapshot.job_id is not None:
        series = st.metrics.get(st.home.run_dir(snapshot.job_id) / views.METRICS_FILE)
        seconds = step_seconds(series.train)
    return prometheus.Reading(snapshot, read_history(st.db), seconds)


def _snapshot(st: ServerState) -> prometheus.Snapshot:
    s = views.status(st.home, st.spool, st.poll_interval)
    t = s.training.status if s.training is not None and (s.training.current or s.training.active) else None
    return prometheus.Snapshot(
        daemon_up=s.daemon.alive,
        job_id=t.job_id if t else None,
        step=t.step if t else None,
        total_steps=t.total_steps if t else None,
        loss=t.loss if t else None,
        val_loss=t.val_loss if t else None,
        learning_rate=t.learning_rate if t else None,
        tokens_per_second=t.tokens_per_s if t else None,
        queue_depth={p.value: s.queue.get(p.value, 0) for p in Priority},
        jobs=queries.job_counts(st.db),
        gpus=[
            prometheus.GpuReading(
                g.index,
                g.name,
                g.memory_used_bytes,
                g.memory_total_bytes,
                g.utilization_percent / 100 if g.utilization_percent is not None else None,
            )
            for g in st.gpus.read()
        ],
    )
