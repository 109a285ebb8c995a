"""A 2-node job through the real daemon, as the claiming host: a sidecar asks for ``nnodes = 2``; the daemon starts
its torchrun agent at the job's c10d rendezvous (``core.multinode``, ``is_host=1``) and the test joins as the second
host would, with ``node_command(..., claiming=False)`` (what the fleet will call); the job ends done with one version,
rank 0 on the daemon's agent, the joining host's log in a file of its own."""

from __future__ import annotations

import re
import socket
import subprocess
from pathlib import Path

import psutil
import pytest

from daemon.worker_process import job_launch, node_command, node_log
from management.db import ModelDB
from tests.e2e_helpers import DaemonProc, make_home, metrics, wait_for, write_jsonl
from trainbox.jobspec import JOB_SPEC
from trainbox.processes import child_env, kill_tree
from trainbox.status import DAEMON_STATUS, DaemonStatus, read_status

pytestmark = pytest.mark.e2e


def test_the_daemon_claims_a_two_node_job_and_another_host_joins(tmp_path: Path, embedded: Path) -> None:
    home = make_home(tmp_path / "home", embedded, max_steps=8)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    daemon = DaemonProc(home)
    joiner: subprocess.Popen[bytes] | None = None
    try:
        (home.inbox / "wide.toml").write_text(f'nnodes = 2\nrdzv_endpoint = "127.0.0.1:{port}"\n')
        write_jsonl(home.inbox / "wide.jsonl", [{"text": f"the fox jumps over log {i % 9}"} for i in range(32)])
        run_dir = wait_for(lambda: next(iter(home.runs.glob(f"job-*/{JOB_SPEC}")), None), 60, "the job started").parent

        def agent() -> psutil.Process | None:
            status = read_status(home.status / DAEMON_STATUS, DaemonStatus)
            return psutil.Process(status.worker_pid) if status is not None and status.worker_pid else None

        claiming = wait_for(agent, 30, "the daemon's worker")
        assert "core.multinode" in claiming.cmdline() and "--rdzv-conf=is_host=1" in claiming.cmdline()
        log = node_log(run_dir, claiming=False, host="joiner")
        with open(log, "wb") as out:  # the second host, as the fleet will start it
            argv = node_command(run_dir, job_launch(run_dir), claiming=False)
            joiner = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, env=child_env(), start_new_session=True
            )
        wait_for(lambda: list(home.done.glob("*.jsonl")), 180, "the job done")
        assert joiner.wait(60) == 0, log.read_text()
    finally:
        if joiner is not None and joiner.poll() is None:
            kill_tree(joiner.pid)
            joiner.wait(10)
        assert daemon.stop() == 0, daemon.log_text()

    db = ModelDB(home.db_url)
    try:
        [job] = db.jobs()
        versions = db.versions()
    finally:
        db.close()
    assert [v.job_id for v in versions] == [job.id]  # one version, registered by the claiming daemon
    assert [m["step"] for m in metrics(run_dir) if m["kind"] == "train"] == list(range(1, 9))
    ranks_in = {
        p: {int(r) for r in re.findall(r" core\.[\w.]+ rank(\d+) ", p.read_text())}
        for p in (run_dir / "worker.log", log)
    }
    assert ranks_in == {run_dir / "worker.log": {0}, log: {1}}  # rank 0 on the claiming host, each host its own log
