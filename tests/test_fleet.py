"""The fleet's hosts (issue 18): who is there, alive, holding what.

Pure rules first (staleness, who may take a host name), then the ``hosts`` rows through ``daemon/host_beat.py`` on
real SQLite and PostgreSQL with a test clock, then real daemons: two ``trainbox daemon`` processes with separate
homes on one shared DB see each other in ``trainbox fleet --json`` and ``/api/fleet``, one killed with SIGKILL goes
stale, and a third daemon that asks for a live host's name is refused.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from daemon.host_beat import HostBeat, HostTaken
from daemon.lock import InstanceLock
from management import hosts
from management.db import Job, ModelDB
from management.fleet import Claim, HostRecord, Liveness, describe, judge_claim, liveness, stale_after, summary
from management.leases import LEADER, RETENTION, acquire, claim_job, node_slot, release, take_once
from safety.checkup import Level, check_fleet
from tests.e2e_helpers import wait_for
from tests.monitoring_helpers import ServerProc
from trainbox.config import ConfigError, FleetConfig, load_settings
from trainbox.home import Home
from trainbox.states import DaemonState

NOW = 1_000_000.0


def _host(**fields: Any) -> HostRecord:
    base: dict[str, Any] = {
        "name": "alpha",
        "pid": 4242,
        "started_at": NOW - 100,
        "heartbeat_at": NOW - 1,
        "heartbeat_seconds": 5.0,
        "state": "idle",
        "home": "/srv/trainbox",
    }
    return HostRecord(**{**base, **fields})


# ---------- the pure rules ----------


def test_a_host_is_stale_after_three_of_its_own_beats_and_stopped_once_it_said_so() -> None:
    assert stale_after(5.0) == 15.0
    assert liveness(_host(heartbeat_at=NOW - 15.0), NOW) is Liveness.ALIVE
    assert liveness(_host(heartbeat_at=NOW - 15.1), NOW) is Liveness.STALE
    # judged by the beat the host promised, not the reader's setting: a slow beater is alive longer
    assert liveness(_host(heartbeat_at=NOW - 100, heartbeat_seconds=60.0), NOW) is Liveness.ALIVE
    assert liveness(_host(heartbeat_at=NOW, stopped_at=NOW), NOW) is Liveness.STOPPED
    shown = describe(_host(heartbeat_at=NOW - 20, job_id=7), NOW)
    assert shown["liveness"] == "stale" and shown["heartbeat_age_s"] == 20.0 and shown["job_id"] == 7


def test_health_names_the_stale_hosts() -> None:
    fine, detail = summary([_host(name="a"), _host(name="b", stopped_at=NOW)], NOW)
    assert fine and detail == "1 alive, 1 stopped"
    fine, detail = summary([_host(name="a"), _host(name="b", heartbeat_at=NOW - 60)], NOW)
    assert not fine and detail.startswith("1 alive, 1 stale: b silent")
    assert summary([], NOW) == (True, "no hosts yet")


def test_who_may_take_a_host_name() -> None:
    assert judge_claim(None, NOW, None).claim is Claim.TAKE
    assert judge_claim(_host(stopped_at=NOW - 1), NOW, None).claim is Claim.TAKE
    dead = judge_claim(_host(heartbeat_at=NOW - 16), NOW, None)
    assert dead.claim is Claim.TAKE and "dead" in dead.reason
    fresh = _host(heartbeat_at=NOW - 1)
    # a fresh row is watched, not refused at once ...
    assert judge_claim(fresh, NOW, None).claim is Claim.WAIT
    assert judge_claim(fresh, NOW + 2, first_seen=fresh.heartbeat_at).claim is Claim.WAIT
    # ... refused once its daemon beats again while we watch: a live daemon holds the name
    beaten = judge_claim(_host(heartbeat_at=NOW + 4), NOW + 4, first_seen=fresh.heartbeat_at)
    assert beaten.claim is Claim.REFUSE
    assert "'alpha'" in beaten.reason and "pid 4242" in beaten.reason and "unique" in beaten.reason
    # ... and taken at once when it is the row of this home's previous daemon, whose lock the claimant holds
    assert judge_claim(fresh, NOW, None, own={(4242, "/srv/trainbox")}).claim is Claim.TAKE
    assert judge_claim(fresh, NOW, None, own={(4242, "/srv/other")}).claim is Claim.WAIT  # another machine's
    assert judge_claim(fresh, NOW, None, own={(4243, "/srv/trainbox")}).claim is Claim.WAIT


def test_the_host_name_defaults_to_the_machines_and_must_be_printable(tmp_path: Path) -> None:
    import socket

    assert FleetConfig().host == socket.gethostname()
    assert FleetConfig(host="gpu-7").host == "gpu-7"
    config = tmp_path / "trainbox.toml"
    for bad in ("evil\u202egnp", "tab\there", " padded", "x" * 65):
        config.write_text(f"[fleet]\nhost = {json.dumps(bad)}\n")
        with pytest.raises(ConfigError, match=r"fleet\.host"):
            load_settings(config)


# ---------- the rows, on SQLite and PostgreSQL, with a test clock ----------


class Clock:
    """Time for HostBeat: ``sleep`` advances it and runs what the rest of the fleet does meanwhile."""

    def __init__(self) -> None:
        self.now = NOW
        self.meanwhile: list[Any] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        for act in self.meanwhile:
            act(self.now)


def _beat(db: ModelDB, clock: Clock, name: str, home: str) -> HostBeat:
    fleet = FleetConfig(host=name, heartbeat_seconds=5.0)
    return HostBeat(db, fleet, Path(home), gpus=0, clock=clock, sleep=clock.sleep)


def test_a_live_host_keeps_its_name_and_a_dead_one_loses_it(any_db_url: str, tmp_path: Path) -> None:
    db = ModelDB(any_db_url)
    clock = Clock()
    try:
        first = _beat(db, clock, "alpha", "/homes/a")
        assert first.claim(NOW, None) == "a new host"
        row = hosts.host(db, "alpha")
        assert row is not None and row.state == "starting" and row.home == "/homes/a" and row.pid == os.getpid()

        # a second daemon asking for the name while the first beats: refused, naming the holder
        clock.meanwhile = [lambda now: first.tick(now, DaemonState.IDLE, None, False)]
        with pytest.raises(HostTaken, match=r"held by a live daemon.*home /homes/a"):
            _beat(db, clock, "alpha", "/homes/b").claim(clock.now, None)
        assert clock.now - NOW < 10  # refused at the holder's next beat, not after its stale limit

        # the first goes silent: the second waits for the stale limit, then takes the name
        clock.meanwhile = []
        second = _beat(db, clock, "alpha", "/homes/b")
        reason = second.claim(clock.now, None)
        assert "dead" in reason and hosts.host(db, "alpha") == second.mine
        # the first, back from its silence, finds its row taken: told once, then quiet
        assert first.tick(clock.now + 1, DaemonState.TRAINING, 3, False) is False
        assert first.tick(clock.now + 10, DaemonState.TRAINING, 3, False) is True
        first.stop(clock.now + 11)
        row = hosts.host(db, "alpha")
        assert row is not None and row.home == "/homes/b" and row.stopped_at is None

        # a clean stop frees the name at once; a daemon killed and restarted in its home takes its own row at once
        second.stop(clock.now)
        assert _beat(db, clock, "alpha", "/homes/c").claim(clock.now, None).endswith("stopped cleanly")
        # a daemon killed with -9 (pid 999999, say) and restarted in its home: the pid it left in the home's lock
        # file names the row as its own, free at once (no wait for it to go stale: the clock does not move)
        home = tmp_path / "d"
        home.mkdir()
        hosts.insert(db, HostRecord("delta", 999999, NOW, clock.now, 5.0, "training", 3, home=str(home)))
        (home / "trainbox.lock").write_text("999999\n")
        lock = InstanceLock(home / "trainbox.lock")
        lock.acquire()
        try:
            before = clock.now
            reason = _beat(db, clock, "delta", str(home)).claim(clock.now, lock.previous_pid)
            assert "this home's own" in reason and clock.now == before
        finally:
            lock.release()
    finally:
        db.close()


def test_beats_are_written_when_due_or_when_the_state_changes(any_db_url: str) -> None:
    db = ModelDB(any_db_url)
    clock = Clock()
    try:
        beat = _beat(db, clock, "alpha", "/homes/a")
        beat.claim(NOW, None)

        def row() -> HostRecord:
            found = hosts.host(db, "alpha")
            assert found is not None
            return found

        beat.tick(NOW + 1, DaemonState.IDLE, None, False)  # a change: written at once
        assert (row().heartbeat_at, row().state) == (NOW + 1, "idle")
        beat.tick(NOW + 2, DaemonState.IDLE, None, False)  # same reading, not due: no write
        assert row().heartbeat_at == NOW + 1
        beat.tick(NOW + 3, DaemonState.TRAINING, 4, False)
        assert (row().heartbeat_at, row().state, row().job_id) == (NOW + 3, "training", 4)
        beat.tick(NOW + 8.5, DaemonState.TRAINING, 4, False)  # due (5 s)
        assert row().heartbeat_at == NOW + 8.5
        beat.stop(NOW + 9)
        assert (row().state, row().stopped_at, row().job_id) == ("stopped", NOW + 9, None)
    finally:
        db.close()


# ---------- the leases each host holds, as trainbox fleet and /api/fleet show them ----------


def test_the_fleet_view_shows_each_hosts_lineage_lease_the_leader_and_retention(
    any_db_url: str, tmp_path: Path
) -> None:
    db = ModelDB(any_db_url)
    now = time.time()  # the CLI and the API judge expiry by the real clock
    try:
        for name, stopped in (("alpha", None), ("beta", None), ("gamma", now - 5)):
            hosts.insert(db, _host(name=name, heartbeat_at=now, started_at=now - 60, stopped_at=stopped))
        with db.session() as s:
            for lineage in ("chat", "code"):
                s.add(Job(name=f"{lineage}.jsonl", lineage=lineage, priority="normal", state="queued", admitted_at=1.0))
        # alpha claims a job of one lineage and leads; beta claimed the other long ago and stopped renewing
        mine = claim_job(db, "alpha", ttl=60, now=now)
        stale = claim_job(db, "beta", ttl=60, now=now - 100)
        assert mine is not None and stale is not None and mine.lineage != stale.lineage
        assert acquire(db, LEADER, "alpha", ttl=60, now=now) is not None
        assert acquire(db, RETENTION, "beta", ttl=60, now=now) is not None
        assert take_once(db, node_slot(9, 1), "gamma", ttl=60, job_id=mine.job_id, now=now) is not None

        home = Home(tmp_path / "home").ensure()
        home.config_file.write_text(f'[db]\nurl = "{any_db_url}"\n')
        view = json.loads(_fleet_cli(home, "--json"))
        assert (view["leader"], view["retention"]) == ("alpha", "beta")
        by = {h["name"]: h for h in view["hosts"]}
        alpha, beta = by["alpha"]["lineage"], by["beta"]["lineage"]
        assert (alpha["name"], alpha["job_id"], alpha["generation"], alpha["expired"]) == (
            mine.lineage,
            mine.job_id,
            1,
            False,
        )
        assert alpha["expires_at"] == mine.lease.expires_at and 0 < alpha["expires_in_s"] <= 60
        # beta's lease ran out: shown as its last one, expired, for another host to take
        assert (beta["name"], beta["job_id"], beta["expired"]) == (stale.lineage, stale.job_id, True)
        assert beta["expires_in_s"] < 0
        assert by["gamma"]["lineage"] is None
        assert by["gamma"]["node"] == {"job_id": mine.job_id, "run_id": 9, "node": 1}  # a node of alpha's job
        assert by["alpha"]["node"] is None and by["beta"]["node"] is None
        assert [(n, by[n]["leader"], by[n]["retention"]) for n in by] == [
            ("alpha", True, False),
            ("beta", False, True),
            ("gamma", False, False),
        ]
        table = _fleet_cli(home)
        assert f"{mine.lineage} (job {mine.job_id}, gen 1," in table and "expired" in table
        assert "leader: alpha; retention deletes on: beta" in table
        assert f"node 1 of job {mine.job_id} (run 9)" in table

        # the API says the same, validated by its schema
        from fastapi.testclient import TestClient

        from monitoring.app import create_app

        with TestClient(create_app(home, load_settings(home.config_file))) as client:
            api = client.get("/api/fleet").json()
        assert (api["leader"], api["retention"]) == ("alpha", "beta")
        assert [(h["name"], (h["lineage"] or {}).get("job_id")) for h in api["hosts"]] == [
            ("alpha", mine.job_id),
            ("beta", stale.job_id),
            ("gamma", None),
        ]
        assert [h["node"] for h in api["hosts"]] == [None, None, {"job_id": mine.job_id, "run_id": 9, "node": 1}]

        # the lease released (its job left the host): alpha holds no lineage any more
        release(db, mine.lease)
        after = json.loads(_fleet_cli(home, "--json"))
        assert after["hosts"][0]["lineage"] is None
    finally:
        db.close()


# ---------- real daemons sharing one DB ----------

FLEET_CONFIG = """
[daemon]
poll_interval = 0.2
warm_worker = false

[db]
url = "{url}"

[fleet]
host = "{host}"
heartbeat_seconds = 0.5
"""


def _fleet_home(root: Path, url: str, host: str) -> Home:
    home = Home(root).ensure()
    home.config_file.write_text(FLEET_CONFIG.format(url=url, host=host))
    return home


def _daemon(home: Home) -> subprocess.Popen[bytes]:
    with open(home.root / "daemon-test.log", "ab") as log:  # the child keeps its own descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "cli", "daemon", "--home", str(home.root)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _by_name(url: str) -> dict[str, HostRecord]:
    db = ModelDB(url)
    try:
        return {h.name: h for h in hosts.all_hosts(db)}
    finally:
        db.close()


def _fleet_cli(home: Home, *args: str) -> str:
    """``trainbox fleet`` run in this process (the command's own code against the shared DB, without the
    seconds of a fresh interpreter)."""
    from typer.testing import CliRunner

    from cli.common import console
    from cli.main import app

    # a wide terminal: the table's cells whole, not cut to 80 columns (the console's width is fixed when it is
    # made, from $COLUMNS at that moment: set here, whatever the process's environment was at import)
    width = console.width
    console.width = 250
    try:
        result = CliRunner().invoke(app, ["fleet", "--home", str(home.root), *args])
    finally:
        console.width = width
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.e2e
def test_two_daemons_see_each_other_and_a_killed_one_goes_stale(tmp_path: Path, any_db_url: str) -> None:
    a, b = _fleet_home(tmp_path / "a", any_db_url, "alpha"), _fleet_home(tmp_path / "b", any_db_url, "beta")
    procs: list[subprocess.Popen[Any]] = [_daemon(a), _daemon(b)]
    server: ServerProc | None = None
    try:
        server = ServerProc(a)  # starts while the daemons do
        wait_for(
            lambda: {n: h.state for n, h in _by_name(any_db_url).items()} == {"alpha": "idle", "beta": "idle"},
            60,
            "both daemons idle in the hosts table",
            every=0.25,
        )
        shown = json.loads(_fleet_cli(b, "--json"))["hosts"]  # from either home: one fleet
        alive = [(h["name"], h["liveness"], h["state"]) for h in shown]
        assert alive == [("alpha", "alive", "idle"), ("beta", "alive", "idle")]
        assert {h["pid"] for h in shown} == {p.pid for p in procs}
        assert {h["home"] for h in shown} == {str(a.root), str(b.root)}

        os.killpg(procs[1].pid, signal.SIGKILL)
        procs[1].wait(10)
        # meanwhile a third daemon asks for alpha's name
        c = _fleet_home(tmp_path / "c", any_db_url, "alpha")
        third = subprocess.Popen(
            [sys.executable, "-m", "cli", "daemon", "--home", str(c.root)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        procs.append(third)

        def fleet_api() -> dict[str, dict[str, Any]]:
            assert server is not None
            r = httpx.get(server.url + "/api/fleet", timeout=10)
            assert r.status_code == 200
            return {h["name"]: h for h in r.json()["hosts"]}

        api = wait_for(lambda: (f := fleet_api())["beta"]["liveness"] == "stale" and f, 30, "beta stale in /api/fleet")
        assert api["alpha"]["liveness"] == "alive" and api["alpha"]["pid"] == procs[0].pid
        health = check_fleet(any_db_url, time.time())  # trainbox health's look, read-only
        assert health.level is Level.WARNING and "beta silent" in health.detail

        # the third is refused, saying why; alpha is untouched
        out, _ = third.communicate(timeout=60)
        assert third.returncode == 1, out
        assert "'alpha'" in out and "unique in a fleet" in out
        assert _by_name(any_db_url)["alpha"].pid == procs[0].pid

        table = _fleet_cli(a)
        assert "alpha" in table and "beta" in table and "stale" in table

        procs[0].send_signal(signal.SIGTERM)  # a clean stop says so at once
        assert procs[0].wait(30) == 0
        assert fleet_api()["alpha"]["liveness"] == "stopped"
    finally:
        if server is not None:
            server.stop()
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(10)
