"""The daemon's report child, kept from one report to the next: ``python -m management.report_server --home H``.

Why: a report's own work (read the run's rows and series, draw its PNGs, render the markdown) costs about a
third of a CPU second, but a fresh child per report first paid Python's start and the imports of SQLAlchemy,
pydantic and matplotlib, about a second more (docs/BENCHMARKS.md, fleet throughput). Where every core trains
(a fleet of small jobs, one daemon per core) that second came out of training. So one child draws every report
the daemon asks for while they keep coming (``daemon/reports.py`` owns when it starts and ends):

- a request is a job id and a newline on stdin; once that report is written, or has failed, the child answers
  ``<id> ok`` or ``<id> failed <why>`` on its reply pipe (the fd 1 it was started with), one request at a time;
- while it draws a job's report, its fds 1 and 2 are that job's ``runs/job-N/report.log`` (after a ``--- report
  start`` line), so everything the report printed, a traceback included, is in the job's own log, as when each
  report had a child of its own; between requests they are the daemon's stderr;
- a report that raises fails alone: the child answers and serves the next;
- the end of stdin (the daemon closed it, or died) ends the child once the report in hand is written.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from management.db import ModelDB
from management.job_report import DB_URL_ENV, REPORT_LOG, generate
from trainbox.config import load_settings
from trainbox.home import Home

log = logging.getLogger("trainbox.report")


def answer(job_id: int, error: BaseException | None) -> str:
    """The reply line for one request (one line whatever the error's text)."""
    if error is None:
        return f"{job_id} ok"
    why = " ".join(f"{type(error).__name__}: {error}".split())
    return f"{job_id} failed {why[:500]}"


def parse_answer(line: str) -> tuple[int, str | None] | None:
    """(job id, None when written or why it failed) from a reply line; None for a line that is not one."""
    head, _, rest = line.strip().partition(" ")
    if not head.isdigit() or not (rest == "ok" or rest.startswith("failed")):
        return None
    return int(head), None if rest == "ok" else rest.removeprefix("failed").strip() or "failed"


@contextlib.contextmanager
def job_output(path: Path) -> Iterator[None]:
    """fds 1 and 2 appended to ``path`` for the block (C-level output and tracebacks too), then put back."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "ab") as out:
        when = time.strftime("%Y-%m-%d %H:%M:%S")
        out.write(f"\n--- report start {when} (report server pid {os.getpid()}) ---\n".encode())
        out.flush()
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def serve(home: Home, db: ModelDB, requests: IO[str], reply: IO[str]) -> int:
    """Answer requests until stdin ends; returns how many were answered."""
    served = 0
    for line in requests:
        text = line.strip()
        if not text.isdigit():
            log.warning("report server: ignoring a request that is not a job id: %r", text[:80])
            continue
        job_id = int(text)
        error: BaseException | None = None
        with job_output(home.run_dir(job_id) / REPORT_LOG):
            try:
                path = generate(home, db, job_id)
                log.info("job %d: report written to %s", job_id, path)
            except Exception as e:  # boundary: one report's failure is its own; the child serves the next
                log.exception("job %d: report failed", job_id)
                error = e
        reply.write(answer(job_id, error) + "\n")
        reply.flush()
        served += 1
    return served


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m management.report_server", description=__doc__)
    parser.add_argument("--home", type=Path, required=True)
    args = parser.parse_args(argv)
    reply = os.fdopen(os.dup(1), "w")  # the reply pipe; fd 1 itself becomes stderr, so no print can break a reply
    os.dup2(2, 1)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    home = Home.resolve(args.home)
    db = ModelDB(os.environ.get(DB_URL_ENV) or load_settings(home.config_file).db.url_for(home.db_url))
    try:
        serve(home, db, sys.stdin, reply)
    except BrokenPipeError:  # the daemon died: nobody to answer, and the request stays on disk for the next one
        return 0
    finally:
        db.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
