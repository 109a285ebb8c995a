"""Chaos across hosts (issue 18): three real ``trainbox daemon`` processes, each with its own home, on one
PostgreSQL database and one shared storage folder (``[fleet] enabled``), train six files of three lineages
with the real worker on the tiny model while hosts die:
- one host dies while training (its daemon and its worker SIGKILLed, and it stays down): another host
  resumes its job from the last checkpoint once the lease expires;
- one daemon is SIGKILLed while its worker trains and comes straight back (a crash that systemd restarts):
  it stops its orphaned worker (which checkpoints) and resumes its own job at once (its lease is its own).
Afterwards every file is in ``done/`` once and nowhere else, each job has one version, each lineage is one
chain, and every job's metrics hold each step once (nothing trained twice)."""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import psutil
import pytest

from management.db import ModelDB
from tests.e2e_helpers import DaemonProc, fleet_home, metrics, wait_for, write_jsonl
from trainbox.home import Home
from trainbox.processes import is_worker_pid
from trainbox.status import DAEMON_STATUS, TRAINING_STATUS, DaemonStatus, TrainingStatus, read_status

pytestmark = pytest.mark.e2e

STEPS = 8
HOSTS = ("a", "b", "c")
FILES = [("x", "x-cats"), ("y", "y-dogs"), ("main", "m-owls"), ("x", "x-cows"), ("y", "y-eels"), ("main", "m-fox")]
SLOW = {"TRAINBOX_TEST_STEP_SLEEP": "0.15"}  # steps long enough for a kill to land mid-training


def training_worker(home: Home) -> int | None:
    """The pid of this host's worker while it is in the training phase, else None."""
    daemon = read_status(home.status / DAEMON_STATUS, DaemonStatus)
    training = read_status(home.status / TRAINING_STATUS, TrainingStatus)
    pid = daemon.worker_pid if daemon else None
    if pid is None or training is None or training.pid != pid or training.phase != "training":
        return None
    try:
        return pid if is_worker_pid(pid) else None
    except psutil.Error:
        return None


def test_hosts_that_die_lose_nothing_and_train_nothing_twice(
    tmp_path: Path, embedded: Path, postgres_server: object
) -> None:
    db_url = str(postgres_server.create_database())  # type: ignore[attr-defined]
    shared = tmp_path / "nfs"
    homes = {h: fleet_home(tmp_path / f"host-{h}", shared, embedded, db_url, h, STEPS) for h in HOSTS}
    storage = homes["a"]
    storage.ensure()
    for lineage in ("x", "y"):
        (storage.inbox / lineage).mkdir(parents=True, exist_ok=True)
    daemons = {h: DaemonProc(home, env=SLOW) for h, home in homes.items()}
    rng = random.Random(20261202)
    try:
        for lineage, name in FILES:
            folder = storage.inbox if lineage == "main" else storage.inbox / lineage
            write_jsonl(folder / f"{name}.jsonl", [{"text": f"the {name} sees {k % 5} stars"} for k in range(40)])

        # a host dies mid-training and stays down
        dead = wait_for(lambda: next((h for h in HOSTS if training_worker(homes[h])), None), 120, "a host training")
        time.sleep(rng.uniform(0.2, 0.8))
        worker = training_worker(homes[dead])
        daemons[dead].proc.send_signal(signal.SIGKILL)
        if worker is not None:
            os.kill(worker, signal.SIGKILL)
        daemons[dead].proc.wait(10)

        # a daemon crashes while its worker trains, and is restarted on its host at once
        alive = [h for h in HOSTS if h != dead]
        crashed = wait_for(lambda: next((h for h in alive if training_worker(homes[h])), None), 120, "another training")
        time.sleep(rng.uniform(0.2, 0.8))
        daemons[crashed].proc.send_signal(signal.SIGKILL)
        daemons[crashed].proc.wait(10)
        daemons[crashed].log.close()
        daemons[crashed] = DaemonProc(homes[crashed], env=SLOW)

        wait_for(lambda: len(list(storage.done.glob("*.jsonl"))) == len(FILES), 420, "every job done after the kills")
    finally:
        for d in daemons.values():
            if d.alive():
                assert d.stop() == 0, d.log_text()
            elif not d.log.closed:
                d.log.close()

    assert sorted(p.name.partition("__")[2] for p in storage.done.glob("*.jsonl")) == sorted(
        f"{n}.jsonl" for _, n in FILES
    )
    for folder in ("failed", "processing", "admitting", "high", "normal", "low"):
        assert not list((storage.queue / folder).glob("*.jsonl")), folder
    db = ModelDB(db_url)
    try:
        jobs = db.jobs()
        assert len(jobs) == len(FILES) and {j.state for j in jobs} == {"done"}
        versions = db.versions()
        assert sorted(v.job_id for v in versions) == sorted(j.id for j in jobs)  # one version each
        for lineage in ("x", "y", "main"):
            chain = db.versions(lineage=lineage)
            assert len(chain) == 2 and chain[1].parent_id == chain[0].id, lineage  # one chain per lineage
        for job in jobs:  # every step once, across the kills and the hosts
            steps = [m["step"] for m in metrics(storage.run_dir(job.id)) if m["kind"] == "train"]
            assert steps == list(range(1, STEPS + 1)), (job.name, steps)
        hosts_of = {j.id: {r.host for r in db.runs(j.id)} for j in jobs}
        assert len(set().union(*hosts_of.values())) >= 2  # the hosts shared the work
        assert any(dead in hs and len(hs) > 1 for hs in hosts_of.values())  # the dead host's job moved on
        assert any(e.kind == "job_claimed" and e.data.get("resumed") for e in db.events())
    finally:
        db.close()
