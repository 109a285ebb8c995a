"""Chaos, aimed: SIGKILL the daemon and the worker at each moment where a crash used to split the
lineage (issue 14: admission between a sidecar and its file, before and after a worker's spawn,
inside checkpoint and final saves, between a version's row and its folder, after a gate's verdict,
while a finished job is filed), restart the daemon after each death, and check what the user keeps:
every job done once, one worker per job at every sampled instant, one chain of versions each gated
once, every run closed, no temp leftovers, every step trained once, and the same weights as an
uninterrupted run.

The kills come from the code's own crash points (trainbox/crashpoints.py), armed once for the whole
run: hits are counted across every process, so each armed hit fires exactly once.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from management.db import ModelDB
from management.versions import current_id
from tests.e2e_helpers import DaemonProc, make_home, metrics, retrain_in_process, write_jsonl
from trainbox import crashpoints
from trainbox.home import Home

pytestmark = pytest.mark.e2e

JOBS = 5
STEPS = 6
CONFIG = """
[daemon]
max_retries = 100
retry_backoff = 0
"""
# point -> the hits (counted over the whole run, every process) that are killed
ARMED = {
    "admission.between_renames": [1, 2, 3, 4, 5],
    "spawn.before_popen": [1, 2, 3, 5, 7, 9],
    "spawn.after_popen": [2, 6],
    "worker.checkpoint_saving": [2, 6],
    "worker.final_saving": [3],
    "version.row_pending": [1, 3, 5],  # jobs 1, 3 and 5 die before their folder is placed ...
    "version.renamed": [1, 2],  # ... jobs 2 and 4 right after it
    "gate.applied": [1, 2, 3, 4, 5],
    "filing.moved": [1, 2, 3, 4, 5],
}


def _make(root: Path, embedded: Path) -> Home:
    home = make_home(root, embedded, max_steps=STEPS)
    text = home.config_file.read_text()
    text = text.replace("checkpoint_every = 10", "checkpoint_every = 2").replace("eval_every = 10", "eval_every = 3")
    text = text.replace("[daemon]\n", CONFIG.strip() + "\n", 1)
    home.config_file.write_text(text)
    return home


def _drop(home: Home, i: int) -> None:
    """A sidecar and its file: each job continues the current version (continual training)."""
    (home.inbox / f"job{i}.toml").write_text('priority = "normal"\n')
    write_jsonl(home.inbox / f"job{i}.jsonl", [{"text": f"job {i} line {k}: the {k % 3} owls"} for k in range(24)])


def _workers_per_run(home: Home) -> Counter[str]:
    """Live worker processes of this home by run folder, read from /proc (other tests may run beside)."""
    runs: Counter[str] = Counter()
    for proc in psutil.process_iter(["cmdline", "status"]):
        argv = proc.info["cmdline"] or []
        if "core.worker" in argv and "--run-dir" in argv and proc.info["status"] != psutil.STATUS_ZOMBIE:
            run = argv[argv.index("--run-dir") + 1]
            if Path(run).parent == home.runs:
                runs[run] += 1
    return runs


def test_aimed_kills_keep_one_worker_one_chain_and_every_version_gated(tmp_path: Path, embedded: Path) -> None:
    home = _make(tmp_path / "home", embedded)
    crash_dir = tmp_path / "crash-hits"
    crash_dir.mkdir()
    armed = crashpoints.arming(ARMED)
    env = {crashpoints.CRASH_ENV: armed, crashpoints.CRASH_DIR_ENV: str(crash_dir)}
    daemon = DaemonProc(home, env=env)
    for i in range(JOBS):
        _drop(home, i)
    restarts = 0
    most_workers: Counter[str] = Counter()
    deadline = time.monotonic() + 600
    try:
        while len(list(home.done.glob("*.jsonl"))) < JOBS:
            if time.monotonic() > deadline:
                so_far = crashpoints.fired(ARMED, crash_dir)
                raise AssertionError(f"not every job done after {restarts} restarts: {so_far}")
            for run, count in _workers_per_run(home).items():
                most_workers[run] = max(most_workers[run], count)
            if not daemon.alive():
                assert daemon.proc.returncode == -9, daemon.log_text()[-3000:]  # only the aimed kills end it
                restarts += 1
                daemon.log.close()
                daemon = DaemonProc(home, env=env)
            time.sleep(0.05)
    finally:
        daemon.stop()
    fired = crashpoints.fired(ARMED, crash_dir)
    print("restarts:", restarts, "kills:", fired)
    assert sum(fired.values()) >= 30, fired
    assert all(fired.values()), fired  # every moment was hit at least once
    assert most_workers and max(most_workers.values()) == 1, most_workers  # never two workers on one run

    # every file in exactly one final place
    done = sorted(p.name.partition("__")[2] for p in home.done.glob("*.jsonl"))
    assert done == [f"job{i}.jsonl" for i in range(JOBS)]
    for folder in ("failed", "processing", "admitting", "high", "normal", "low"):
        assert not list((home.queue / folder).glob("*.jsonl")), folder
    assert not [p for p in home.inbox.rglob("*") if p.is_file()]

    db = ModelDB(home.db_url)
    jobs = db.jobs()
    assert len(jobs) == JOBS and {j.state for j in jobs} == {"done"}
    versions = sorted(db.versions(), key=lambda v: v.id)
    assert sorted(v.job_id for v in versions) == sorted(j.id for j in jobs)  # one version per job
    # one chain: each version continues the one before it, every one gated once and promoted
    assert [v.parent_id for v in versions] == [None, *[v.id for v in versions[:-1]]]
    for v in versions:
        gates = db.gates(v.id)
        assert len(gates) == 1 and gates[0].promoted, (v.id, [(g.promoted, g.reason) for g in gates])
    assert current_id(home) == versions[-1].id
    assert sorted(p.name for p in home.models.iterdir()) == sorted([*(Path(v.path).name for v in versions), "current"])
    for job in jobs:
        assert all(r.ended_at is not None for r in db.runs(job.id)), job.name  # every run closed
        steps = [m["step"] for m in metrics(home.run_dir(job.id)) if m["kind"] == "train"]
        assert steps == list(range(1, STEPS + 1)), (job.name, steps)  # every step once
    assert not [p for p in [*home.runs.rglob(".tmp*"), *home.models.rglob(".tmp*")]]

    # the same jobs, uninterrupted, from the same starting versions: the same weights
    for v in versions:
        want = retrain_in_process(home, v.job_id, tmp_path / "reference" / str(v.job_id))  # type: ignore[arg-type]
        got = load_file(str(Path(v.path) / "model.safetensors"))
        for key, tensor in want.items():
            torch.testing.assert_close(got[key], tensor, rtol=1e-6, atol=0, msg=f"v{v.id} {key}")
    db.close()
