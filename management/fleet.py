"""The fleet's rules (issue 18), as pure functions: when a host counts as alive, stale or stopped, and whether a
starting daemon may take a host name that already has a row.

Plain values in, a verdict with its reason out (like ``daemon/outcome.decide``): ``management/hosts.py`` reads and
writes the rows, ``daemon/host_beat.py`` applies the verdicts, ``trainbox fleet`` and ``/api/fleet`` show them.
A host is judged by its own ``heartbeat_seconds`` (stored in its row), so a reader with other settings, or
another host's CLI, judges it by the beat it promised.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

STALE_BEATS = 3  # missed beats before a host is stale: one late write is not a death


class Liveness(StrEnum):
    ALIVE = "alive"  # beat within STALE_BEATS x its heartbeat_seconds
    STALE = "stale"  # silent for longer: dead, hung or cut off; its name may be taken
    STOPPED = "stopped"  # exited cleanly


class Claim(StrEnum):
    TAKE = "take"  # the name is free (new, stopped, or its daemon stale)
    WAIT = "wait"  # its daemon beat recently: see whether it beats again or goes stale
    REFUSE = "refuse"  # its daemon beat again while we watched: a live daemon holds the name


@dataclass(frozen=True)
class HostRecord:
    """One ``hosts`` row as plain values."""

    name: str
    pid: int
    started_at: float
    heartbeat_at: float
    heartbeat_seconds: float
    state: str
    job_id: int | None = None
    paused: bool = False
    version: str = ""
    home: str = ""
    gpu: str = ""
    stopped_at: float | None = None


@dataclass(frozen=True)
class ClaimVerdict:
    claim: Claim
    reason: str


def stale_after(heartbeat_seconds: float) -> float:
    """Seconds of silence after which a host beating every ``heartbeat_seconds`` is stale."""
    return STALE_BEATS * heartbeat_seconds


def liveness(host: HostRecord, now: float) -> Liveness:
    if host.stopped_at is not None:
        return Liveness.STOPPED
    return Liveness.STALE if now - host.heartbeat_at > stale_after(host.heartbeat_seconds) else Liveness.ALIVE


def judge_claim(
    host: HostRecord | None, now: float, first_seen: float | None, own: Collection[tuple[int, str]] = ()
) -> ClaimVerdict:
    """May a starting daemon take the name of ``host`` (its row, None when there is none)?

    ``own`` holds the (pid, home) pairs of daemons the claimant knows are its own home's and not alive elsewhere:
    the last one (the pid it left in the home's lock file, which the claimant holds now, so it is gone) and the
    claimant's own process. A row of theirs is free at once: a daemon killed with -9 and restarted does not wait
    for its own row to go stale.
    ``first_seen`` is the row's ``heartbeat_at`` at the claimant's first look (None at that look). Any other fresh
    row is watched rather than refused at once: a new beat means a live daemon holds the name (refused, within
    about one heartbeat); silence past ``STALE_BEATS`` beats means a dead one (taken).
    """
    if host is None:
        return ClaimVerdict(Claim.TAKE, "a new host")
    who = f"pid {host.pid}, home {host.home or '?'}"
    age = now - host.heartbeat_at
    state = liveness(host, now)
    if state is Liveness.STOPPED:
        return ClaimVerdict(Claim.TAKE, f"its last daemon ({who}) stopped cleanly")
    if (host.pid, host.home) in own:
        return ClaimVerdict(Claim.TAKE, f"its last daemon ({who}) was this home's own, whose lock is ours now")
    if state is Liveness.STALE:
        limit = stale_after(host.heartbeat_seconds)
        return ClaimVerdict(Claim.TAKE, f"its last daemon ({who}) has been silent {age:.1f} s (> {limit:g} s): dead")
    if first_seen is not None and host.heartbeat_at != first_seen:
        return ClaimVerdict(
            Claim.REFUSE,
            f"fleet host name {host.name!r} is held by a live daemon ({who}, heartbeat {max(age, 0):.1f} s ago): "
            "host names must be unique in a fleet; set another [fleet] host in this home's trainbox.toml",
        )
    return ClaimVerdict(Claim.WAIT, f"its daemon ({who}) beat {max(age, 0):.1f} s ago: waiting for its next beat")


def describe(host: HostRecord, now: float) -> dict[str, Any]:
    """A host as ``trainbox fleet --json`` and ``/api/fleet`` show it."""
    return {
        "name": host.name,
        "liveness": liveness(host, now).value,
        "state": host.state,
        "heartbeat_age_s": round(max(0.0, now - host.heartbeat_at), 1),
        "heartbeat_seconds": host.heartbeat_seconds,
        "job_id": host.job_id,
        "paused": host.paused,
        "pid": host.pid,
        "version": host.version,
        "home": host.home,
        "gpu": host.gpu,
        "started_at": host.started_at,
        "stopped_at": host.stopped_at,
    }


def summary(hosts: list[HostRecord], now: float) -> tuple[bool, str]:
    """For ``trainbox health``: whether no host is stale, and the counts, naming the stale ones."""
    by: dict[Liveness, list[str]] = {state: [] for state in Liveness}
    for h in hosts:
        by[liveness(h, now)].append(h.name)
    counts = ", ".join(f"{len(names)} {state.value}" for state, names in by.items() if names) or "no hosts yet"
    stale = by[Liveness.STALE]
    if stale:
        return (
            False,
            f"{counts}: {', '.join(stale[:5])} silent for more than {STALE_BEATS} beats (dead, hung or cut off)",
        )
    return True, counts
