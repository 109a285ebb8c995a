"""A role that one host of a fleet plays at a time, held through a lease (issue 18, ``management/leases.py``).

Retention is such a role: every host of a fleet may run ``trainbox retention`` (``trainbox up`` starts one on each),
but two of them deleting from one shared storage at once would race over the same checkpoints and record each
deletion twice. The role's process calls ``hold`` at the start of each pass: the lease is renewed (or, when lost or
never held, taken if free) and the pass goes ahead only while this host holds it; ``still_holds`` re-checks it
before each irreversible step; ``release`` at stop lets another host take over at its next pass instead of after
the TTL. A host that dies stops renewing, and another takes the lease once it expires.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from sqlalchemy.exc import SQLAlchemyError

from management.db import ModelDB
from management.leases import Held, acquire, leases, release, renew

log = logging.getLogger("trainbox.fleet")


class FleetRole:
    def __init__(self, db: Callable[[], ModelDB | None], name: str, host: str, ttl: float) -> None:
        """``db`` returns the model DB, or None while it does not exist yet (no lease can be taken then)."""
        self.db, self.name, self.host, self.ttl = db, name, host, ttl
        self.held: Held | None = None

    def hold(self, now: float) -> bool:
        """Renew the lease, or take it when this host does not hold it and it is free; True while held."""
        db = self.db()
        if db is None:
            return False
        was = self.held
        if self.held is not None:
            self.held = renew(db, self.held, self.ttl, now)
        if self.held is None:
            self.held = acquire(db, self.name, self.host, self.ttl, now)
        if (was is None) != (self.held is None):
            log.info("host %s %s the %s lease", self.host, "holds" if self.held else "lost", self.name)
        return self.held is not None

    def still_holds(self, now: float) -> bool:
        """Whether the lease is still this host's (renewed): False once another host took it meanwhile."""
        db = self.db()
        if self.held is not None and db is not None:
            self.held = renew(db, self.held, self.ttl, now)
        return self.held is not None

    def holder(self, now: float) -> str:
        """Who plays the role instead of this host, in words (for the status file and the log)."""
        db = self.db()
        if db is None:
            return "no model DB yet"
        for lease in leases(db):
            if lease.name == self.name and lease.holder and lease.expires_at > now:
                return f"held by {lease.holder} for {lease.expires_at - now:.0f} s more"
        return "free"

    def release(self) -> None:
        """Give the lease up at stop; a DB that cannot be reached then is only logged: the lease expires anyway."""
        db = self.db()
        if self.held is not None and db is not None:
            try:
                release(db, self.held)
            except SQLAlchemyError as e:
                log.warning("could not release the %s lease (it expires in %.0f s): %s", self.name, self.ttl, e)
        self.held = None
