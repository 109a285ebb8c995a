"""The FastAPI app: routes over ``monitoring/views.py``, auth, uploads and the dashboard's static files.

Read-only towards training state: it reads status files, spool folders, run folders and the model
DB, and steers only through ``trainbox.control.submit`` (as the CLI does) and the inbox (uploads).
The DB engine lives in the lifespan, so each server process opens it once and closes it on exit.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, PlainTextResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles

from daemon.spool import Spool
from management.db import ModelDB
from monitoring import prometheus, queries, stream, views
from monitoring.downsample import downsample
from monitoring.metrics_log import MetricsCache
from monitoring.schemas import (
    ControlResponse,
    EventView,
    JobDetail,
    JobSummary,
    MetricsResponse,
    QueueResponse,
    StatusResponse,
    UploadResponse,
    VersionView,
)
from monitoring.system import Gpus, SystemInfo, prime_cpu_percent, read_system
from monitoring.token import bearer_matches, load_or_create_token
from monitoring.upload import UploadError, checked_name, receive
from trainbox.config import Settings
from trainbox.control import Action, submit
from trainbox.home import Home
from trainbox.states import Priority
from trainbox.status import DAEMON_STATUS, TRAINING_STATUS

STATIC = Path(__file__).parent / "static"
RECENT = 50


@dataclass
class ServerState:
    """Everything a request needs, built once per server in the lifespan."""

    home: Home
    settings: Settings
    spool: Spool
    db: ModelDB
    token: str
    gpus: Gpus
    metrics: MetricsCache = field(default_factory=MetricsCache)
    stopping: Callable[[], bool] = lambda: False
    stream_poll_s: float = 0.5
    upload_limit: int | None = None  # overrides server.max_upload_bytes (tests)

    @property
    def poll_interval(self) -> float:
        return self.settings.daemon.poll_interval

    @property
    def reads_need_token(self) -> bool:
        return self.settings.server.read_requires_token

    @property
    def max_upload_bytes(self) -> int:
        if self.upload_limit is not None:
            return self.upload_limit
        return self.settings.server.max_upload_bytes


def state(request: Request) -> ServerState:
    st: ServerState = request.app.state.server
    return st


State = Annotated[ServerState, Depends(state)]


def _unauthorized() -> HTTPException:
    return HTTPException(
        401,
        "a valid API token is required: Authorization: Bearer <token> (see `trainbox token`)",
        headers={"WWW-Authenticate": "Bearer"},
    )


def require_token(request: Request, st: State) -> None:
    if not bearer_matches(st.token, request.headers.get("authorization")):
        raise _unauthorized()


def require_read(request: Request, st: State, token: str | None = Query(None, include_in_schema=False)) -> None:
    """Reads are open unless ``server.read_requires_token``; then the header, or ``?token=`` for
    EventSource (which cannot send headers), must carry the token."""
    if not st.reads_need_token:
        return
    if bearer_matches(st.token, request.headers.get("authorization")):
        return
    if token is not None and bearer_matches(st.token, f"Bearer {token}"):
        return
    raise _unauthorized()


def create_app(
    home: Home,
    settings: Settings,
    stopping: Callable[[], bool] | None = None,
    max_upload_bytes: int | None = None,
) -> FastAPI:
    """The app for one home; ``stopping`` tells open streams the server is shutting down."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        gpus = Gpus()
        gpus.start()
        prime_cpu_percent()
        db = ModelDB(home.db_url)
        app.state.server = ServerState(
            home=home,
            settings=settings,
            spool=Spool(home),
            db=db,
            token=load_or_create_token(home),
            gpus=gpus,
            stopping=stopping or (lambda: False),
            upload_limit=max_upload_bytes,
        )
        try:
            yield
        finally:
            db.close()
            gpus.stop()

    app = FastAPI(
        title="trainbox status server",
        version="1",
        summary="Watch and steer one trainbox home: status, queue, jobs, metrics, models, system; control and upload.",
        lifespan=lifespan,
    )
    reads = [Depends(require_read)]

    @app.get("/api/status", response_model=StatusResponse, dependencies=reads, tags=["read"])
    async def get_status(st: State) -> StatusResponse:
        """The daemon (liveness judged from heartbeat age and pid) and the last training status.

        Async on purpose: it reads two small files and counts a few folders (~0.2 ms), cheaper in the
        event loop than a hop through the thread pool, and it is the endpoint every client polls."""
        return views.status(st.home, st.spool, st.poll_interval)

    @app.get("/api/queue", response_model=QueueResponse, dependencies=reads, tags=["read"])
    def get_queue(st: State, recent: int = Query(RECENT, ge=1, le=1000)) -> QueueResponse:
        """Waiting jobs in dispatch order, the one processing, and the most recent failed and done."""
        return views.queue(st.home, st.spool, st.db, recent)

    @app.get("/api/jobs", response_model=list[JobSummary], dependencies=reads, tags=["read"])
    def get_jobs(st: State, state: str | None = None, limit: int = Query(200, ge=1, le=10000)) -> list[JobSummary]:
        """Jobs from the model DB, newest first."""
        return views.jobs(st.db, state, limit)

    @app.get("/api/jobs/{job_id}", response_model=JobDetail, dependencies=reads, tags=["read"])
    def get_job(st: State, job_id: int) -> JobDetail:
        """One job: its config (runs/<job>/job.json), runs, checkpoints, events, model version, error."""
        detail = views.job_detail(st.home, st.db, st.metrics, job_id)
        if detail is None:
            raise HTTPException(404, f"no job {job_id}")
        return detail

    @app.get("/api/jobs/{job_id}/metrics", response_model=MetricsResponse, dependencies=reads, tags=["read"])
    def get_metrics(
        st: State,
        job_id: int,
        since: int = Query(-1, description="only points with a step above this"),
        max_points: int = Query(2000, ge=1, le=100_000, description="downsample each series to at most this"),
    ) -> MetricsResponse:
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
        )

    @app.get("/api/models", response_model=list[VersionView], dependencies=reads, tags=["read"])
    def get_models(st: State) -> list[VersionView]:
        """Model versions, newest first, each with its lineage (parent, grandparent, ...) and losses."""
        return views.models(st.db)

    @app.get("/api/system", response_model=SystemInfo, dependencies=reads, tags=["read"])
    def get_system(st: State) -> SystemInfo:
        """CPU, RAM and disk of the home's filesystem; GPUs via NVML, or gpu_state "no GPU: ..."."""
        return read_system(st.home.root, st.gpus)

    @app.get("/api/events", response_model=list[EventView], dependencies=reads, tags=["read"])
    def get_events(
        st: State,
        since_id: int | None = Query(None, description="only events with a larger id (oldest first)"),
        job_id: int | None = None,
        limit: int = Query(200, ge=1, le=5000),
    ) -> list[EventView]:
        """Model DB events, oldest first; without since_id, the newest ``limit`` of them."""
        return [views.event_view(e) for e in queries.events(st.db, since_id, limit, job_id)]

    @app.get(
        "/api/stream",
        dependencies=reads,
        tags=["read"],
        response_class=StreamingResponse,
        responses={200: {"content": {"text/event-stream": {}}}},
    )
    async def get_stream(request: Request, st: State, metrics_since: int | None = None) -> StreamingResponse:
        """Server-Sent Events: status, metrics, events, reset (see monitoring/stream.py)."""
        src = _sources(st)
        return StreamingResponse(
            stream.event_stream(src, request.is_disconnected, metrics_since),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @app.get("/metrics", response_class=PlainTextResponse, dependencies=reads, tags=["read"])
    def get_prometheus(st: State) -> PlainTextResponse:
        """Prometheus text format: step, loss, val loss, tokens/s, queue depth, jobs by state, GPU memory."""
        return PlainTextResponse(prometheus.render(_snapshot(st)), media_type=prometheus.CONTENT_TYPE)

    @app.post(
        "/api/control/{action}", response_model=ControlResponse, dependencies=[Depends(require_token)], tags=["control"]
    )
    def post_control(st: State, action: DaemonAction) -> ControlResponse:
        """Write a control request under control/, exactly as `trainbox pause|resume|stop` does."""
        path = submit(st.home.control, Action(action.value))
        return ControlResponse(action=action.value, file=path.name, created=path.stat().st_mtime)

    @app.post(
        "/api/jobs/{job_id}/cancel",
        response_model=ControlResponse,
        status_code=202,
        dependencies=[Depends(require_token)],
        tags=["control"],
    )
    def post_cancel(st: State, job_id: int) -> ControlResponse:
        """Cancel a waiting job (as `trainbox cancel`): the daemon moves it to failed/ as cancelled."""
        return _job_control(st, job_id, Action.CANCEL, None)

    @app.post(
        "/api/jobs/{job_id}/priority",
        response_model=ControlResponse,
        status_code=202,
        dependencies=[Depends(require_token)],
        tags=["control"],
    )
    def post_priority(st: State, job_id: int, priority: Priority) -> ControlResponse:
        """Move a waiting job to another priority queue (as `trainbox prioritize`)."""
        return _job_control(st, job_id, Action.PRIORITIZE, priority)

    @app.post(
        "/api/upload",
        response_model=UploadResponse,
        status_code=201,
        dependencies=[Depends(require_token)],
        tags=["control"],
    )
    async def post_upload(
        request: Request,
        st: State,
        filename: str | None = Query(None, description="the file's name; must end in .jsonl"),
        priority: Priority = Priority.NORMAL,
    ) -> UploadResponse:
        """A JSONL as the raw request body, written into inbox/<priority>/ for the daemon to admit."""
        if request.headers.get("content-type", "").startswith("multipart/"):
            raise HTTPException(415, "send the file as the raw request body, with ?filename=NAME.jsonl")
        try:
            name = checked_name(filename)
            declared = request.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > st.max_upload_bytes:
                raise UploadError(413, f"upload larger than the limit of {st.max_upload_bytes} bytes")
            path, size = await receive(request.stream(), st.home.inbox / priority.value, name, st.max_upload_bytes)
        except UploadError as e:
            raise HTTPException(e.status, str(e)) from None
        return UploadResponse(
            file=path.name, path=str(path.relative_to(st.home.root)), priority=priority.value, bytes=size
        )

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


class DaemonAction(StrEnum):
    """The control actions that take no job (the path parameter of /api/control/{action})."""

    PAUSE = Action.PAUSE.value
    RESUME = Action.RESUME.value
    STOP = Action.STOP.value


def _job_control(st: ServerState, job_id: int, action: Action, priority: Priority | None) -> ControlResponse:
    """Only a waiting job can be cancelled or moved: refuse others now rather than in the daemon."""
    if st.spool.find_job(job_id, [st.home.waiting(p) for p in Priority]) is None:
        where = st.spool.find_job(job_id)
        raise HTTPException(
            409, f"job {job_id} is not waiting" + (f" (it is in {where.parent.name}/)" if where else "")
        )
    path = submit(st.home.control, action, job_id, priority)
    return ControlResponse(action=action.value, file=path.name, created=path.stat().st_mtime)


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
