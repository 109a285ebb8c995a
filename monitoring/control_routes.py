"""The routes that steer: pause/resume/stop, cancel or reprioritise a waiting job, upload a JSONL.

Every one needs the bearer token. They only write where the CLI writes (``control/`` requests
through ``trainbox.control.submit``, and ``inbox/``), so the daemon stays the one that acts, and a
server with no daemon behind it just leaves requests for the next start.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request, Security

from management import fleet_controls
from monitoring.auth import errors, require_token
from monitoring.params import JobIdPath
from monitoring.schemas import ControlResponse, FleetControlResponse, UploadResponse
from monitoring.state import ServerState, State
from monitoring.upload import UploadError, checked_name, receive
from trainbox.control import Action, submit
from trainbox.lineage import MAIN, LineageError, check_lineage
from trainbox.states import Priority

router = APIRouter(dependencies=[Security(require_token)], tags=["control"], responses=errors(401))

# What POST /api/upload really reads: the raw body, streamed, whatever its content type (multipart
# is refused, because a form-encoded file would be saved with its form framing).
UPLOAD_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "The JSONL file itself as the raw body (not a multipart form), at most "
        "server.max_upload_bytes; any content type but multipart/* is accepted.",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


class DaemonAction(StrEnum):
    """The control actions that take no job (the path parameter of /api/control/{action})."""

    PAUSE = Action.PAUSE.value
    RESUME = Action.RESUME.value
    STOP = Action.STOP.value


@router.post("/api/control/{action}", response_model=ControlResponse)
def post_control(st: State, action: DaemonAction) -> ControlResponse:
    """Write a control request under control/, exactly as `trainbox pause|resume|stop` does."""
    path = submit(st.home.control, Action(action.value))
    return ControlResponse(action=action.value, file=path.name, created=path.stat().st_mtime)


@router.post("/api/fleet/{action}", response_model=FleetControlResponse, status_code=202)
def post_fleet_control(
    st: State,
    action: DaemonAction,
    host: Annotated[
        str | None, Query(max_length=64, description="one host of the fleet ([fleet] host); omitted: every host")
    ] = None,
) -> FleetControlResponse:
    """Pause, resume or stop one host of the fleet, or all of them, through the model DB (as `trainbox
    pause|resume|stop --host H | --fleet`): each daemon applies it within a heartbeat."""
    request_id = fleet_controls.submit(st.db, action.value, host or "")
    return FleetControlResponse(action=action.value, host=host or "", id=request_id)


@router.post("/api/jobs/{job_id}/cancel", response_model=ControlResponse, status_code=202, responses=errors(409))
def post_cancel(st: State, job_id: JobIdPath) -> ControlResponse:
    """Cancel a waiting job (as `trainbox cancel`): the daemon moves it to failed/ as cancelled."""
    return _job_control(st, job_id, Action.CANCEL, None)


@router.post("/api/jobs/{job_id}/priority", response_model=ControlResponse, status_code=202, responses=errors(409))
def post_priority(st: State, job_id: JobIdPath, priority: Priority) -> ControlResponse:
    """Move a waiting job to another priority queue (as `trainbox prioritize`)."""
    return _job_control(st, job_id, Action.PRIORITIZE, priority)


@router.post(
    "/api/upload",
    response_model=UploadResponse,
    status_code=201,
    responses=errors(400, 413, 415),
    openapi_extra=UPLOAD_BODY,
)
async def post_upload(
    request: Request,
    st: State,
    filename: Annotated[
        str | None, Query(description="the file's name: a plain name ending in .jsonl (no folders)")
    ] = None,
    priority: Priority = Priority.NORMAL,
    lineage: Annotated[
        str | None, Query(max_length=32, description="the chain of model versions it continues (default main)")
    ] = None,
) -> UploadResponse:
    """A JSONL as the raw request body, written into inbox/<priority>/ (inbox/<lineage>/<priority>/) for
    the daemon to admit."""
    if request.headers.get("content-type", "").startswith("multipart/"):
        raise HTTPException(415, "send the file as the raw request body, with ?filename=NAME.jsonl")
    try:
        name = checked_name(filename)
        folder = st.home.inbox
        if lineage is not None and lineage != MAIN:
            try:
                folder /= check_lineage(lineage)
            except LineageError as e:
                raise UploadError(422, str(e)) from None
        declared = request.headers.get("content-length", "")
        if declared.isascii() and declared.isdigit() and int(declared) > st.max_upload_bytes:
            raise UploadError(413, f"upload larger than the limit of {st.max_upload_bytes} bytes")
        path, size = await receive(request.stream(), folder / priority.value, name, st.max_upload_bytes)
    except UploadError as e:
        raise HTTPException(e.status, str(e)) from None
    where = str(path.relative_to(st.home.storage))
    return UploadResponse(file=path.name, path=where, priority=priority.value, lineage=lineage or MAIN, bytes=size)


def _job_control(st: ServerState, job_id: int, action: Action, priority: Priority | None) -> ControlResponse:
    """A waiting job can be cancelled or moved, a training or paused one (in processing/) cancelled; refuse
    others now rather than in the daemon."""
    folders = [st.home.waiting(p) for p in Priority]
    if action == Action.CANCEL:
        folders.append(st.home.processing)
    if st.spool.find_job(job_id, folders) is None:
        where = st.spool.find_job(job_id)
        what = "waiting or training" if action == Action.CANCEL else "waiting"
        raise HTTPException(409, f"job {job_id} is not {what}" + (f" (it is in {where.parent.name}/)" if where else ""))
    path = submit(st.home.control, action, job_id, priority)
    return ControlResponse(action=action.value, file=path.name, created=path.stat().st_mtime)
