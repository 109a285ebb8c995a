"""A real status server in a subprocess, for tests and benchmarks: ``with ServerProc(home) as srv:``.

It starts ``python -m monitoring.server --home H --port 0``, waits (bounded) for the URL line, and
reads the token the server created, so a test talks to exactly what ``trainbox serve`` runs.
"""

from __future__ import annotations

import json
import math
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from daemon.admission import write_error
from management.db import Checkpoint, Job, MemoryScore, MemorySet, ModelDB, ModelVersion, Run
from monitoring.server import URL_PREFIX
from monitoring.token import read_token
from trainbox.atomic import atomic_write_json
from trainbox.home import Home
from trainbox.spool import Spool, spool_name
from trainbox.states import DaemonState, JobState, Priority
from trainbox.status import DAEMON_STATUS, TRAINING_STATUS, DaemonStatus, TrainingStatus, write_status

# Debian's Chromium, run headless with no background networking (the machines have no internet).
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


class ServerProc:
    def __init__(
        self,
        home: Home,
        *args: str,
        env: dict[str, str] | None = None,
        start_timeout: float = 30.0,
    ) -> None:
        self.home = home
        self.output: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "monitoring.server", "--home", str(home.root), "--port", "0", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        try:
            self.url = self._wait_for_url(start_timeout).rstrip("/")
            token = read_token(home)
            if token is None:
                raise RuntimeError(f"the server started but wrote no token under {home.root}")
            self.token = token
        except BaseException:
            self.stop()
            raise

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line)
            self._lines.put(line)
        self._lines.put(None)

    def _wait_for_url(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._lines.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                raise RuntimeError(f"status server exited ({self.proc.wait()}): {''.join(self.output)}")
            if line.startswith(URL_PREFIX):
                return line[len(URL_PREFIX) :].strip()
        raise TimeoutError(f"no URL line from the status server within {timeout}s: {''.join(self.output)}")

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL of its process group after ``timeout``; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode

    def __enter__(self) -> ServerProc:
        return self

    def __exit__(self, *exc: object | TracebackType) -> None:
        self.stop()


# ---------- a realistic instance without a daemon: status files, spool, run folder, DB rows ----------

FAKE_JOB = 5  # the job the fake daemon is training


def write_daemon_status(home: Home, **fields: Any) -> DaemonStatus:
    """daemon.json as a live daemon training FAKE_JOB writes it; ``fields`` override (pid defaults to ours)."""
    now = time.time()
    st = DaemonStatus(
        state=DaemonState.TRAINING,
        pid=os.getpid(),
        started_at=now - 60,
        heartbeat=now,
        current_job=FAKE_JOB,
        current_job_name="current.jsonl",
        worker_pid=os.getpid(),
        queue=Spool(home).counts(),
    )
    st = st.model_copy(update=fields)
    write_status(home.status / DAEMON_STATUS, st)
    return st


def write_training_status(home: Home, step: int, total_steps: int = 300, **fields: Any) -> TrainingStatus:
    now = time.time()
    st = TrainingStatus(
        job_id=FAKE_JOB,
        job_name="current.jsonl",
        phase="training",
        pid=os.getpid(),
        started_at=now - 30,
        heartbeat=now,
        step=step,
        total_steps=total_steps,
        epoch=0,
        loss=train_loss(step),
        val_loss=train_loss(step // 25 * 25) + 0.1 if step >= 25 else None,
        learning_rate=3e-4,
        grad_norm=0.8,
        tokens_per_s=5120.0,
        eta_s=(total_steps - step) * 0.1,
        device="cpu",
        engine="plain",
    ).model_copy(update=fields)
    write_status(home.status / TRAINING_STATUS, st)
    return st


def train_loss(step: int) -> float:
    return round(4.0 * math.exp(-step / 150) + 0.5, 6)


def metric_lines(first: int, last: int, eval_every: int = 25) -> str:
    """metrics.jsonl lines for steps first..last, as core.metrics writes them."""
    out = []
    t = time.time()
    for step in range(first, last + 1):
        out.append(
            json.dumps(
                {
                    "epoch": 0,
                    "grad_norm": 0.5 + 1 / (1 + step),
                    "kind": "train",
                    "loss": train_loss(step),
                    "lr": 3e-4 * min(1.0, step / 10),
                    "step": step,
                    "time": t,
                    "tokens_per_s": 5000.0 + step,
                },
                sort_keys=True,
            )
        )
        if step % eval_every == 0:
            out.append(json.dumps({"kind": "eval", "step": step, "time": t, "val_loss": train_loss(step) + 0.1}))
    return "".join(line + "\n" for line in out)


def append_metrics(home: Home, first: int, last: int) -> None:
    run_dir = home.run_dir(FAKE_JOB)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(metric_lines(first, last))


def _spool_file(folder: Path, job_id: int, name: str, lines: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / spool_name(job_id, name)
    path.write_text("".join(json.dumps({"text": f"example {i}"}) + "\n" for i in range(lines)))
    return path


def populate(home: Home, step: int = 120) -> None:
    """A home as a daemon leaves it mid-run: two jobs done (v1, v2), one failed in training, one
    rejected at admission, job 5 training at ``step``, three waiting (ids 6 normal, 7 low, 8 high)."""
    home.ensure()
    db = ModelDB(home.db_url)
    try:
        now = time.time()
        _add_jobs(db, now)
        _add_versions_runs_checkpoints(home, db, now)
        _add_memory(db)
        _add_events(db)
    finally:
        db.close()
    _write_files(home, step)


def _add_jobs(db: ModelDB, now: float) -> None:
    specs = [
        (1, "first.jsonl", "normal", JobState.DONE),
        (2, "second.jsonl", "high", JobState.DONE),
        (3, "crash.jsonl", "normal", JobState.FAILED),
        (4, "bad.jsonl", "normal", JobState.REJECTED),
        (5, "current.jsonl", "normal", JobState.RUNNING),
        (6, "normal-wait.jsonl", "normal", JobState.QUEUED),
        (7, "low-wait.jsonl", "low", JobState.QUEUED),
        (8, "urgent.jsonl", "high", JobState.QUEUED),
    ]
    with db.session() as s:
        for jid, name, prio, state in specs:
            s.add(
                Job(
                    id=jid,
                    name=name,
                    spool_name=spool_name(jid, name),
                    sha256=f"{jid:064x}",
                    priority=prio,
                    state=state.value,
                    admitted_at=now - 1000 + jid,
                    n_records=3,
                    data_format="text",
                    started_at=now - 900 + jid if jid <= 5 else None,
                    finished_at=now - 800 + jid * 10 if jid <= 4 else None,
                    error="worker exited with code 1: RuntimeError: boom" if jid == 3 else None,
                    settings={"max_steps": 300} if jid == 5 else {},
                )
            )


def _add_memory(db: ModelDB) -> None:
    """Jobs 1 and 2's memory sets and the gate's scores of versions 1 and 2 on them (issue 17): v2 forgot
    some of job 1 (0.5 -> 0.9)."""
    with db.session() as s:
        for job_id in (1, 2):
            s.add(MemorySet(job_id=job_id, kind="eval", sha256=f"{job_id:064x}", n_examples=4, size_bytes=100))
        for version_id, job_id, loss in ((1, 1, 0.5), (1, 2, 3.0), (2, 1, 0.9), (2, 2, 0.7)):
            sha = f"{job_id:064x}"
            s.add(MemoryScore(version_id=version_id, job_id=job_id, set_sha256=sha, n_examples=4, loss=loss))


def _add_versions_runs_checkpoints(home: Home, db: ModelDB, now: float) -> None:
    with db.session() as s:
        s.add(
            ModelVersion(
                id=1,
                path=str(home.models / "v1"),
                parent_id=None,
                job_id=1,
                base_model="embedded",
                data_sha256=f"{1:064x}",
                train_loss=1.5,
                val_loss=1.7,
                steps=30,
                created_at=now - 790,
            )
        )
        s.add(
            ModelVersion(
                id=2,
                path=str(home.models / "v2"),
                parent_id=1,
                job_id=2,
                base_model="embedded",
                data_sha256=f"{2:064x}",
                train_loss=1.2,
                val_loss=1.4,
                steps=30,
                created_at=now - 780,
            )
        )
        s.add(
            Run(
                job_id=1,
                attempt=1,
                pid=111,
                started_at=now - 899,
                ended_at=now - 790,
                outcome="completed",
                exit_status="exit code 0",
                start_step=0,
                end_step=30,
            )
        )
        s.add(
            Run(
                job_id=5,
                attempt=1,
                pid=555,
                started_at=now - 895,
                ended_at=now - 600,
                outcome="interrupted",
                exit_status="exit code 75",
                start_step=0,
                end_step=50,
            )
        )
        s.add(Run(job_id=5, attempt=2, pid=os.getpid(), started_at=now - 500, start_step=50))
        s.add(
            Checkpoint(
                job_id=5,
                step=50,
                path=str(home.run_dir(5) / "ckpt-000050"),
                train_loss=train_loss(50),
                val_loss=train_loss(50) + 0.1,
                size_bytes=12345,
            )
        )
        s.add(
            Checkpoint(
                job_id=5,
                step=100,
                path=str(home.run_dir(5) / "ckpt-000100"),
                train_loss=train_loss(100),
                val_loss=train_loss(100) + 0.1,
                size_bytes=12345,
            )
        )


def _add_events(db: ModelDB) -> None:
    db.event("admitted", "admitted first.jsonl", job_id=1)
    db.event("done", "first.jsonl trained: v1", job_id=1, version=1)
    db.event("rejected", "bad.jsonl: 1 invalid line(s)", job_id=4)
    db.event("failed", "crash.jsonl: worker exited with code 1", job_id=3)
    db.event("started", "training current.jsonl", job_id=5)
    db.event("warning", "loss spiked at step 40", job_id=5, step=40)
    db.event("phase", "phase: predict", job_id=5, phase="predict")


def _write_files(home: Home, step: int) -> None:

    _spool_file(home.done, 1, "first.jsonl")
    _spool_file(home.done, 2, "second.jsonl")
    crash = _spool_file(home.failed, 3, "crash.jsonl")
    write_error(
        crash,
        3,
        "training",
        "the worker failed: RuntimeError: boom",
        exit_status="exit code 1",
        error_type="RuntimeError",
        log_tail=["Traceback ...", "RuntimeError: boom"],
    )
    bad = _spool_file(home.failed, 4, "bad.jsonl")
    write_error(
        bad,
        4,
        "bad_input",
        "1 invalid line(s): line 2, field 'text': missing (expected a string)",
        validation={"errors": [{"line": 2, "field": "text", "reason": "missing (expected a string)"}]},
    )
    _spool_file(home.processing, 5, "current.jsonl")
    _spool_file(home.waiting(Priority.NORMAL), 6, "normal-wait.jsonl")
    _spool_file(home.waiting(Priority.LOW), 7, "low-wait.jsonl")
    _spool_file(home.waiting(Priority.HIGH), 8, "urgent.jsonl")

    run_dir = home.run_dir(FAKE_JOB)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(
        run_dir / "job.json",
        {"job_id": FAKE_JOB, "job_name": "current.jsonl", "training": {"max_steps": 300, "learning_rate": 3e-4}},
    )
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    append_metrics(home, 1, step)
    write_training_status(home, step)
    write_daemon_status(home)


# ---------- hostile and large homes: names with bidi controls, thousands of waiting jobs ----------

RTL_NAME = "invoice\u202egnp.exe.jsonl"  # with the override obeyed it reads "invoicelnosj.exe.png"


def add_waiting(home: Home, job_id: int, name: str, priority: Priority = Priority.NORMAL) -> Path:
    """One waiting job as admission leaves it: a DB row under the name as dropped, a spool file."""
    db = ModelDB(home.db_url)
    try:
        with db.session() as s:
            s.add(
                Job(
                    id=job_id,
                    name=name,
                    spool_name=spool_name(job_id, name),
                    sha256=f"{job_id:064x}",
                    priority=priority.value,
                    state=JobState.QUEUED.value,
                    n_records=3,
                    data_format="text",
                )
            )
    finally:
        db.close()
    return _spool_file(home.waiting(priority), job_id, name)


def add_many_waiting(home: Home, first_id: int, n: int, priority: Priority = Priority.NORMAL) -> list[int]:
    """``n`` waiting jobs (ids ``first_id``...), written directly: one bulk insert and ``n`` small files,
    no daemon, so a 10,000-job queue takes about a second to build."""
    home.ensure()
    ids = list(range(first_id, first_id + n))
    rows = [
        {
            "id": i,
            "name": f"bulk-{i}.jsonl",
            "spool_name": spool_name(i, f"bulk-{i}.jsonl"),
            "sha256": f"{i:064x}",
            "priority": priority.value,
            "state": JobState.QUEUED.value,
            "n_records": 1,
            "data_format": "text",
            "settings": {},
        }
        for i in ids
    ]
    db = ModelDB(home.db_url)
    try:
        with db.session() as s:
            s.execute(Job.__table__.insert(), rows)
    finally:
        db.close()
    folder = home.waiting(priority)
    folder.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"text": "example"}) + "\n"
    for i in ids:
        (folder / spool_name(i, f"bulk-{i}.jsonl")).write_text(line)
    return ids


def prom_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``/metrics`` text parsed by the Prometheus library: (sample name, sorted labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
