"""What every request needs, built once per server in the app's lifespan and reached through ``State``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from management.db import ModelDB
from monitoring.metrics_log import MetricsCache
from monitoring.system import Gpus
from trainbox.config import Settings
from trainbox.home import Home
from trainbox.spool import Spool


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
    def max_upload_bytes(self) -> int:
        if self.upload_limit is not None:
            return self.upload_limit
        return self.settings.server.max_upload_bytes


def state(request: Request) -> ServerState:
    st: ServerState = request.app.state.server
    return st


State = Annotated[ServerState, Depends(state)]
