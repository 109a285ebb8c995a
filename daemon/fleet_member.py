"""The daemon's leases when it is one of a fleet (``[fleet] enabled``; issue 18, ``management/leases.py``).

Two leases: the fleet's leadership (``leader``: the one daemon that admits files from the shared inbox and
repairs, at its start, what no host holds: the spool's rows, pending version registrations) and the
lineage of the one job this daemon runs (taken with the job by ``claim``). Both are renewed every third
of ``fleet.lease_seconds``; a lineage lease found taken means this host was cut off long enough for
another to resume its job: the caller abandons the job without filing anything (``beat`` says so). The
same check runs just before anything is filed (``still_holds``), and the lease is given up once the job
has left this host (done, failed, back in the queue) or when the daemon stops.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from sqlalchemy.orm import Session

from management import fleet_controls
from management.db import Job, ModelDB
from management.leases import LEADER, Claim, Held, LeaseLost, acquire, claim_job, fence, release, renew

log = logging.getLogger("trainbox.daemon")


class FleetMember:
    def __init__(self, db: ModelDB, host: str, lease_seconds: float, heartbeat_seconds: float = 5.0) -> None:
        self.db, self.host, self.ttl, self.every = db, host, lease_seconds, heartbeat_seconds
        self.leader: Held | None = None
        self.job: Held | None = None  # the lineage lease of the job this host runs
        self.last_beat: float | None = None
        self.control_seen = 0  # the newest fleet control request read (management/fleet_controls.py)
        self.last_controls: float | None = None

    def start_controls(self) -> bool | None:
        """At start: whether the fleet's requests say this host is paused (None: they say nothing)."""
        paused, self.control_seen = fleet_controls.starting_state(self.db, self.host)
        return paused

    def controls(self, now: float) -> list[fleet_controls.Request]:
        """The fleet's new requests for this host, read every heartbeat."""
        if self.last_controls is not None and now - self.last_controls < self.every:
            return []
        self.last_controls = now
        new = fleet_controls.addressed(self.db, self.host, self.control_seen)
        if new:
            self.control_seen = new[-1].id
        return new

    @property
    def leading(self) -> bool:
        return self.leader is not None

    def holds(self, job_id: int) -> bool:
        return self.job is not None and self.job.job_id == job_id

    def beat(self, now: float) -> bool:
        """Renew (or try to take) the leadership and renew the job's lease, every third of the TTL;
        False when the job's lease was lost (``self.job`` is then None)."""
        if self.last_beat is not None and now - self.last_beat < self.ttl / 3:
            return True
        self.last_beat = now
        was_leading = self.leading
        self.leader = renew(self.db, self.leader, self.ttl, now) if self.leader else None
        if self.leader is None:
            self.leader = acquire(self.db, LEADER, self.host, self.ttl, now)
        if self.leading != was_leading:
            log.info("fleet host %s: %s", self.host, "leads the fleet" if self.leading else "no longer leads")
        return self.still_holds(now)

    def still_holds(self, now: float) -> bool:
        """Renew the job's lease now; False (and the lease forgotten) when another holder took it."""
        if self.job is None:
            return True
        renewed = renew(self.db, self.job, self.ttl, now)
        if renewed is None:
            log.warning("fleet host %s: the lease of job %s was taken by another host", self.host, self.job.job_id)
        self.job = renewed
        return renewed is not None

    def fence(self, s: Session) -> None:
        """``ModelDB.guarded``'s check while this host files its job: the job's lease, at the generation
        taken, still this host's (held locked to the end of the transaction); else ``LeaseLost``."""
        if self.job is None:
            raise LeaseLost(f"host {self.host} holds no job lease")
        fence(s, self.job)

    def claim(self, now: float, accept: Callable[[Job], bool]) -> Claim | None:
        claim = claim_job(self.db, self.host, self.ttl, now, accept)
        if claim is not None:
            self.job = claim.lease
        return claim

    def release_job(self) -> None:
        if self.job is not None:
            release(self.db, self.job)
            self.job = None

    def stop(self) -> None:
        """Give both leases up: another host may resume this host's paused job, and lead, at once."""
        self.release_job()
        if self.leader is not None:
            release(self.db, self.leader)
            self.leader = None
