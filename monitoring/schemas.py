"""The API's response models: what each endpoint promises, and what its OpenAPI schema documents.

The status file models themselves (``DaemonStatus``, ``TrainingStatus``) are reused as they are, so
the API says exactly what the files say; everything else here is derived by ``monitoring/views.py``.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from trainbox.status import DaemonStatus, TrainingStatus


class DaemonView(BaseModel):
    liveness: str = Field(
        description="up: heartbeat fresh and process alive; stale: alive but no heartbeat lately (hung?); "
        "down: its process is gone without saying stopped; stopped: it stopped cleanly; absent: never ran here."
    )
    alive: bool = Field(description="liveness is up")
    heartbeat_age_s: float | None = None
    pid_alive: bool | None = None
    status: DaemonStatus | None = None


class TrainingView(BaseModel):
    status: TrainingStatus
    current: bool = Field(description="the daemon is running this job now (or has it paused)")
    active: bool = Field(description="a worker is alive and its phase is not final")
    heartbeat_age_s: float
    pid_alive: bool
    progress: float | None = Field(None, description="step / total_steps, 0-1")


class StatusResponse(BaseModel):
    time: float
    daemon: DaemonView
    training: TrainingView | None = Field(None, description="the last training.json, current or not")
    queue: dict[str, int] = Field(description="files per spool folder, counted now: high, normal, low, ...")
    pending_controls: list[str] = Field(description="control requests not yet applied, oldest first")


class QueueItem(BaseModel):
    job_id: int
    name: str = Field(description="the file name as dropped")
    file: str = Field(description="the name inside the spool")
    priority: str
    position: int | None = Field(None, description="1 = dispatched next (waiting jobs only)")
    state: str
    size_bytes: int
    admitted_at: float | None = None
    n_records: int | None = None
    data_format: str | None = None


class FailedItem(BaseModel):
    job_id: int | None
    name: str
    file: str
    error_class: str = Field(description="bad_input, duplicate or training")
    reason: str
    time: float | None = None
    error: dict[str, Any] = Field(description="the whole <name>.error.json")


class DoneItem(BaseModel):
    job_id: int
    name: str
    finished_at: float | None = None
    version: int | None = None
    train_loss: float | None = None
    val_loss: float | None = None


class QueueResponse(BaseModel):
    waiting: list[QueueItem] = Field(
        description="in dispatch order (priority, then admission): at most `limit` jobs of each priority queue "
        "listed; `counts` has every queue's total"
    )
    next: dict[str, str | None] = Field(
        description="for each priority queue listed, the cursor to pass as after= for the rest of it; "
        "null when this response lists it to its end"
    )
    processing: list[QueueItem]
    failed: list[FailedItem] = Field(description="the newest `recent`, newest first")
    done: list[DoneItem] = Field(description="the newest `recent`, newest first")
    counts: dict[str, int] = Field(description="files per spool folder, counted now (all of them, not a page)")


class JobSummary(BaseModel):
    id: int
    name: str
    state: str
    priority: str
    lineage: str = Field("main", description="the chain of model versions the job continues")
    admitted_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    n_records: int = 0
    data_format: str = ""
    error: str | None = None
    duplicate_of: int | None = None
    init_version: int | None = None
    version: int | None = Field(None, description="the model version this job produced")


class JobsPage(BaseModel):
    items: list[JobSummary] = Field(description="newest first")
    next: int | None = Field(description="pass as before= for the next (older) page; null after the oldest job")


class RunView(BaseModel):
    id: int
    attempt: int
    pid: int | None
    started_at: float
    ended_at: float | None
    outcome: str | None
    exit_status: str | None
    start_step: int
    end_step: int | None
    init_model: str
    host: str | None = Field(None, description="fleet.host of the daemon that ran it (null: before fleets)")
    lease_generation: int | None = Field(
        None, description="the generation of the lineage lease it was started under (null: not in a fleet)"
    )


class CheckpointView(BaseModel):
    id: int
    step: int
    path: str
    created_at: float
    train_loss: float | None
    val_loss: float | None
    size_bytes: int
    deleted_at: float | None


class EventView(BaseModel):
    id: int
    time: float
    job_id: int | None
    kind: str
    message: str
    data: dict[str, Any]


class EventsPage(BaseModel):
    items: list[EventView] = Field(description="oldest first")
    newer: int | None = Field(
        description="pass as since_id= for the events after this page; null when none are there yet"
    )
    older: int | None = Field(description="pass as before_id= for the events before this page; null at the first")


class VersionView(BaseModel):
    id: int
    path: str
    parent_id: int | None
    job_id: int | None
    job_name: str | None = None
    base_model: str
    data_sha256: str
    train_loss: float | None
    val_loss: float | None
    steps: int
    created_at: float
    current: bool = Field(
        description="its lineage's current version (models/current, models/current@<lineage>): what the lineage's "
        "next job starts from"
    )
    lineage: str = Field("main", description="the chain of versions it belongs to (its job's lineage)")
    ancestors: list[int] = Field(description="parent, grandparent, ... (parent first)")
    trained_on: list[int] = Field(
        default_factory=list, description="the jobs whose files this version was trained on, oldest first"
    )
    memory_losses: dict[str, float | None] = Field(
        default_factory=dict,
        description="loss on each job's memory set (job id -> loss) as the eval gates scored it: the version x job "
        "matrix's row (issue 17)",
    )


class MetricsSummary(BaseModel):
    train_points: int
    eval_points: int
    last_step: int


class JobDetail(BaseModel):
    job: JobSummary
    settings: dict[str, Any] = Field(description="the sidecar's overrides")
    sha256: str
    spec: dict[str, Any] | None = Field(None, description="runs/<job>/job.json: what the worker was told to train")
    result: dict[str, Any] | None = Field(None, description="runs/<job>/result.json: how the last run ended")
    runs: list[RunView]
    checkpoints: list[CheckpointView]
    events: list[EventView]
    warnings: list[EventView] = Field(description="the job's events whose kind names a warning")
    phase_history: list[EventView] = Field(description="phase changes (the hybrid engine's phases)")
    model_version: VersionView | None
    error: dict[str, Any] | None = Field(None, description="queue/failed/<name>.error.json, when it failed")
    metrics: MetricsSummary


class MetricsResponse(BaseModel):
    job_id: int
    since: int
    last_step: int = Field(description="the highest step in the file; pass it as since= to page on")
    total_train_points: int = Field(description="train points after since, before downsampling")
    total_eval_points: int
    downsampled: bool
    train: list[dict[str, Any]] = Field(description='lines {"kind":"train","step","loss","lr","grad_norm",...}')
    eval: list[dict[str, Any]] = Field(description='lines {"kind":"eval","step","val_loss","time"}')
    predicted: list[list[float]] = Field(
        default_factory=list,
        description="the hybrid engine's latest fitted validation curve, [step, loss] pairs from its first fitted "
        "evaluation to the step it expects to stop at; empty with the plain engine or before the first fit",
    )


class ControlResponse(BaseModel):
    action: str
    file: str = Field(description="the control request written under control/")
    created: float


class FleetControlResponse(BaseModel):
    action: str
    host: str = Field(description="the host it addresses; empty: every host of the fleet")
    id: int = Field(description="the request's row in fleet_controls")


class UploadResponse(BaseModel):
    file: str = Field(description="the sanitised name it was given in the inbox")
    path: str = Field(description="where it was written, relative to the home")
    priority: str
    lineage: str = "main"
    bytes: int


class LineageLeaseView(BaseModel):
    """The ``lineage:<name>`` lease a host holds (management/fleet_view.py): its right to run that lineage's job."""

    name: str = Field(description="the lineage")
    job_id: int | None = Field(None, description="the job it was taken for")
    generation: int = Field(description="the fencing token: grows by one each time a host takes the lease")
    expires_at: float
    expires_in_s: float = Field(description="seconds left; negative: expired that long ago")
    expired: bool = Field(description="its holder stopped renewing (dead or cut off): another host may resume the job")


class NodeView(BaseModel):
    """The ``node:<run>:<k>`` lease a host holds (daemon/node_join.py): it runs node k of another host's
    multi-node run."""

    job_id: int | None = Field(None, description="the multi-node job")
    run_id: int = Field(description="the run (one worker start on the claiming host) it joined")
    node: int = Field(description="its node, 1 .. nnodes - 1 (the claiming host is node 0)")


class HostView(BaseModel):
    """One daemon of the fleet sharing this model DB (issue 18; management/fleet.py ``describe``)."""

    name: str = Field(description="its fleet.host, unique in the fleet")
    liveness: str = Field(description="alive: beat within 3 x heartbeat_seconds; stale: silent longer; stopped: exited")
    state: str = Field(description="its last reported state: starting, idle, training, paused, disk_full, stopping...")
    heartbeat_age_s: float
    heartbeat_seconds: float = Field(description="how often it promised to beat")
    job_id: int | None = Field(None, description="the job its worker trains (or that it is a node of)")
    paused: bool
    pid: int
    version: str = Field(description="its trainbox version")
    home: str = Field(description="its home folder on its own machine (display only)")
    gpu: str = Field(description="its GPUs in a few words; empty without")
    started_at: float
    stopped_at: float | None = None
    lineage: LineageLeaseView | None = Field(None, description="the lineage lease it holds (live, else its last)")
    node: NodeView | None = Field(None, description="the node of another host's multi-node run it runs")
    leader: bool = Field(False, description="it holds the fleet's leadership (admits files, repairs at start)")
    retention: bool = Field(False, description="its retention process is the fleet's one that deletes")


class FleetResponse(BaseModel):
    time: float
    hosts: list[HostView] = Field(description="every daemon that joined, by name; stopped and stale ones included")
    leader: str | None = Field(None, description="the host holding the leader lease; null: none now")
    retention: str | None = Field(None, description="the host whose retention holds the retention lease; null: none")
