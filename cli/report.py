"""``trainbox report N``: a job's report (``runs/job-N/report.md``), written first if it is missing.

Registered on the main app by ``register(app)`` (``cli/main.py``); the report modules (and matplotlib,
when plots must be drawn) are imported inside the command, so other commands never load them.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from cli.common import HomeOpt, console, settings_or_exit
from trainbox.home import Home


def report(
    job: Annotated[int, typer.Argument(help="Job id (see `trainbox queue`).", min=1)],
    home: HomeOpt = None,
    again: Annotated[bool, typer.Option("--again", help="Write the report again from what is recorded now.")] = False,
) -> None:
    """Print a job's report: outcome, diagnosis with the setting to change, plots, changes, time."""
    from management.db import ModelDB, schema_ready
    from management.job_report import ensure, generate

    h = Home.resolve(home)
    url = settings_or_exit(h).db.url_for(h.db_url)
    if not schema_ready(url):
        console.print(f"[red]no model DB for {h.root}[/red]")
        raise typer.Exit(1)
    db = ModelDB(url)
    try:
        if db.job(job) is None and not h.run_dir(job).is_dir():
            console.print(f"[red]no job {job}[/red]")
            raise typer.Exit(1)
        path = generate(h, db, job) if again else ensure(h, db, job)
    finally:
        db.close()
    sys.stdout.write(path.read_text(encoding="utf-8"))
    typer.echo(f"{path} (plots beside it)", err=True)


def register(app: typer.Typer) -> None:
    app.command()(report)
