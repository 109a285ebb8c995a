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


class Action(StrEnum):
    PAUSE = "pause"  # checkpoint the running job, dispatch nothing until resume
    RESUME = "resume"  # undo pause; the paused job continues first
    STOP = "stop"  # checkpoint the running job, then the daemon exits


@dataclass(frozen=True)
class ControlRequest:
    path: Path
    action: Action
    created: float


def submit(control_dir: Path, action: Action) -> Path:
    """Write one request; the name sorts in submission order."""
    now = time.time()
    path = control_dir / f"{time.time_ns():020d}-{os.getpid()}-{action.value}.json"
    atomic_write_json(path, {"action": action.value, "created": now})
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
            out.append(ControlRequest(path, Action(data.get("action")), float(data.get("created", 0))))
        except ValueError:
            continue
    return out


def consume(request: ControlRequest) -> None:
    request.path.unlink(missing_ok=True)
