"""The daemon's row in the fleet's ``hosts`` table (issue 18): claimed at start, beaten every
``fleet.heartbeat_seconds``, marked stopped on a clean exit.

Beats go to the DB at the configured interval, or at once when the daemon's state, job or pause changes, never
once per tick: a SQLite write every half second from every daemon would cost more than the fleet view is worth.
The rules (who may take a name, when a host is stale) are ``management/fleet.py``'s; this module gathers the
inputs, waits where the rule says wait, and applies the verdict.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from daemon.lock import LockHeld
from management import hosts
from management.db import ModelDB
from management.fleet import Claim, HostRecord, judge_claim
from trainbox import __version__
from trainbox.config import FleetConfig
from trainbox.states import DaemonState

log = logging.getLogger("trainbox.daemon")


class HostTaken(LockHeld):
    """Another live daemon of the fleet has this daemon's ``fleet.host`` name: the daemon does not start
    (a ``LockHeld``: like a home's lock held by another daemon, it is said in one line and exits 1)."""


def gpu_words(gpus: int) -> str:
    return "" if gpus == 0 else f"{gpus} GPU" + ("s" if gpus > 1 else "")


class HostBeat:
    def __init__(
        self,
        db: ModelDB,
        fleet: FleetConfig,
        home: Path,
        gpus: int,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.db, self.fleet, self.home, self.gpus = db, fleet, home, gpus
        self.clock, self.sleep = clock, sleep
        self.mine: HostRecord | None = None  # our row as claimed: (name, pid, started_at) identify it
        self.last_beat = 0.0
        self.last_reading: tuple[str, int | None, bool] | None = None
        self.lost = False  # another daemon took our name (we were silent too long): told once

    def claim(self, started_at: float, previous_pid: int | None) -> str:
        """Take our host name or raise ``HostTaken``; returns why the name was ours to take. ``started_at``: the
        daemon's, as in its status file; ``previous_pid``: the pid the home's previous daemon left in its lock
        file. A fresh row of another daemon is watched for at most its stale limit (``judge_claim``)."""
        own = {(pid, str(self.home)) for pid in (previous_pid, os.getpid()) if pid is not None}
        first_seen: float | None = None
        while True:
            now = self.clock()
            row = hosts.host(self.db, self.fleet.host)
            verdict = judge_claim(row, now, first_seen, own)
            if verdict.claim is Claim.REFUSE:
                raise HostTaken(verdict.reason)
            if verdict.claim is Claim.WAIT:
                assert row is not None
                if first_seen is None:
                    first_seen = row.heartbeat_at
                    log.info("fleet host %s: %s", self.fleet.host, verdict.reason)
                self.sleep(min(row.heartbeat_seconds, self.fleet.heartbeat_seconds) / 4)
                continue
            mine = self._record(started_at, now)
            if hosts.insert(self.db, mine) if row is None else hosts.take(self.db, mine, row):
                self.mine, self.last_beat = mine, now
                log.info("fleet host %s: joined (%s)", mine.name, verdict.reason)
                return verdict.reason
            # another daemon wrote the row between our read and our write: judge it again

    def _record(self, started_at: float, now: float) -> HostRecord:
        return HostRecord(
            name=self.fleet.host,
            pid=os.getpid(),
            started_at=started_at,
            heartbeat_at=now,
            heartbeat_seconds=self.fleet.heartbeat_seconds,
            state=DaemonState.STARTING.value,
            version=__version__,
            home=str(self.home),
            gpu=gpu_words(self.gpus),
        )

    def tick(self, now: float, state: DaemonState, job_id: int | None, paused: bool) -> bool:
        """Beat when due or when the reading changed; False once, at the beat that found our row taken."""
        reading = (state.value, job_id, paused)
        if self.mine is None or self.lost:
            return True
        if reading == self.last_reading and now - self.last_beat < self.fleet.heartbeat_seconds:
            return True
        self.last_beat, self.last_reading = now, reading
        self.lost = not hosts.beat(self.db, self.mine, now, *reading)
        return not self.lost

    def stop(self, now: float) -> None:
        """A clean exit: the row says stopped, so the name is free at once."""
        if self.mine is not None and not self.lost:
            hosts.mark_stopped(self.db, self.mine, now)
