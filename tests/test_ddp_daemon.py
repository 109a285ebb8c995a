"""A 2-process (torchrun, gloo) job through the real daemon: a sidecar asks for ``nproc = 2``; one rank is
SIGKILLed mid-run; the daemon retries, the job resumes from the last checkpoint and finishes with one model
version, every step's metrics exactly once, and the weights of one process trained with the same global batch."""

from __future__ import annotations

import signal
from pathlib import Path

import psutil
import pytest
from safetensors.torch import load_file

from management.db import ModelDB
from tests.e2e_helpers import DaemonProc, make_home, metrics, retrain_in_process, wait_for, write_jsonl
from trainbox.home import Home
from trainbox.status import DAEMON_STATUS, DaemonStatus, read_status

pytestmark = pytest.mark.e2e


def ranks(home: Home) -> dict[int, psutil.Process]:
    """The training ranks under the daemon's current worker (the torchrun agent), by rank."""
    status = read_status(home.status / DAEMON_STATUS, DaemonStatus)
    if status is None or status.worker_pid is None:
        return {}
    try:
        agent = psutil.Process(status.worker_pid)
        if "torch.distributed.run" not in agent.cmdline():
            return {}
        found = {}
        for p in agent.children(recursive=True):
            if "core.worker" in p.cmdline():
                found[int(p.environ().get("RANK", "-1"))] = p
        return found
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return {}


def test_two_process_job_survives_a_killed_rank(tmp_path: Path, embedded: Path) -> None:
    home = make_home(tmp_path / "home", embedded, max_steps=20)
    text = home.config_file.read_text().replace("[daemon]\n", "[daemon]\nretry_backoff = 0\n", 1)
    home.config_file.write_text(text)
    daemon = DaemonProc(home, env={"TRAINBOX_TEST_STEP_SLEEP": "0.15"})
    try:
        (home.inbox / "ddp.toml").write_text("nproc = 2\n")
        write_jsonl(home.inbox / "ddp.jsonl", [{"text": f"the fox jumps over log {i % 9}"} for i in range(48)])
        wait_for(lambda: (daemon.status()["current_job"] or {}).get("step", 0) >= 12, 120, "training past step 12")
        found = wait_for(lambda: ranks(home) if len(ranks(home)) == 2 else None, 30, "two ranks")
        found[1].send_signal(signal.SIGKILL)  # one rank dies: torchrun tears the group down
        wait_for(lambda: len(list(home.done.glob("*.jsonl"))) == 1, 180, "the job done after a retry")
        assert not list(home.failed.glob("*"))
    finally:
        assert daemon.stop() == 0, daemon.log_text()

    db = ModelDB(home.db_url)
    try:
        job = db.jobs()[0]
        runs = db.runs(job.id)
        versions = db.versions()
    finally:
        db.close()
    assert len(runs) == 2 and runs[-1].end_step == 20, runs
    assert [v.job_id for v in versions] == [job.id]  # exactly one model version
    rows = metrics(home.run_dir(job.id))
    assert [m["step"] for m in rows if m["kind"] == "train"] == list(range(1, 21))  # continuous, none twice
    log = (home.run_dir(job.id) / "worker.log").read_text()
    assert "rank1" in log and "resuming at step 10" in log

    # the same job in one process, uninterrupted: the same weights up to summation order
    want = retrain_in_process(home, job.id, tmp_path / "one", nproc=1)
    got = load_file(Path(versions[0].path) / "model.safetensors")  # the version the daemon registered
    assert want.keys() == got.keys()
    worst = max(float((want[k] - got[k]).abs().max()) for k in want)
    assert worst < 2e-5, worst
