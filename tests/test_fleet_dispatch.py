"""A fleet's dispatch (issue 18): several daemons, each with its own home, on one ``[storage] shared`` folder
and one model DB (a real PostgreSQL database, and one SQLite file), with ``[fleet] enabled``. Driven
through ``Daemon.tick`` in this process with the stub worker and gate (``tests/daemon_stubs.py``), the
daemons ticked in turn as hosts would run side by side:
- a queue over three lineages is trained by several hosts, each job once, each lineage one chain of
  versions and never two of its jobs at once, each lineage's jobs in priority order;
- a host that dies while training (its daemon and worker gone) leaves its job to another host once its
  lease expires; the other resumes it and files it once; the first, back from a partition, finds its
  lease taken and drops the job without filing anything."""

from __future__ import annotations

import itertools
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from daemon.main import Daemon
from management import fleet_controls
from management.db import ModelDB, Run
from management.leases import leases
from tests.daemon_stubs import EVALUATE_ENTRY, worker_command
from tests.test_daemon_tick import FAST, drop, plan, starts
from trainbox import control
from trainbox.config import Settings
from trainbox.home import Home
from trainbox.states import JobState

LONG, SHORT = 30.0, 2.0  # lease seconds: as deployed; short, so a dead host's job moves on within the test


@pytest.fixture(params=["sqlite", "postgresql"])
def fleet_db(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'nfs' / 'fleet.db'}"
    return str(request.getfixturevalue("postgres_server").create_database())


@pytest.fixture
def hosts(tmp_path: Path, fleet_db: str) -> Iterator[Callable[[str], Daemon]]:
    made: list[Daemon] = []
    shared = tmp_path / "nfs"
    for lineage in ("x", "y"):  # made before the inbox is watched: watchdog warns when it meets a folder
        for priority in ("high", "normal", "low"):  # whose subfolder appeared in the same instant
            (shared / "inbox" / lineage / priority).mkdir(parents=True, exist_ok=True)

    def make(name: str, lease: float = LONG) -> Daemon:
        settings = Settings.model_validate(
            {
                "daemon": FAST,
                "db": {"url": fleet_db},
                "fleet": {"enabled": True, "host": name, "lease_seconds": lease, "heartbeat_seconds": 0.2},
            }
        )
        home = Home(tmp_path / f"host-{name}", shared)
        d = Daemon(home, settings, worker_command=worker_command, evaluate_entry=EVALUATE_ENTRY)
        d.start()
        made.append(d)
        return d

    yield make
    for d in made:
        if not d.finished:
            d.shutdown()


def tick_all(daemons: list[Daemon], cond: Callable[[], object], what: str, timeout: float = 40.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for d in daemons:
            d.tick(time.time())
        if cond():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def runs_by_job(db: ModelDB) -> dict[int, list[Run]]:
    out: dict[int, list[Run]] = {}
    for job in db.jobs():
        out[job.id] = db.runs(job.id)
    return out


def test_a_queue_over_three_lineages_is_shared_by_the_hosts_one_chain_each(
    hosts: Callable[[str], Daemon], tmp_path: Path
) -> None:
    fleet = [hosts(n) for n in ("a", "b", "c")]
    leader = next(d for d in fleet if d.fleet is not None and d.fleet.leading)
    for d in fleet:  # everything admitted before anything runs, so each lineage's order is the queue's
        control.submit(d.home.control, control.Action.PAUSE)
    home = fleet[0].home
    files = [
        (f"{lin}-{i}.jsonl", lin, pri)
        for i, pri in enumerate(("low", "high", "normal", "high"))
        for lin in ("x", "y", "main")
    ]
    for name, lineage, priority in files:
        drop(home, name, priority if lineage == "main" else f"{lineage}/{priority}")
    db = leader.db
    assert db is not None
    tick_all(fleet, lambda: sum(j.state == JobState.QUEUED for j in db.jobs()) == 12, "12 queued")
    for d in fleet:
        control.submit(d.home.control, control.Action.RESUME)
    tick_all(fleet, lambda: len(list(home.done.glob("*.jsonl"))) == 12, "12 done")

    assert sorted(line.split()[0] for line in starts(Home(home.storage))) == sorted(n for n, _, _ in files)  # each once
    jobs = {j.id: j for j in db.jobs()}
    runs = runs_by_job(db)
    assert all(len(r) == 1 for r in runs.values())
    assert len({r[0].host for r in runs.values()}) >= 2  # the work was shared
    for lineage in ("x", "y", "main"):
        mine = sorted((r[0] for jid, r in runs.items() if jobs[jid].lineage == lineage), key=lambda r: r.started_at)
        spans = [(r.started_at, r.ended_at or 0.0) for r in mine]
        assert all(end <= nxt for (_, end), (nxt, _) in itertools.pairwise(spans)), lineage  # one at a time
        ranks = [("high", "normal", "low").index(jobs[r.job_id].priority) for r in mine]
        assert ranks == sorted(ranks), lineage  # in priority order
        chain = db.versions(lineage=lineage)
        assert [v.parent_id for v in chain] == [None, *(v.id for v in chain[:-1])], lineage  # one chain
    assert {h.holder for h in leases(db) if h.name != "leader"} == {""}  # every lineage's lease given back


def test_a_dead_hosts_job_is_resumed_elsewhere_and_the_cut_off_host_files_nothing(
    hosts: Callable[[str], Daemon],
) -> None:
    a = hosts("a", SHORT)
    home = a.home
    plan(Home(home.storage), {"long.jsonl": ["wait", "complete"]})  # the stub reads it beside runs/
    drop(home, "long.jsonl", "x")
    tick_all([a], lambda: starts(Home(home.storage)) == ["long.jsonl wait"], "a trains long.jsonl")
    b = hosts("b", SHORT)
    worker = a.worker
    assert worker is not None
    os.killpg(worker.popen.pid, signal.SIGKILL)  # host a dies: its worker with it, its daemon ticks no more
    worker.popen.wait(10)
    tick_all([b], lambda: len(list(home.done.glob("*.jsonl"))) == 1, "b resumes and files long.jsonl")
    assert starts(Home(home.storage)) == ["long.jsonl wait", "long.jsonl complete"]
    db = b.db
    assert db is not None
    [job] = db.jobs()
    assert [r.host for r in db.runs(job.id)] == ["a", "b"] and len(db.versions(lineage="x")) == 1
    assert [r.lease_generation for r in db.runs(job.id)] == [1, 2]  # b's run is the lineage's next claim
    a.tick(time.time())  # a is back: its lease was taken
    assert a.worker is None and any(e.kind == "lease_lost" for e in db.events(job_id=job.id))
    assert len(list(home.done.glob("*.jsonl"))) == 1 and len(db.versions()) == 1  # nothing filed twice


def test_pause_resume_and_stop_address_one_host_or_the_fleet(hosts: Callable[[str], Daemon], tmp_path: Path) -> None:
    a, b = hosts("a"), hosts("b")
    db = a.db
    assert db is not None
    (tmp_path / "host-a" / "trainbox.toml").write_text(f'[db]\nurl = "{a.settings.db.url}"\n')
    out = CliRunner().invoke(app, ["pause", "--fleet", "--home", str(tmp_path / "host-a")])
    assert out.exit_code == 0 and "every host of the fleet" in out.output, out.output
    tick_all([a, b], lambda: a.paused and b.paused, "both hosts paused")
    fleet_controls.submit(db, "resume", "b")  # one host resumes: it trains, the other stays paused
    drop(a.home, "one.jsonl", "x")
    tick_all([a, b], lambda: len(list(a.home.done.glob("*.jsonl"))) == 1, "b trains one.jsonl")
    assert a.paused and not b.paused and [r.host for r in db.runs(db.jobs()[0].id)] == ["b"]
    c = hosts("c")  # a host that joins a paused fleet starts paused (the newest request for it: pause)
    assert c.paused
    fleet_controls.submit(db, "stop")
    tick_all([a, b, c], lambda: a.finished and b.finished and c.finished, "every host stopped")
    assert sum(e.message == "stop applied (for the fleet)" for e in db.events()) == 3


def test_a_host_stopped_between_its_renewal_and_its_filing_files_nothing(
    hosts: Callable[[str], Daemon],
) -> None:
    """Fencing inside the filing's transactions: host a's worker completed, but a was stopped (a partition, a
    paused process) after its last renewal and before it reaped; its lease expired, b resumed the job and
    filed it. a's reap (no renewal first) must register no second version and move no file."""
    a = hosts("a", SHORT)
    home = a.home
    plan(Home(home.storage), {"cut.jsonl": ["complete", "complete"]})
    drop(home, "cut.jsonl", "x")
    tick_all([a], lambda: a.worker is not None, "a trains cut.jsonl")
    worker = a.worker
    assert worker is not None
    worker.popen.wait(20)  # a's worker completed; a does not tick (cut off)
    b = hosts("b", SHORT)
    tick_all([b], lambda: len(list(home.done.glob("*.jsonl"))) == 1, "b resumes and files cut.jsonl")
    db = b.db
    assert db is not None
    [job] = db.jobs()
    assert len(db.versions(lineage="x")) == 1
    a.reap_worker(time.time())  # a is back mid-tick, past its renewal: the fence alone must stop it
    assert a.worker is None and a.fleet is not None and a.fleet.job is None
    assert any(e.kind == "lease_lost" and e.data.get("host") == "a" for e in db.events(job_id=job.id))
    assert len(db.versions()) == 1 and len(list(home.done.glob("*.jsonl"))) == 1  # nothing filed twice
    assert db.job(job.id).state == JobState.DONE  # type: ignore[union-attr]
    assert not list(home.failed.glob("*.jsonl")) and not list(home.processing.iterdir())
