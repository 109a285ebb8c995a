"""``/api/stream``: Server-Sent Events, so an open page follows the daemon without polling.

Events: ``status`` (the /api/status body) whenever daemon.json or training.json changed,
``metrics`` ({job_id, train, eval}: lines appended since the last event) for the current job,
``events`` (new model DB events), ``reset`` ({job_id}: the metrics file was cut back by a resumed
run, so the page should fetch the history again), and a comment every 15 s so proxies keep the connection.
The loop checks every ``poll_s`` whether the client left or the server is stopping, so neither a
closed tab nor a shutdown ever waits on a stream.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

PING_EVERY_S = 15.0
EVENTS_EVERY_S = 2.0
MAX_LINES_PER_EVENT = 5000


def sse(event: str, data: Any, event_id: int | None = None) -> str:
    """One SSE message; data is JSON on one line (JSON never needs a raw newline)."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, separators=(',', ':'), default=str)}\n\n"


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return 0


@dataclass
class StreamSources:
    """What the stream reads, handed in by the app so this module stays free of routes and state."""

    watched: tuple[Path, ...]  # status files whose change means a new status event
    status: Callable[[], dict[str, Any]]
    current_job: Callable[[], int | None]
    metrics_file: Callable[[int], Path]
    series: Callable[[Path], Any]  # MetricsCache.get
    events_after: Callable[[int], list[dict[str, Any]]]
    last_event_id: Callable[[], int]
    stopping: Callable[[], bool]
    poll_s: float = 0.5


async def event_stream(
    src: StreamSources, disconnected: Callable[[], Awaitable[bool]], metrics_since: int | None = None
) -> AsyncIterator[str]:
    yield "retry: 2000\n\n"
    seen_mtimes: tuple[int, ...] | None = None
    job: int | None = None
    train_step = eval_step = -1
    first_job = True
    series: Any = None
    sent_curve: Any = None  # the hybrid curve last sent (each fit is a new list)
    event_id = await anyio.to_thread.run_sync(src.last_event_id)
    last_events = last_ping = time.monotonic()
    while not src.stopping() and not await disconnected():
        now = time.monotonic()
        mtimes = tuple(_mtime(p) for p in src.watched)
        if mtimes != seen_mtimes:
            seen_mtimes = mtimes
            yield sse("status", await anyio.to_thread.run_sync(src.status))
        current = src.current_job()
        if current != job:
            job = current
            series = src.series(src.metrics_file(job)) if job is not None else None
            if first_job and metrics_since is None and series is not None:
                # the page fetched the history itself: send only what comes after this moment
                train_step = eval_step = series.last_step
            else:
                start = metrics_since if first_job and metrics_since is not None else -1
                train_step = eval_step = start
            first_job = False
        if job is not None:
            latest = src.series(src.metrics_file(job))
            if series is not None and latest is not series and latest.last_step < max(train_step, eval_step):
                # the file was cut back (a resumed run repeats steps after its checkpoint): start over
                train_step = eval_step = -1
                yield sse("reset", {"job_id": job})
            series = latest
            train = series.train_since(train_step)[:MAX_LINES_PER_EVENT]
            evals = series.eval_since(eval_step)[:MAX_LINES_PER_EVENT]
            curve = series.predicted if series.predicted and series.predicted is not sent_curve else None
            if train or evals or curve is not None:
                train_step = train[-1]["step"] if train else train_step
                eval_step = evals[-1]["step"] if evals else eval_step
                message: dict[str, Any] = {"job_id": job, "train": train, "eval": evals}
                if curve is not None:
                    message["predicted"] = sent_curve = curve
                yield sse("metrics", message)
        if now - last_events >= EVENTS_EVERY_S:
            last_events = now
            new = await anyio.to_thread.run_sync(src.events_after, event_id)
            if new:
                event_id = new[-1]["id"]
                yield sse("events", new, event_id)
        if now - last_ping >= PING_EVERY_S:
            last_ping = now
            yield ": ping\n\n"
        await anyio.sleep(src.poll_s)
