"""Retention once per fleet (issue 18, ``[fleet] enabled``): two hosts' retention processes on one model DB and one
shared storage, driven pass by pass with a test clock, on SQLite and a real PostgreSQL. Only the holder of the
``retention`` lease deletes; the other stands by (and still beats); it takes over when the holder stops (the lease
is released) or dies (the lease expires), and a holder whose lease was taken mid-pass stops before its next
deletion."""

from __future__ import annotations

import json
from pathlib import Path

from management.db import Job, ModelDB
from management.leases import RETENTION, acquire, leases
from management.retention import RETENTION_STATUS, Retention, scan
from trainbox.config import Settings
from trainbox.home import Home

NOW = 1_000_000.0
LEASE, INTERVAL = 30.0, 60.0  # the retention lease lasts both: LEASE + INTERVAL


def _settings(url: str, host: str) -> Settings:
    return Settings.model_validate(
        {
            "db": {"url": url},
            "fleet": {"enabled": True, "host": host, "lease_seconds": LEASE},
            "retention": {"keep_last": 0, "keep_best": 0, "min_age": 0, "interval": INTERVAL},
        }
    )


class Host:
    """One host's retention process: its own home and DB connection, the fleet's shared storage."""

    def __init__(self, root: Path, shared: Path, url: str, name: str) -> None:
        self.home = Home(root, shared).ensure()
        self.db = ModelDB(url)
        self.lines: list[str] = []
        self.retention = Retention(self.home, _settings(url, name), db=self.db, report=self.lines.append)

    def deleted(self) -> list[str]:
        return [line.split()[1] for line in self.lines if line.startswith("deleting ")]

    def status(self) -> dict[str, object]:
        data = json.loads((self.home.status / RETENTION_STATUS).read_text())
        assert isinstance(data, dict)
        return data


def _checkpoints(home: Home, db: ModelDB, job_id: int, steps: int) -> set[str]:
    """``steps`` complete checkpoints of a new job on the shared storage, old enough for any policy."""
    with db.session() as s:
        s.add(Job(id=job_id, name=f"j{job_id}.jsonl", state="done"))
    for step in range(1, steps + 1):
        d = home.run_dir(job_id) / "checkpoints" / f"step-{step:08d}"
        d.mkdir(parents=True)
        (d / "meta.json").write_text(json.dumps({"step": step, "time": NOW - 10_000, "size_bytes": 10}))
        (d / "COMPLETE").write_text(f"{step}\n")
    return {c.path for c in scan(home) if c.job_id == job_id}


def test_one_host_deletes_and_the_other_takes_over_when_it_stops_or_dies(tmp_path: Path, any_db_url: str) -> None:
    shared = tmp_path / "shared"
    a = Host(tmp_path / "a", shared, any_db_url, "alpha")
    b = Host(tmp_path / "b", shared, any_db_url, "beta")
    alpha2: Host | None = None
    try:
        # alpha passes first and takes the lease; beta, passing while alpha holds it, deletes nothing
        first = _checkpoints(a.home, a.db, 1, 3)
        a.retention.loop(NOW)
        assert set(a.deleted()) == first and not scan(a.home)
        second = _checkpoints(a.home, a.db, 2, 2)
        b.retention.loop(NOW + 1)
        assert b.deleted() == [] and {c.path for c in scan(b.home)} == second
        assert "held by alpha" in str(b.status()["standby"])  # standing by, and beating for trainbox health
        assert b.status()["heartbeat"] == NOW + 1
        a.retention.loop(NOW + INTERVAL)  # alpha renews its lease and deletes the new ones
        assert set(a.deleted()) == first | second and "standby" not in a.status()

        # alpha stops: it releases the lease, beta takes over at its next pass
        a.retention.shutdown()
        third = _checkpoints(a.home, a.db, 3, 2)
        b.retention.loop(NOW + INTERVAL + 1)
        assert set(b.deleted()) == third
        alpha2 = Host(tmp_path / "a", shared, any_db_url, "alpha")  # alpha's retention restarted
        fourth = _checkpoints(a.home, a.db, 4, 2)
        alpha2.retention.loop(NOW + INTERVAL + 2)
        assert alpha2.deleted() == [] and {c.path for c in scan(a.home)} == fourth

        # beta dies (no stop, no release): alpha waits for the lease to expire, then deletes
        expiry = NOW + INTERVAL + 1 + LEASE + INTERVAL
        alpha2.retention.loop(expiry - 1)
        assert alpha2.deleted() == []
        alpha2.retention.loop(expiry)
        assert set(alpha2.deleted()) == fourth
        # beta, back from the dead, finds its lease taken: it deletes nothing
        fifth = _checkpoints(a.home, a.db, 5, 2)
        b.retention.loop(expiry + 1)
        assert set(b.deleted()) == third and {c.path for c in scan(a.home)} == fifth

        # each checkpoint was deleted once, by one host, and recorded once
        everyone = a.deleted() + b.deleted() + alpha2.deleted()
        assert sorted(everyone) == sorted(first | second | third | fourth)
        events = a.db.events(kind="checkpoint_deleted")
        assert sorted(str(e.data["path"]) for e in events) == sorted(everyone)
        assert not any((shared / "trash").iterdir())
    finally:
        for host in (a, b, alpha2):
            if host is not None:
                host.db.close()


def test_a_holder_whose_lease_is_taken_mid_pass_stops_before_its_next_deletion(tmp_path: Path, any_db_url: str) -> None:
    shared = tmp_path / "shared"
    a = Host(tmp_path / "a", shared, any_db_url, "alpha")
    try:
        paths = _checkpoints(a.home, a.db, 1, 3)

        def and_meanwhile(line: str) -> None:
            a.lines.append(line)
            if line.startswith("deleting ") and len(a.deleted()) == 1:
                # alpha stalls past its lease while deleting its first checkpoint: beta takes the lease
                assert acquire(a.db, RETENTION, "beta", LEASE, now=NOW + 10 * (LEASE + INTERVAL)) is not None

        a.retention.report = and_meanwhile
        a.retention.loop(NOW)
        assert len(a.deleted()) == 1 and a.lines[-1].startswith("retention lease lost to another host")
        assert {c.path for c in scan(a.home)} == paths - set(a.deleted())
        a.retention.shutdown()  # releasing a lease it lost leaves beta's alone
        assert [(held.name, held.holder) for held in leases(a.db)] == [(RETENTION, "beta")]
    finally:
        a.db.close()
