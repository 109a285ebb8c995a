"""``trainbox status --watch``: the status of ``trainbox status`` as a live terminal display.

A rich ``Live`` display redrawn every ``--interval`` seconds from the same files ``trainbox status`` reads
(the daemon's and the worker's status files, the spool), until Ctrl-C. ``frame`` is pure (the status data
in, a renderable out), so what a person sees is tested without a terminal; ``--count`` (hidden) stops after
that many frames, for tests and scripts.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from rich.console import Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from cli.common import console, eta
from cli.terminal import showable


def _num(v: float | None, spec: str = ".4f") -> str:
    return "-" if v is None else format(v, spec)


def _job(job: dict[str, Any] | None) -> RenderableType:
    if not job:
        return Text("job: none")
    total, step = job.get("total_steps") or 0, job.get("step") or 0
    head = Text(f"job {job['job_id']} {showable(job.get('job_name') or '')}: {job.get('phase', '')}", style="bold")
    table = Table.grid(padding=(0, 2))
    for _ in range(6):
        table.add_column()
    table.add_row("step", f"{step}/{total}", "loss", _num(job.get("loss")), "val loss", _num(job.get("val_loss")))
    table.add_row(
        "tokens/s", _num(job.get("tokens_per_s"), ".0f"), "lr", _num(job.get("learning_rate"), ".2e"),
        "ETA", eta(job.get("eta_s")),
    )  # fmt: skip
    bar = ProgressBar(total=float(total or 1), completed=float(step if total else 0), width=50)
    return Group(head, bar, table)


def frame(data: dict[str, Any], waiting: list[str]) -> RenderableType:
    """One screen: the daemon, the current job (step, loss, ETA, a bar), the queue and its next jobs."""
    dm = data["daemon"]
    daemon = f"daemon: {dm['state']}" + (f" (pid {dm['pid']})" if dm["running"] else "")
    q = data["queue"]
    queue = Table(title="queue", title_justify="left", show_edge=False)
    for name in ("high", "normal", "low", "processing", "done", "failed"):
        queue.add_column(name, justify="right")
    queue.add_row(*(str(q.get(n, 0)) for n in ("high", "normal", "low", "processing", "done", "failed")))
    parts: list[RenderableType] = [Text(daemon), _job(data.get("current_job")), queue]
    if waiting:
        parts.append(Text("next: " + ", ".join(showable(w) for w in waiting)))
    if data.get("pending_controls"):
        parts.append(Text(f"pending: {', '.join(data['pending_controls'])}"))
    parts.append(Text("Ctrl-C to quit", style="dim"))
    return Group(*parts)


def watch(read: Callable[[], tuple[dict[str, Any], list[str]]], interval: float, count: int | None) -> None:
    """Redraw until Ctrl-C (or ``count`` frames)."""
    pause = threading.Event()  # never set: only a wait that Ctrl-C interrupts
    shown = 0
    try:
        with Live(frame(*read()), console=console, auto_refresh=False, transient=False) as live:
            shown = 1
            while count is None or shown < count:
                pause.wait(interval)
                live.update(frame(*read()), refresh=True)
                shown += 1
    except KeyboardInterrupt:
        pass
