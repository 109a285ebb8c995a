"""Leases through the model DB (issue 18, ``management/leases.py``): the pure claim order, the lease's
life (take, renew, release, expire, fence) on SQLite and a real PostgreSQL, and real processes claiming
jobs from one DB at once: each job claimed once, never two jobs of one lineage held at the same time, a
lease that expired taken over with a new generation, and the old holder fenced out."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from management.db import Job, ModelDB
from management.leases import (
    Held,
    JobFacts,
    LeaseLost,
    acquire,
    claim_job,
    claim_order,
    fence,
    leases,
    lineage_lease,
    node_slot,
    release,
    renew,
    take_once,
)
from trainbox.states import JobState

ROOT = Path(__file__).resolve().parents[1]


def test_claim_order_one_job_per_free_lineage_started_ones_first_then_priority() -> None:
    jobs = [
        JobFacts(1, "a", "queued", "low", 1.0),
        JobFacts(2, "a", "queued", "high", 2.0),
        JobFacts(3, "b", "queued", "normal", 0.5),
        JobFacts(4, "c", "paused", "low", 9.0),  # started by a host whose lease expired
        JobFacts(5, "c", "queued", "high", 0.1),
        JobFacts(6, "d", "queued", "high", 0.2),  # d is held by another host
        JobFacts(7, "e", "queued", "high", 0.3, retry_at=200.0),  # backing off
        JobFacts(8, "f", "queued", "high", 0.4),  # f's lease expired
        JobFacts(9, "g", "queued", "normal", 0.6),  # g is this host's own (a restarted daemon)
    ]
    leases = {
        "c": Held("", "h2", 1, 50.0, 4),
        "d": Held("", "h2", 1, 150.0, 99),
        "f": Held("", "h3", 1, 99.0),
        "g": Held("", "h1", 1, 500.0, 9),
    }
    assert claim_order(jobs, leases, "h1", now=100.0) == [4, 8, 2, 3, 9]
    assert claim_order(jobs, leases, "h1", now=300.0) == [4, 6, 7, 8, 2, 3, 9]


def new_job(db: ModelDB, lineage: str, priority: str = "normal", admitted: float = 0.0) -> int:
    with db.session() as s:
        job = Job(name=f"{lineage}.jsonl", lineage=lineage, priority=priority, state="queued", admitted_at=admitted)
        s.add(job)
        s.flush()
        return job.id


def test_a_lease_is_taken_renewed_released_and_fenced(any_db_url: str) -> None:
    db = ModelDB(any_db_url)
    try:
        first = acquire(db, "leader", "h1", ttl=10, now=100.0)
        assert first is not None and first.generation == 1
        assert acquire(db, "leader", "h2", ttl=10, now=105.0) is None  # held
        renewed = renew(db, first, ttl=10, now=108.0)
        assert renewed is not None and renewed.expires_at == 118.0
        taken = acquire(db, "leader", "h2", ttl=10, now=119.0)  # expired: h2 takes it
        assert taken is not None and taken.generation == 2
        assert renew(db, first, ttl=10, now=120.0) is None  # h1 learns it lost the lease
        with pytest.raises(LeaseLost, match="held by h2 \\(generation 2\\)"), db.session() as s:
            fence(s, first)
        with db.session() as s:
            fence(s, taken)  # the holder passes
        assert not release(db, first) and release(db, taken)
        again = acquire(db, "leader", "h1", ttl=10, now=121.0)  # released: free at once
        assert again is not None and again.generation == 3
    finally:
        db.close()


def test_a_node_slot_is_taken_once_never_again_after_release_or_expiry(any_db_url: str) -> None:
    """A multi-node run's node slot (``take_once``): one host gets it; neither its own host after a release
    nor another after its expiry takes it again (the run's rendezvous admits each node once); another slot
    of the same run, or the same slot of the run's retry, is free."""
    db = ModelDB(any_db_url)
    try:
        first = take_once(db, node_slot(7, 1), "h2", ttl=10, job_id=3, now=100.0)
        assert first is not None and (first.generation, first.job_id, first.holder) == (1, 3, "h2")
        assert take_once(db, node_slot(7, 1), "h3", ttl=10, job_id=3, now=101.0) is None  # held
        assert take_once(db, node_slot(7, 1), "h3", ttl=10, job_id=3, now=200.0) is None  # expired: still taken
        assert release(db, first)
        assert take_once(db, node_slot(7, 1), "h2", ttl=10, job_id=3, now=201.0) is None  # released: still taken
        second = take_once(db, node_slot(7, 2), "h3", ttl=10, job_id=3, now=202.0)
        retry = take_once(db, node_slot(8, 1), "h2", ttl=10, job_id=3, now=203.0)
        assert second is not None and retry is not None
        assert {lease.name for lease in leases(db) if lease.holder} == {"node:7:2", "node:8:1"}
    finally:
        db.close()


def test_a_guarded_block_fences_each_transaction_and_commits_nothing_once_the_lease_is_lost(any_db_url: str) -> None:
    """``ModelDB.guarded``: every outermost transaction of the block (this thread, this DB) runs the fence
    first; a lost lease rolls that transaction back; another thread's transactions are not fenced."""
    db = ModelDB(any_db_url)
    try:
        mine = acquire(db, "lineage:x", "h1", ttl=10, now=100.0)
        assert mine is not None
        job_id = new_job(db, "x", "normal", 1.0)
        with db.guarded(lambda s: fence(s, mine)):
            set_state(db, job_id, JobState.RUNNING)  # held: written
            assert acquire(db, "lineage:x", "h2", ttl=10, now=111.0) is not None  # expired: taken over
            with pytest.raises(LeaseLost):
                set_state(db, job_id, JobState.DONE)
            other: list[object] = []
            worker = threading.Thread(target=lambda: other.append(db.job(job_id)))
            worker.start()
            worker.join(30)
            assert other and other[0] is not None  # another thread reads unfenced
        assert db.job(job_id).state == JobState.RUNNING.value  # type: ignore[union-attr]
    finally:
        db.close()


def set_state(db: ModelDB, job_id: int, state: JobState) -> None:
    with db.session() as s:
        job = s.get(Job, job_id)
        assert job is not None
        job.state = state.value


def test_claims_follow_priority_keep_a_lineage_to_one_job_and_resume_after_expiry(any_db_url: str) -> None:
    db = ModelDB(any_db_url)
    try:
        new_job(db, "a", "low", 1.0)
        a2 = new_job(db, "a", "high", 2.0)
        b1 = new_job(db, "b", "normal", 3.0)
        first = claim_job(db, "h1", ttl=30, now=100.0)
        assert first is not None and (first.job_id, first.lineage, first.resumed) == (a2, "a", False)
        set_state(db, a2, JobState.RUNNING)  # as the daemon does when its worker starts
        second = claim_job(db, "h2", ttl=30, now=101.0)
        assert second is not None and second.job_id == b1  # a is held: h2 takes the next free lineage
        set_state(db, b1, JobState.RUNNING)
        assert claim_job(db, "h3", ttl=30, now=102.0) is None  # both lineages held
        assert renew(db, second.lease, ttl=30, now=120.0) is not None  # h2 lives on; h1 died (expired at 130)
        # a host that cannot take a2 leaves lineage a alone (never a1 out of order) and b is held
        assert claim_job(db, "h3", ttl=30, now=140.0, accept=lambda job: job.id != a2) is None
        resumed = claim_job(db, "h3", ttl=30, now=140.0)
        assert resumed is not None and (resumed.job_id, resumed.resumed) == (a2, True)
        assert resumed.lease.generation == first.lease.generation + 1
        with pytest.raises(LeaseLost), db.session() as s:
            fence(s, first.lease)  # h1, back from a partition, cannot finish a2
    finally:
        db.close()


# a claiming process: claims, "trains" a moment, finishes under its fence, releases; logs each step
WORKER = """
import json, sys, time
from management.db import Job, ModelDB
from management.leases import LeaseLost, claim_job, fence, release
db = ModelDB(sys.argv[1]); host = sys.argv[2]; log = open(sys.argv[3], "a")
def note(claim, ev):
    row = {"host": host, "job": claim.job_id, "lineage": claim.lineage, "t": time.time(), "ev": ev}
    log.write(json.dumps(row) + "\\n"); log.flush()
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    claim = claim_job(db, host, ttl=30)
    if claim is None:
        with db.session() as s:
            left = s.query(Job).filter(Job.state == "queued").count()
        if left == 0:
            break
        time.sleep(0.01)
        continue
    note(claim, "claim")  # after the claim's commit
    time.sleep(0.02)
    note(claim, "end")  # before the end's commit and the release
    with db.session() as s:
        fence(s, claim.lease)
        s.get(Job, claim.job_id).state = "done"
    release(db, claim.lease)
db.close()
"""


def test_processes_claiming_at_once_take_each_job_once_and_one_job_per_lineage(any_db_url: str, tmp_path: Path) -> None:
    db = ModelDB(any_db_url)
    for i in range(24):
        new_job(db, f"l{i % 4}", ("high", "normal", "low")[i % 3], float(i))
    db.close()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    logs = [tmp_path / f"h{n}.log" for n in range(3)]
    procs = [
        subprocess.Popen([sys.executable, "-c", WORKER, any_db_url, f"h{n}", str(log)], env=env)
        for n, log in enumerate(logs)
    ]
    for p in procs:
        assert p.wait(timeout=90) == 0
    events = [json.loads(line) for log in logs if log.exists() for line in log.read_text().splitlines()]
    claims = [e for e in events if e["ev"] == "claim"]
    assert sorted(e["job"] for e in claims) == list(range(1, 25))  # each job claimed exactly once
    for lineage in ("l0", "l1", "l2", "l3"):  # a lineage's claim..end intervals never overlap
        spans = sorted(
            (c["t"], next(e["t"] for e in events if e["ev"] == "end" and e["job"] == c["job"]))
            for c in claims
            if c["lineage"] == lineage
        )
        assert all(end <= nxt for (_, end), (nxt, _) in itertools.pairwise(spans)), lineage
    db = ModelDB(any_db_url)
    try:
        assert {j.state for j in db.jobs()} == {"done"}
        rows = {h.name: h for h in leases(db)}
        assert sorted(rows) == [lineage_lease(f"l{i}") for i in range(4)]
        assert all(h.holder == "" for h in rows.values())  # every lease released
        assert sum(h.generation for h in rows.values()) == 24  # one generation per claim
    finally:
        db.close()
