"""What ``trainbox fleet`` and ``/api/fleet`` show (issue 18): every host (``management/fleet.py`` ``describe``)
joined with the leases it holds (``management/leases.py``): the lineage whose job it runs, whether it leads the
fleet, whether its retention is the one that deletes.

The hosts table says what each daemon reports of itself; the leases say what it has the right to do. Both are
shown because they can differ, and the difference is the news: a stale host still named on an expired lineage
lease is a dead host whose job waits for another to resume it. ``join`` is pure; ``read`` gathers its inputs.
"""

from __future__ import annotations

from typing import Any

from management.db import ModelDB
from management.fleet import describe
from management.hosts import all_hosts
from management.leases import LEADER, LINEAGE, NODE, RETENTION, Held, leases


def holder(held: list[Held], name: str, now: float) -> str | None:
    """The host holding the lease ``name`` now; None when it is free, released or expired."""
    for lease in held:
        if lease.name == name and lease.holder and lease.expires_at > now:
            return lease.holder
    return None


def lineage_lease(lease: Held, now: float) -> dict[str, Any]:
    """A ``lineage:<name>`` lease as shown: an expired one is its dead holder's, waiting for another host."""
    return {
        "name": lease.name[len(LINEAGE) :],
        "job_id": lease.job_id,
        "generation": lease.generation,
        "expires_at": lease.expires_at,
        "expires_in_s": round(lease.expires_at - now, 1),
        "expired": lease.expires_at <= now,
    }


def node_lease(lease: Held) -> dict[str, Any]:
    """A ``node:<run>:<k>`` lease as shown: the host is node ``k`` of another host's multi-node run."""
    run_id, _, node = lease.name[len(NODE) :].partition(":")
    return {"job_id": lease.job_id, "run_id": int(run_id), "node": int(node)}


def join(hosts: list[dict[str, Any]], held: list[Held], now: float) -> dict[str, Any]:
    """The hosts (``describe``'s dicts) with ``lineage`` (the lineage lease each holds: a live one first, else its
    latest expired one; None), ``node`` (the node of another host's multi-node run it runs, a live lease; None),
    ``leader`` and ``retention`` (whether it holds those leases now), and the fleet's ``leader`` and
    ``retention`` host names (None: nobody holds the lease)."""
    mine: dict[str, Held] = {}
    for lease in held:
        if not lease.name.startswith(LINEAGE) or not lease.holder:
            continue
        other = mine.get(lease.holder)
        if other is None or lease.expires_at > other.expires_at:
            mine[lease.holder] = lease  # a host holds one live lineage lease at most: the latest expiry is it
    nodes = {n.holder: n for n in held if n.name.startswith(NODE) and n.holder and n.expires_at > now}
    leader, retention = holder(held, LEADER, now), holder(held, RETENTION, now)
    rows = [
        {
            **h,
            "lineage": lineage_lease(mine[h["name"]], now) if h["name"] in mine else None,
            "node": node_lease(nodes[h["name"]]) if h["name"] in nodes else None,
            "leader": h["name"] == leader,
            "retention": h["name"] == retention,
        }
        for h in hosts
    ]
    return {"hosts": rows, "leader": leader, "retention": retention}


def read(db: ModelDB, now: float) -> dict[str, Any]:
    return join([describe(h, now) for h in all_hosts(db)], leases(db), now)
