"""``trainbox logs [JOB] [-f]``: a job's worker log (``runs/job-N/worker.log``), and with ``-f`` what is
appended to it until the job's worker is done or Ctrl-C.

Which job: the one given, else the one the daemon trains now, else the newest run folder with a log. A job
is followed while the live daemon's status names it as its current job; once it does not (the job ended,
paused or failed, or the daemon is gone) the rest of the file is printed and the command ends. Lines are
printed with ``cli/terminal.showable``: a log quotes names and data other people wrote.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TextIO

import typer

from cli.common import HomeOpt, console, settings_or_exit
from cli.terminal import showable
from trainbox.home import Home
from trainbox.jobspec import WORKER_LOG
from trainbox.status import DAEMON_STATUS, DaemonStatus, daemon_liveness, read_status

FOLLOW_POLL_S = 0.2


def current_job(home: Home, poll_interval: float) -> int | None:
    """The job the live daemon trains now, or None."""
    status = read_status(home.status / DAEMON_STATUS, DaemonStatus)
    if daemon_liveness(status, time.time(), poll_interval) != "up" or status is None:
        return None
    return status.current_job


def latest_job(home: Home) -> int | None:
    """The newest run folder with a worker log."""
    ids = []
    for log in home.runs.glob(f"job-*/{WORKER_LOG}"):
        number = log.parent.name.removeprefix("job-")
        if number.isdigit():
            ids.append(int(number))
    return max(ids) if ids else None


def follow(path: Path, running: Callable[[], bool], out: TextIO, stop: threading.Event | None = None) -> None:
    """Print the file, then what is appended while ``running()``; then the rest, and return."""
    stop = stop or threading.Event()
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        while True:
            chunk = f.read()
            if chunk:
                out.write(showable(chunk))
                out.flush()
                continue
            if not running() or stop.is_set():
                out.write(showable(f.read()))
                out.flush()
                return
            stop.wait(FOLLOW_POLL_S)


def logs(
    job: Annotated[int | None, typer.Argument(help="Job id (default: the running job, else the latest).")] = None,
    follow_: Annotated[bool, typer.Option("--follow", "-f", help="Print on until the job ends or Ctrl-C.")] = False,
    home: HomeOpt = None,
) -> None:
    """A job's worker log (runs/job-N/worker.log); -f follows it while the job trains."""
    h = Home.resolve(home)
    poll = settings_or_exit(h).daemon.poll_interval
    chosen = job if job is not None else (current_job(h, poll) or latest_job(h))
    if chosen is None:
        console.print("no job has a worker log yet")
        raise typer.Exit(1)
    path = h.run_dir(chosen) / WORKER_LOG
    if not path.is_file():
        console.print(f"job {chosen} has no worker log ({path})")
        raise typer.Exit(1)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is how a person stops following
        follow(path, (lambda: current_job(h, poll) == chosen) if follow_ else (lambda: False), sys.stdout)


def register(app: typer.Typer) -> None:
    app.command()(logs)
