"""Chaos: SIGKILL the daemon and the worker at random (seeded) moments while a queue of jobs is
admitted and trained, restart the daemon each time, and check that nothing was lost or trained
twice and that every job's final weights equal an uninterrupted run's."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from management.db import ModelDB
from tests.e2e_helpers import DaemonProc, make_home, metrics, retrain_in_process, wait_for, write_jsonl
from trainbox.home import Home
from trainbox.processes import is_worker_pid
from trainbox.status import DAEMON_STATUS, TRAINING_STATUS, DaemonStatus, TrainingStatus, read_status

pytestmark = pytest.mark.e2e

STEPS = 16
CHAOS_CONFIG = """
[daemon]
max_retries = 100
retry_backoff = 0
"""
WORDS = ["cat", "dog", "fox", "owl"]


def _make(root: Path, embedded: Path) -> Home:
    home = make_home(root, embedded, max_steps=STEPS, extra="")
    text = home.config_file.read_text()
    text = text.replace("checkpoint_every = 10", "checkpoint_every = 1").replace("eval_every = 10", "eval_every = 4")
    text = text.replace("[daemon]\n", CHAOS_CONFIG.strip() + "\n", 1)
    text = text.replace("warm_worker = false", "warm_worker = true")  # the default: kills land on warm workers too
    home.config_file.write_text(text)
    return home


def _drop(home: Home, i: int, base_model: Path) -> None:
    """Job i starts from the same base model whatever the order, so its reference run needs no other job."""
    name = f"job{i}-{WORDS[i]}"
    (home.inbox / f"{name}.toml").write_text(f'model = "{base_model}"\n')
    write_jsonl(home.inbox / f"{name}.jsonl", [{"text": f"the {WORDS[i]} sees {k % 5} stars"} for k in range(40)])


def _worker_pid(home: Home) -> int | None:
    status = read_status(home.status / DAEMON_STATUS, DaemonStatus)
    pid = status.worker_pid if status else None
    if pid is None:
        return None
    try:
        return pid if is_worker_pid(pid) else None  # a cold-started or a warm worker
    except psutil.Error:
        return None


def _phase(home: Home) -> str:
    status = read_status(home.status / TRAINING_STATUS, TrainingStatus)
    return status.phase if status else "none"


def _final_weights(home: Home) -> dict[str, dict[str, torch.Tensor]]:
    db = ModelDB(home.db_url)
    out = {}
    for v in db.versions():
        job = db.job(v.job_id)  # type: ignore[arg-type]
        assert job is not None
        out[job.name] = load_file(str(Path(v.path) / "model.safetensors"))
    db.close()
    return out


def test_random_kills_lose_nothing_and_train_nothing_twice(tmp_path: Path, embedded: Path) -> None:
    base = tmp_path / "base-model"

    shutil.copytree(embedded, base)
    rng = random.Random(20261121)
    home = _make(tmp_path / "chaos", embedded)
    kills: Counter[str] = Counter()
    slow = {"TRAINBOX_TEST_STEP_SLEEP": "0.1"}  # steps long enough to be hit; the weights do not change
    daemon = DaemonProc(home, env=slow)
    plan = ["drop", "daemon", "worker", "drop", "worker", "daemon", "worker", "drop", "daemon"]
    plan += ["worker", "drop", "worker", "daemon", "worker", "daemon"]
    dropped = 0
    for target in plan:
        if target == "drop":
            _drop(home, dropped, base)
            dropped += 1
            time.sleep(rng.uniform(0.0, 1.5))  # the next kill lands in settling, admission or a queue move
            continue
        if target == "worker":
            wait_for(lambda: _worker_pid(home) and _phase(home) == "training", 60, "a worker training")
            time.sleep(rng.uniform(0.0, 1.0))  # training, evaluating or saving a checkpoint
            worker = _worker_pid(home)
            if worker is not None:
                kills[f"worker/{_phase(home)}"] += 1
                os.kill(worker, signal.SIGKILL)
                continue
        time.sleep(rng.uniform(0.0, 2.0))
        kills["daemon"] += 1
        daemon.proc.send_signal(signal.SIGKILL)
        daemon.proc.wait(10)
        daemon.log.close()
        daemon = DaemonProc(home, env=slow)
    while dropped < len(WORDS):
        _drop(home, dropped, base)
        dropped += 1
    try:
        wait_for(lambda: len(list(home.done.glob("*.jsonl"))) == len(WORDS), 300, "every job done after the chaos")
    finally:
        assert daemon.stop() == 0, daemon.log_text()
    print("kills:", dict(kills))
    assert sum(kills.values()) >= 10 and kills["daemon"] >= 5

    # every file in exactly one final place
    assert sorted(p.name.partition("__")[2] for p in home.done.glob("*.jsonl")) == sorted(
        f"job{i}-{w}.jsonl" for i, w in enumerate(WORDS)
    )
    for folder in ("failed", "processing", "admitting", "high", "normal", "low"):
        assert not list((home.queue / folder).glob("*.jsonl")), folder
    assert not [p for p in home.inbox.rglob("*") if p.is_file()]
    db = ModelDB(home.db_url)
    jobs = db.jobs()
    assert len(jobs) == len(WORDS) and {j.state for j in jobs} == {"done"}
    versions = db.versions()
    assert sorted(v.job_id for v in versions) == sorted(j.id for j in jobs)  # one version each: none twice
    for job in jobs:  # metrics continuous: every step once
        steps = [m["step"] for m in metrics(home.run_dir(job.id)) if m["kind"] == "train"]
        assert steps == list(range(1, STEPS + 1)), (job.name, steps)
    db.close()

    # the same jobs, uninterrupted (in this process: the worker's code path without its start-up): the same weights
    got = _final_weights(home)
    assert sorted(got) == sorted(j.name for j in jobs)
    for job in jobs:
        want = retrain_in_process(home, job.id, tmp_path / "reference" / str(job.id))
        for key, tensor in want.items():
            torch.testing.assert_close(got[job.name][key], tensor, rtol=1e-6, atol=0, msg=f"{job.name} {key}")
    (tmp_path / "kills.json").write_text(json.dumps(kills))
