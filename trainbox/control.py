"""Control requests: small JSON files under ``control/``, so the CLI (and later the HTTP server)
can steer the daemon whether or not it is running. The daemon applies them in the order written and
deletes each once applied; until then ``trainbox status`` lists them as pending.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from trainbox.atomic import atomic_write_json, read_json
from trainbox.states import Priority


class Action(StrEnum):
    PAUSE = "pause"  # checkpoint the running job, dispatch nothing until resume
    RESUME = "resume"  # undo pause; the paused job continues first
    STOP = "stop"  # checkpoint the running job, then the daemon exits
    CANCEL = "cancel"  # a waiting, training or paused job goes to failed/ as cancelled (job_id)
    PRIORITIZE = "prioritize"  # a waiting job moves to another priority queue (job_id, priority)


DAEMON_ACTIONS = (Action.PAUSE, Action.RESUME, Action.STOP)  # the ones that take no job


@dataclass(frozen=True)
class ControlRequest:
    path: Path
    action: Action
    created: float
    job_id: int | None = None
    priority: Priority | None = None

    def describe(self) -> str:
        """'pause', 'cancel job 5', 'prioritize job 5 high': what ``status`` lists as pending."""
        words = [self.action.value]
        if self.job_id is not None:
            words.append(f"job {self.job_id}")
        if self.priority is not None:
            words.append(self.priority.value)
        return " ".join(words)


def submit(control_dir: Path, action: Action, job_id: int | None = None, priority: Priority | None = None) -> Path:
    """Write one request; the name sorts in submission order."""
    if (action in DAEMON_ACTIONS) != (job_id is None) or (action == Action.PRIORITIZE) != (priority is not None):
        raise ValueError(f"{action.value}: job_id is for cancel/prioritize only, priority for prioritize only")
    now = time.time()
    path = control_dir / f"{time.time_ns():020d}-{os.getpid()}-{action.value}.json"
    data: dict[str, object] = {"action": action.value, "created": now}
    if job_id is not None:
        data["job_id"] = job_id
    if priority is not None:
        data["priority"] = priority.value
    atomic_write_json(path, data)
    return path


def pending(control_dir: Path) -> list[ControlRequest]:
    """Requests not yet applied, oldest first. Unreadable or unknown ones are skipped (and kept)."""
    out: list[ControlRequest] = []
    if not control_dir.is_dir():
        return out
    for path in sorted(control_dir.glob("*.json")):
        try:
            data = read_json(path)
        except ValueError:
            continue
        if not isinstance(data, dict):
            continue
        try:
            job_id = data.get("job_id")
            priority = data.get("priority")
            out.append(
                ControlRequest(
                    path,
                    Action(str(data.get("action"))),
                    float(data.get("created", 0)),
                    int(job_id) if job_id is not None else None,
                    Priority(priority) if priority is not None else None,
                )
            )
        except (ValueError, TypeError):
            continue
    return out


def consume(request: ControlRequest) -> None:
    request.path.unlink(missing_ok=True)
