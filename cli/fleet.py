"""``trainbox fleet``: the daemons sharing this home's model DB (issue 18), each with its state, heartbeat age,
the job it trains, pid and version, from the DB's ``hosts`` table (alive / stale / stopped:
``management/fleet.py``), and the leases it holds: its lineage, the fleet's leadership, retention
(``management/fleet_view.py``).

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


def fleet_view(url: str, now: float) -> dict[str, Any]:
    """Every host that joined the fleet of the DB at ``url`` with its leases (``fleet_view.read``); no hosts
    before the first daemon made the DB (it is not created here)."""
    from management import fleet_view as view
    from management.db import ModelDB, schema_ready

    if not schema_ready(url):
        return view.join([], [], now)
    db = ModelDB(url)
    try:
        return view.read(db, now)
    finally:
        db.close()


def lineage_cell(lease: dict[str, Any] | None) -> str:
    """The lineage a host holds, its job, the lease's generation and time left (or since it expired)."""
    if lease is None:
        return "-"
    left = lease["expires_in_s"]
    parts = [] if lease["job_id"] is None else [f"job {lease['job_id']}"]
    parts += [f"gen {lease['generation']}", f"expired {-left:.0f}s ago" if lease["expired"] else f"{left:.0f}s left"]
    return f"{lease['name']} ({', '.join(parts)})"


def node_role(node: dict[str, Any] | None) -> list[str]:
    """A host running a node of another host's multi-node run says which (``daemon/node_join.py``)."""
    return [] if node is None else [f"node {node['node']} of job {node['job_id']} (run {node['run_id']})"]


def fleet(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """The fleet's hosts: state, heartbeat age (alive, or stale past 3 beats), job, lineage lease, roles (leader,
    retention, a node of another host's multi-node job), pid, version."""
    h = Home.resolve(home)
    view = fleet_view(settings_or_exit(h).db.url_for(h.db_url), time.time())
    if as_json:
        print(json.dumps(view, indent=2))
        return
    rows = view["hosts"]
    if not rows:
        console.print("no hosts yet: a daemon joins the fleet when it starts")
        return
    table = Table("host", "liveness", "state", "beat", "job", "lineage", "roles", "pid", "version", "gpu")
    table.add_column("home", overflow="fold")  # a path wraps rather than losing its end
    for r in rows:
        cells = (
            r["name"],
            r["liveness"],
            r["state"] + (" (paused)" if r["paused"] and r["state"] != "paused" else ""),
            f"{r['heartbeat_age_s']:.0f}s ago",
            "-" if r["job_id"] is None else str(r["job_id"]),
            lineage_cell(r["lineage"]),
            ", ".join([*(role for role in ("leader", "retention") if r[role]), *node_role(r["node"])]) or "-",
            str(r["pid"]),
            r["version"],
            r["gpu"] or "-",
            r["home"],
        )
        table.add_row(*(Text(c) for c in cells))  # Text: a [bracket] in a name or path is not markup
    console.print(table)
    who = {role: view[role] or "nobody" for role in ("leader", "retention")}
    console.print(Text(f"leader: {who['leader']}; retention deletes on: {who['retention']}"))


def register(app: typer.Typer) -> None:
    app.command()(fleet)
