"""A multi-node job in a fleet (issue 18, ``daemon/node_join.py``): two real ``trainbox daemon`` processes, each with
its own home, on one model DB and one shared folder. A sidecar asks for ``nnodes = 2``; one host claims the job and
runs node 0 (global rank 0, the rendezvous), the other, idle, joins it as node 1 without anyone starting anything by
hand. Then the joining host's part ends three times:
- its agent SIGKILLed mid-training: the run fails on the claiming host and is retried from its checkpoint as a new
  run, with new node slots, which an idle host joins;
- its daemon SIGKILLed and restarted at once: the new daemon stops the agent the killed one left (found through its
  last status), the run fails and is retried again;
- its daemon stopped (SIGTERM): every rank of the run stops at one step boundary, the claiming host resumes the job,
  and the stopped host, back, joins it once more.
The job ends done once: one version, every step once in its record, rank 0 only ever in the claiming host's log,
and every node slot taken once and given back."""

from __future__ import annotations

import re
import signal
import socket
from pathlib import Path

import psutil
import pytest

from management.db import ModelDB
from management.leases import NODE, leases
from tests.e2e_helpers import DaemonProc, fleet_home, metrics, wait_for, write_jsonl
from trainbox.processes import kill_tree
from trainbox.status import DAEMON_STATUS, DaemonStatus, JoinedNode, read_status

pytestmark = pytest.mark.e2e

STEPS = 16
SLOW = {"TRAINBOX_TEST_STEP_SLEEP": "0.5"}  # room for the kill to land mid-run


def joined(home_status: Path) -> JoinedNode | None:
    status = read_status(home_status / DAEMON_STATUS, DaemonStatus)
    return status.joined if status is not None else None


def trained(run_dir: Path) -> list[int]:
    """The steps the run's record holds so far (none before its first step)."""
    return [m["step"] for m in metrics(run_dir) if m["kind"] == "train"] if (run_dir / "metrics.jsonl").exists() else []


def test_an_idle_host_joins_a_multi_node_job_and_again_after_its_node_dies(tmp_path: Path, embedded: Path) -> None:
    db_url = f"sqlite:///{tmp_path / 'fleet.db'}"
    shared = tmp_path / "nfs"
    daemon = "retry_backoff = 1\nmax_retries = 3\n"
    homes = {h: fleet_home(tmp_path / f"host-{h}", shared, embedded, db_url, h, STEPS, daemon) for h in ("a", "b")}
    storage = homes["a"].ensure()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    daemons = {h: DaemonProc(home, env=SLOW) for h, home in homes.items()}

    def joining(after: int = 0) -> tuple[str, JoinedNode] | None:
        """The host whose daemon says it runs a node of a run newer than ``after``, and that node."""
        return next(((h, n) for h in homes if (n := joined(homes[h].status)) and n.run_id > after), None)

    try:
        wait_for(lambda: all((h.status / DAEMON_STATUS).exists() for h in homes.values()), 60, "both daemons up")
        (storage.inbox / "wide.toml").write_text(f'nnodes = 2\nrdzv_endpoint = "127.0.0.1:{port}"\n')
        write_jsonl(storage.inbox / "wide.jsonl", [{"text": f"the fox jumps over log {i % 9}"} for i in range(32)])

        host, node = wait_for(joining, 120, "a host joins the first run")
        run_dir = storage.run_dir(node.job_id)
        wait_for(lambda: 3 in trained(run_dir), 120, "step 3 trained")
        kill_tree(node.pid)  # the joining host's part of the job dies mid-run: the run fails, and is retried

        # a host joins the retry's run; then its daemon is SIGKILLed (its agent trains on) and comes straight back
        host, node = wait_for(lambda: joining(node.run_id), 120, "a host joins the retry's run")
        wait_for(lambda: 5 in trained(run_dir), 120, "step 5 trained")
        daemons[host].proc.send_signal(signal.SIGKILL)
        daemons[host].proc.wait(10)
        daemons[host].log.close()
        assert psutil.pid_exists(node.pid)  # the agent outlived its daemon
        daemons[host] = DaemonProc(homes[host], env=SLOW)
        wait_for(lambda: not psutil.pid_exists(node.pid), 60, "the new daemon stops the node the killed one left")

        # a host joins the next run; then its daemon is stopped (SIGTERM): it stops its node and waits for it, every
        # rank stops at one step boundary, and the claiming host pauses and resumes the job, which the stopped
        # host, back, joins again
        host, node = wait_for(lambda: joining(node.run_id), 120, "a host joins the third run")
        wait_for(lambda: 9 in trained(run_dir), 120, "step 9 trained")
        assert daemons[host].stop() == 0, daemons[host].log_text()
        assert not psutil.pid_exists(node.pid)
        daemons[host] = DaemonProc(homes[host], env=SLOW)

        wait_for(lambda: list(storage.done.glob("*.jsonl")), 240, "the job done after the kills")
        # the joined agent exits once its rendezvous closes, a little after the claiming host filed the job:
        # stopping its daemon before that would SIGTERM it (a flaky -15 on a loaded CI machine)
        watch = ModelDB(db_url)
        try:
            wait_for(lambda: len(watch.events(None, "node_left")) >= 4, 120, "the last joined agent exited")
        finally:
            watch.close()
    finally:
        for d in daemons.values():
            assert d.stop() == 0, d.log_text()

    db = ModelDB(db_url)
    try:
        [job] = db.jobs()
        assert job.state == "done"
        assert [v.job_id for v in db.versions()] == [job.id]  # one version, registered once
        runs = db.runs(job.id)
        assert [r.outcome for r in runs] == ["failed", "failed", "interrupted", "completed"]
        joins = db.events(job.id, "node_joined")
        assert len(joins) == 4 and {e.data["run_id"] for e in joins} == {r.id for r in runs}  # each run
        left = db.events(job.id, "node_left")  # killed; killed by the next daemon; stopped; a clean exit
        assert [(e.data["run_id"], e.data["exit_code"]) for e in left if e.data["run_id"] != runs[2].id] == [
            (runs[0].id, -9),
            (runs[1].id, None),
            (runs[3].id, 0),
        ]
        assert [e.data["run_id"] for e in left] == [r.id for r in runs]
        assert "left by the previous daemon, killed" in left[1].message
        for run, join in zip(runs, joins, strict=True):
            assert join.data["host"] != run.host  # a node joins another host's run
        slots = [lease for lease in leases(db) if lease.name.startswith(NODE)]
        assert len(slots) == len(runs) and not any(lease.holder for lease in slots)  # taken once each, given back
    finally:
        db.close()
    assert trained(run_dir) == list(range(1, STEPS + 1))
    ranks = {
        p.name: {int(r) for r in re.findall(r" core\.[\w.]+ rank(\d+) ", p.read_text())}
        for p in run_dir.glob("worker*.log")
    }
    assert ranks.pop("worker.log") == {0} and set().union(*ranks.values()) == {1}  # rank 0 on the claiming host
