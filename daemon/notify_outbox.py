"""Notifications: which DB events a person is told about, what the message says, and the outbox on disk.

The DB's ``events`` table is the source: every outcome worth a notification is already an event there,
written once by the code that decided it (a job filed as failed, a gate's verdict, a disk-full pause, a
daemon's unclean death noticed by its successor). A notification's id is made from its event's id, so
reading the same events again after a crash writes the same outbox files, never new ones: a restart neither
loses a notification (the cursor only moves after its files are written) nor makes a second one.

Everything here is pure (events in, messages out) or a small file operation on ``<home>/outbox/``:
``pending/<id>.json`` waits for delivery (written atomically, rewritten with each failed try), a delivered
one is deleted, ``given-up/<id>.json`` keeps one that failed ``notify.max_attempts`` times.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, ValidationError

from trainbox.atomic import atomic_write_json, read_json
from trainbox.config import ServerConfig, WebhookConfig
from trainbox.states import DaemonState
from trainbox.status import DaemonStatus

log = logging.getLogger("trainbox.notify")

OUTBOX = "outbox"
PENDING = "pending"
GIVEN_UP = "given-up"
CURSOR = "cursor.json"
DAEMON_CRASHED = "daemon_crashed"  # the DB event a daemon writes when its predecessor died uncleanly
GIVEN_UP_EVENT = "notification_given_up"
REPORT_FILE = "report.md"  # written by the job report (issue 19); linked whether or not it exists yet
SOURCE_KINDS = (
    "job_failed",
    "spool_reconciled",
    "version_promoted",
    "version_not_promoted",
    "job_paused",
    "job_disk_full",
    DAEMON_CRASHED,
)


@dataclass(frozen=True)
class EventFacts:
    """One DB event, as plain values."""

    id: int
    time: float
    kind: str
    job_id: int | None
    message: str
    data: dict[str, Any]


@dataclass(frozen=True)
class JobNumbers:
    """What a message says about the job an event is about (read from the DB when the event is read)."""

    id: int
    name: str
    state: str
    steps: int | None = None
    val_loss: float | None = None
    train_loss: float | None = None
    version: int | None = None
    failure_class: str | None = None


class OutboxEntry(BaseModel):
    """One notification for one URL: ``outbox/pending/<id>.json``."""

    model_config = ConfigDict(extra="forbid")

    id: str
    event: str
    url: str
    body: dict[str, Any]
    created_at: float
    attempts: int = 0
    next_at: float = 0.0
    last_error: str = ""


class OutboxCursor(BaseModel):
    """The newest DB event id whose notifications are in the outbox (``outbox/cursor.json``)."""

    model_config = ConfigDict(extra="forbid")

    event_id: int


def notification_kinds(ev: EventFacts) -> list[str]:
    """The notification events a DB event stands for. "done" is the gate's verdict on the job's version
    (given exactly once, and the moment the job is filed in done/); a failure filed by the next daemon's
    reconciliation (the daemon died between moving the file and writing its row) is "failed" too. A
    manual ``models promote`` also writes ``version_promoted`` but without ``promoted``: not a job's end."""
    if ev.kind == "job_failed":
        return ["failed"]
    if ev.kind == "spool_reconciled" and ev.data.get("state") == "failed":
        return ["failed"]
    if ev.kind in ("version_promoted", "version_not_promoted") and "promoted" in ev.data:
        return ["done"] if ev.data["promoted"] else ["done", "gate_refused"]
    if ev.kind == "job_paused":
        return ["paused"]
    if ev.kind == "job_disk_full":
        return ["disk_full"]
    if ev.kind == DAEMON_CRASHED:
        return ["daemon_crash"]
    return []


def unclean_exit(previous: DaemonStatus | None) -> str | None:
    """Why the previous daemon's end was unclean, or None. A daemon that stops (or fails with an exception)
    writes ``stopped`` last; any other state in its status file means it was killed or the machine went
    down. Read once the instance lock is ours, so the daemon that wrote it is gone."""
    if previous is None or previous.state == DaemonState.STOPPED:
        return None
    return (
        f"the previous daemon (pid {previous.pid}) ended without stopping: its last heartbeat said "
        f"{previous.state.value}" + (f", training job {previous.current_job}" if previous.current_job else "")
    )


def server_base(notify_url: str, server: ServerConfig) -> str:
    """The status server's base URL for report links: ``notify.server_url``, else ``[server]`` when its
    port is fixed (0 picks a free port nobody can know from the configuration)."""
    if notify_url:
        return notify_url.rstrip("/")
    if server.port == 0:
        return ""
    host = server.host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"  # bound everywhere: the loopback address reaches it from this machine
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{server.port}"


def redact(url: str) -> str:
    """A webhook URL as logs and events show it: scheme and host only (a Slack URL's path is its secret)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or '?'}" + (f":{parts.port}" if parts.port else "")


def _summary(kind: str, ev: EventFacts, job: JobNumbers | None) -> str:
    if kind == "daemon_crash":
        return f"trainbox daemon restarted after a crash: {ev.message}"
    who = f"job {job.id} ({job.name})" if job else f"job {ev.job_id}"
    numbers = []
    if job is not None:
        if job.steps is not None:
            numbers.append(f"{job.steps} steps")
        if job.val_loss is not None:
            numbers.append(f"val loss {job.val_loss:.4g}")
        if job.version is not None:
            numbers.append(f"model version {job.version}")
    tail = f" ({', '.join(numbers)})" if numbers else ""
    verb = {
        "done": "done",
        "failed": "failed",
        "paused": "paused",
        "gate_refused": "trained, but its version was not promoted",
        "disk_full": "paused: disk full",
    }[kind]
    return f"trainbox: {who} {verb}{tail}: {ev.message}"


def build_body(kind: str, ev: EventFacts, job: JobNumbers | None, report_path: str, server: str) -> dict[str, Any]:
    """The JSON a webhook receives: the job, the outcome, the key numbers, links to the report, and a
    Slack-compatible ``text``."""
    report_url = f"{server}/jobs/{job.id}/report" if (server and job is not None) else None
    text = _summary(kind, ev, job)
    link = report_url or report_path
    if link:
        text += f"\nReport: {link}"
    outcome = kind
    if kind == "done":
        outcome = "promoted" if ev.data.get("promoted") else "not promoted"
    elif job is not None and kind == "failed":
        outcome = f"failed ({job.failure_class or ev.data.get('failure_class') or 'unknown'})"
    return {
        "event": kind,
        "time": ev.time,
        "event_id": ev.id,
        "outcome": outcome,
        "message": ev.message,
        "job": None
        if job is None
        else {"id": job.id, "name": job.name, "state": job.state, "failure_class": job.failure_class},
        "numbers": None
        if job is None
        else {"steps": job.steps, "val_loss": job.val_loss, "train_loss": job.train_loss, "version": job.version},
        "report": {"path": report_path or None, "url": report_url},
        "text": text,
    }


def entry_id(event_id: int, kind: str, url: str) -> str:
    """Stable across restarts: the same event, notification and URL always name the same file."""
    digest = hashlib.sha256(url.encode()).hexdigest()[:10]
    return f"{event_id:012d}-{kind}-{digest}"


def entries_for(
    ev: EventFacts,
    job: JobNumbers | None,
    hooks: list[WebhookConfig],
    run_dir: Path | None,
    server: str,
) -> list[OutboxEntry]:
    """The outbox entries of one DB event: one per notification kind and URL that wants it."""
    out = []
    for kind in notification_kinds(ev):
        report = str(run_dir / REPORT_FILE) if run_dir is not None else ""
        body = build_body(kind, ev, job, report, server)
        for hook in hooks:
            if kind in hook.events:
                nid = entry_id(ev.id, kind, hook.url)
                out.append(OutboxEntry(id=nid, event=kind, url=hook.url, body={"id": nid, **body}, created_at=ev.time))
    return out


def retry_delay(attempts: int, base: float, cap: float) -> float:
    """Seconds to wait after the ``attempts``-th failed try: ``base``, doubling, at most ``cap``."""
    return min(cap, base * 2 ** max(0, attempts - 1))


class Outbox:
    """The files of ``<home>/outbox/``; each write atomic (``trainbox/atomic.py``)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.pending = root / PENDING
        self.given_up = root / GIVEN_UP

    def sweep(self) -> None:
        """Temp files of writes a kill interrupted (``trainbox/atomic.py`` names them ``.<name>.*.tmp``)."""
        for folder in (self.root, self.pending, self.given_up):
            for tmp in folder.glob(".*.tmp") if folder.is_dir() else []:
                tmp.unlink(missing_ok=True)

    def cursor(self) -> int | None:
        raw = read_json(self.root / CURSOR)
        try:
            return OutboxCursor.model_validate(raw).event_id if raw is not None else None
        except ValidationError:
            log.warning("outbox cursor unreadable: starting after the newest event")
            return None

    def set_cursor(self, event_id: int) -> None:
        atomic_write_json(self.root / CURSOR, OutboxCursor(event_id=event_id).model_dump())

    def known(self, nid: str) -> bool:
        return (self.pending / f"{nid}.json").exists() or (self.given_up / f"{nid}.json").exists()

    def put(self, entry: OutboxEntry) -> None:
        atomic_write_json(self.pending / f"{entry.id}.json", entry.model_dump(mode="json"))

    def due(self, now: float) -> list[OutboxEntry]:
        """Pending entries whose time has come, oldest event first; an unreadable file is set aside."""
        out = []
        for path in sorted(self.pending.glob("*.json")) if self.pending.is_dir() else []:
            try:
                entry = OutboxEntry.model_validate(read_json(path))
            except (ValidationError, ValueError, OSError) as e:
                log.warning("outbox file %s unreadable (%s): set aside", path.name, e)
                self.given_up.mkdir(parents=True, exist_ok=True)
                path.replace(self.given_up / path.name)
                continue
            if entry.next_at <= now:
                out.append(entry)
        return out

    def delivered(self, entry: OutboxEntry) -> None:
        (self.pending / f"{entry.id}.json").unlink(missing_ok=True)

    def give_up(self, entry: OutboxEntry) -> None:
        atomic_write_json(self.given_up / f"{entry.id}.json", entry.model_dump(mode="json"))
        (self.pending / f"{entry.id}.json").unlink(missing_ok=True)

    def counts(self) -> dict[str, int]:
        return {
            name: len(list(folder.glob("*.json"))) if folder.is_dir() else 0
            for name, folder in ((PENDING, self.pending), (GIVEN_UP, self.given_up))
        }
