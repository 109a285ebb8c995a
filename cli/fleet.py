"""``trainbox fleet``: the daemons sharing this home's model DB (issue 18), each with its state, heartbeat age,
the job it trains, pid and version, from the DB's ``hosts`` table (alive / stale / stopped:
``management/fleet.py``).

Registered on the main app by ``register(app)`` (``cli/main.py``); the DB modules are imported inside the command.
"""

from __future__ import annotations

import json
import time
from typing import Any

import typer
from rich.table import Table
from rich.text import Text

from cli.common import HomeOpt, JsonOpt, console, settings_or_exit
from trainbox.home import Home


def fleet_rows(url: str, now: float) -> list[dict[str, Any]]:
    """Every host that joined the fleet of the DB at ``url``, as ``describe`` shows it; none before the
    first daemon made the DB (it is not created here)."""
    from management.db import ModelDB, schema_ready
    from management.fleet import describe
    from management.hosts import all_hosts

    if not schema_ready(url):
        return []
    db = ModelDB(url)
    try:
        return [describe(h, now) for h in all_hosts(db)]
    finally:
        db.close()


def fleet(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """The fleet's hosts: state, heartbeat age (alive, or stale past 3 beats), job, pid, version."""
    h = Home.resolve(home)
    rows = fleet_rows(settings_or_exit(h).db.url_for(h.db_url), time.time())
    if as_json:
        print(json.dumps({"hosts": rows}, indent=2))
        return
    if not rows:
        console.print("no hosts yet: a daemon joins the fleet when it starts")
        return
    table = Table("host", "liveness", "state", "beat", "job", "pid", "version", "gpu")
    table.add_column("home", overflow="fold")  # a path wraps rather than losing its end
    for r in rows:
        cells = (
            r["name"],
            r["liveness"],
            r["state"] + (" (paused)" if r["paused"] and r["state"] != "paused" else ""),
            f"{r['heartbeat_age_s']:.0f}s ago",
            "-" if r["job_id"] is None else str(r["job_id"]),
            str(r["pid"]),
            r["version"],
            r["gpu"] or "-",
            r["home"],
        )
        table.add_row(*(Text(c) for c in cells))  # Text: a [bracket] in a name or path is not markup
    console.print(table)


def register(app: typer.Typer) -> None:
    app.command()(fleet)
