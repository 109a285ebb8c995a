"""The worker as the daemon runs it: a separate process, result.json, exit codes, SIGTERM, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from core import checkpoint, worker
from core.embedded import ensure_embedded_model
from core.errors import DataError
from core.heartbeat import LOADING_BEAT_ENV, LoadingBeat, StatusFile
from core.jobdb import JobDB
from core.loading import load_data, load_model
from core.metrics import METRICS, read_metrics
from core.reporting import Reporter
from core.result import RunInfo, failed_result
from core.runtime import StopFlag, thread_count
from management.db import Job, ModelDB
from tests.shared_setup import built_once
from trainbox import energy_log
from trainbox.config import TrainingConfig
from trainbox.jobspec import JobSpec, WorkerResult
from trainbox.states import EXIT_COMPLETED, EXIT_FAILED, EXIT_INTERRUPTED, WorkerOutcome
from trainbox.status import TrainingStatus, read_status

SETTINGS = {
    "max_steps": 24,
    "batch_size": 4,
    "learning_rate": 3e-3,
    "eval_every": 8,
    "checkpoint_every": 8,
    "keep_checkpoints": 2,
    "max_length": 64,
    "threads": 1,
}
NAMES = ["Anna", "Ben", "Carla", "David", "Ella", "Farid"]
PLACES = ["the market", "the library", "the river", "the station", "the garden"]


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_embedded_model(tmp_path_factory.getbasetemp() / "embedded-model")


@pytest.fixture(scope="session")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "job.jsonl"
    lines = [{"text": f"{NAMES[i % 6]} went to {PLACES[i % 5]} on day {i % 7}."} for i in range(40)]
    lines += [{"prompt": f"Where did {NAMES[i % 6]} go?", "completion": f" To {PLACES[i % 5]}."} for i in range(20)]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def make_job(run_dir: Path, data: Path, model_dir: Path, **over: Any) -> JobSpec:
    spec = JobSpec(
        job_id=7,
        job_name="job.jsonl",
        data_file=str(data),
        embedded_model_dir=str(model_dir),
        run_dir=str(run_dir),
        status_file=str(run_dir / "training.json"),
        db_url=f"sqlite:///{run_dir / 'trainbox.db'}",
        training=TrainingConfig(**{**SETTINGS, **over}),
    )
    return register(spec)


def rehome(spec: JobSpec, run_dir: Path, data: Path) -> JobSpec:
    """The same job (settings, start model) in a fresh run folder with its own DB, reading ``data``."""
    paths = {"run_dir": str(run_dir), "status_file": str(run_dir / "training.json")}
    return register(
        spec.model_copy(update={**paths, "db_url": f"sqlite:///{run_dir / 'trainbox.db'}", "data_file": str(data)})
    )


def register(spec: JobSpec) -> JobSpec:
    """Create the spec's run folder and the job's row in its DB, as the daemon would, and save it."""
    Path(spec.run_dir).mkdir(parents=True)
    db = ModelDB(spec.db_url)
    with db.session() as s:
        s.add(Job(id=spec.job_id, name=spec.job_name))
    db.close()
    spec.save()
    return spec


def start_worker(run_dir: Path, **env: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "core.worker", "--run-dir", str(run_dir)],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def wait_for_step(proc: subprocess.Popen[bytes], run_dir: Path, step: int, timeout: float = 90) -> None:
    """Until the worker's status reports ``step`` (bounded; fails if the worker ends first)."""
    deadline = time.time() + timeout
    while True:
        status = read_status(run_dir / "training.json", TrainingStatus)
        if status is not None and status.step >= step:
            return
        assert proc.poll() is None and time.time() < deadline, f"worker ended or stalled before step {step}"
        time.sleep(0.05)


def run_in_process(spec: JobSpec) -> tuple[int, WorkerResult]:
    """The worker's job in this process (the same code path as ``main``, minus its start-up time)."""
    stop, info = StopFlag(), RunInfo()
    report = reporter(spec)
    try:
        result = worker.train_job(spec, stop, report, info)
    except Exception as e:
        result = failed_result(e, report, info)
    return worker.finish(result, Path(spec.run_dir), report), result


def reporter(spec: JobSpec, status: StatusFile | None = None) -> Reporter:
    """Rank 0's reporter of a job, as ``main`` opens it (``status``: a status writer of the test's own)."""
    status = status or StatusFile(Path(spec.status_file), spec.job_id, spec.job_name)
    return Reporter(status, JobDB(spec.db_url, spec.job_id), Path(spec.run_dir) / METRICS)


def finish(proc: subprocess.Popen[bytes]) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=120)
    return proc.returncode, out.decode(errors="replace")


def train_steps(run_dir: Path) -> list[int]:
    return [m["step"] for m in read_metrics(run_dir / "metrics.jsonl") if m["kind"] == "train"]


def eval_steps(run_dir: Path) -> list[int]:
    return [m["step"] for m in read_metrics(run_dir / "metrics.jsonl") if m["kind"] == "eval"]


@pytest.fixture(scope="session")  # shared with test_core_recovery (the reference for exact resumes)
def straight_run(tmp_path_factory: pytest.TempPathFactory, data_file: Path, model_dir: Path) -> Path:
    """One uninterrupted worker run for the whole session (tests/shared_setup.py: once, not per xdist worker or
    per module importing this fixture); tests only read it."""

    def build(run_dir: Path) -> None:
        make_job(run_dir, data_file, model_dir)
        rc, out = finish(start_worker(run_dir))
        assert rc == EXIT_COMPLETED, out

    return built_once(tmp_path_factory, "straight-run", build)


def test_worker_completes_and_reports_everywhere(straight_run: Path) -> None:
    result = WorkerResult.load(straight_run)
    assert result is not None and result.outcome == WorkerOutcome.COMPLETED
    assert result.step == result.total_steps == 24
    assert (result.micro_batch, result.grad_accum, result.failure_class) == (4, 1, "")
    assert result.final_model == str(straight_run / "final")
    assert result.first_val_loss is not None and result.val_loss is not None and result.train_loss is not None
    assert result.val_loss < result.first_val_loss

    model = AutoModelForCausalLM.from_pretrained(result.final_model)
    assert model.num_parameters() > 100_000
    assert (straight_run / "final" / "tokenizer.json").exists()

    assert train_steps(straight_run) == list(range(1, 25))
    [energy] = energy_log.read(straight_run)  # one line per run, for the report (no GPU: nothing drawn)
    assert (energy.device, energy.gpus, energy.joules) == ("cpu", 0, None) and energy.seconds > 0
    assert eval_steps(straight_run) == [0, 8, 16, 24]
    lines = read_metrics(straight_run / "metrics.jsonl")
    line = next(m for m in lines if m["kind"] == "train")
    assert set(line) == {"kind", "step", "loss", "lr", "grad_norm", "tokens_per_s", "epoch", "time"}
    warnings = [m for m in lines if m["kind"] == "warning"]  # 6 held-out examples: too few to mean much
    assert [(w["warning"], w["check"], w["step"]) for w in warnings] == [("preflight", "eval_small", 0)]

    status = read_status(straight_run / "training.json", TrainingStatus)
    assert status is not None and status.phase == "finished" and status.step == 24
    assert status.device.startswith("cpu") and status.val_loss == result.val_loss

    assert [c.step for c in checkpoint.complete_checkpoints(straight_run)] == [16, 24]
    db = ModelDB(f"sqlite:///{straight_run / 'trainbox.db'}")
    rows = db.checkpoints(7)
    assert [(r.step, r.deleted_at is not None) for r in rows] == [(8, True), (16, False), (24, False)]
    kinds = [e.kind for e in db.events(job_id=7)]
    assert kinds[0] == "training_started" and kinds[-1] == "training_completed" and "warning" in kinds
    db.close()


def test_worker_records_where_the_loops_time_went(straight_run: Path) -> None:
    """The timing lines the job report splits the time by: at a logged step 10 s or more after the previous one
    and at the loop's end, every phase measured, together covering the loop from just after the worker said
    it started training."""
    lines = read_metrics(straight_run / "metrics.jsonl")
    timing = [m for m in lines if m["kind"] == "timing"]
    assert timing and timing[-1]["step"] == 24  # the last: the final evaluation and checkpoint included
    assert all(a["time"] - b["time"] >= 9.5 for a, b in zip(timing[1:-1], timing[:-2], strict=True))
    phases = ("data", "forward_backward", "optimizer", "eval", "checkpoint", "other")
    for m in timing:
        assert sum(m[f"{p}_s"] for p in phases) == pytest.approx(m["loop_s"], abs=1e-5)
    assert all(sum(m[f"{p}_s"] for m in timing) > 0 for p in phases)
    db = ModelDB(f"sqlite:///{straight_run / 'trainbox.db'}")
    [started] = [e.time for e in db.events(job_id=7) if e.kind == "training_started"]
    db.close()
    span = timing[-1]["time"] - started  # the worker's "training started" to the loop's last line
    loop = sum(m["loop_s"] for m in timing)
    assert 0 < loop <= span and span - loop < max(0.5, 0.2 * span), (loop, span)


def test_sigterm_checkpoints_and_rerun_resumes_exactly(
    tmp_path: Path, data_file: Path, model_dir: Path, straight_run: Path
) -> None:
    run_dir = tmp_path / "run"
    make_job(run_dir, data_file, model_dir)
    proc = start_worker(run_dir, TRAINBOX_TEST_STEP_SLEEP="0.1")
    wait_for_step(proc, run_dir, 10)
    proc.send_signal(signal.SIGTERM)
    rc, out = finish(proc)
    assert rc == EXIT_INTERRUPTED, out

    result = WorkerResult.load(run_dir)
    assert result is not None and result.outcome == WorkerOutcome.INTERRUPTED
    stopped = result.step
    assert 10 <= stopped < 24
    latest = checkpoint.latest_complete(run_dir)
    assert latest is not None and latest.step == stopped
    status = read_status(run_dir / "training.json", TrainingStatus)
    assert status is not None and status.phase == "interrupted"

    rc, out = finish(start_worker(run_dir))
    assert rc == EXIT_COMPLETED, out
    assert f"resuming at step {stopped}" in out
    result = WorkerResult.load(run_dir)
    assert result is not None and result.outcome == WorkerOutcome.COMPLETED and result.step == 24
    assert train_steps(run_dir) == list(range(1, 25))  # continuous, nothing repeated
    assert eval_steps(run_dir) == [0, 8, 16, 24]
    # the interrupted-and-resumed run ends with exactly the weights of the uninterrupted one
    a = load_file(straight_run / "final" / "model.safetensors")
    b = load_file(run_dir / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert result.first_val_loss == WorkerResult.load(straight_run).first_val_loss  # type: ignore[union-attr]


def test_bad_data_fails_with_a_result(tmp_path: Path, model_dir: Path) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "fine"}\n{"prompt": "no completion"}\n')
    run_dir = tmp_path / "run"
    make_job(run_dir, data, model_dir)
    rc, out = finish(start_worker(run_dir))
    assert rc == EXIT_FAILED
    assert "Traceback" in out
    result = WorkerResult.load(run_dir)
    assert result is not None and result.outcome == WorkerOutcome.FAILED
    assert result.error_type == "DataError" and "line 2" in result.message
    assert result.failure_class == "bad_input" and result.fix
    status = read_status(run_dir / "training.json", TrainingStatus)
    assert status is not None and status.phase == "failed"


def test_stop_before_training_starts_leaves_no_checkpoint(tmp_path: Path, data_file: Path, model_dir: Path) -> None:
    spec = make_job(tmp_path / "run", data_file, model_dir)
    stop = StopFlag()
    stop._handle(signal.SIGTERM, None)
    report = reporter(spec)
    result = worker.train_job(spec, stop, report)
    assert worker.finish(result, Path(spec.run_dir), report) == EXIT_INTERRUPTED
    assert result.outcome == WorkerOutcome.INTERRUPTED and result.step == 0
    assert checkpoint.latest_complete(Path(spec.run_dir)) is None


def test_thread_count(monkeypatch: pytest.MonkeyPatch) -> None:
    assert thread_count(3) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert thread_count(0) == 2
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert thread_count(0) == max(1, (os.cpu_count() or 2) // 2)


def test_eval_file_is_the_validation_set(tmp_path: Path, data_file: Path, model_dir: Path) -> None:
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("".join(json.dumps({"text": f"Eval line {i}."}) + "\n" for i in range(3)))
    spec = make_job(tmp_path / "run", data_file, model_dir)
    spec = spec.model_copy(update={"eval_file": str(eval_file)})
    _, tok = load_model(model_dir, torch.device("cpu"))
    data = load_data(spec, spec.training, tok)
    assert len(data.train) == 60 and len(data.val) == 3


def test_nothing_left_to_train_is_a_clear_error(tmp_path: Path, model_dir: Path) -> None:
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps({"prompt": "word " * 100, "completion": " x"}) + "\n" for _ in range(3)))
    spec = make_job(tmp_path / "run", data, model_dir)
    _, tok = load_model(model_dir, torch.device("cpu"))
    with pytest.raises(DataError, match="max_length=64"):
        load_data(spec, spec.training, tok)


class RecordingStatus(StatusFile):
    """The real status writer, also keeping (heartbeat, phase, message) of every write it made."""

    def __init__(self, path: Path, job_id: int, job_name: str) -> None:
        super().__init__(path, job_id, job_name)
        self.written: list[tuple[float, str, str]] = []

    def _write(self, now: float) -> None:
        super()._write(now)
        self.written.append((self.status.heartbeat, self.status.phase, self.status.message))


def test_loading_heartbeats_advance_while_encoding(
    tmp_path: Path, data_file: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A big file takes minutes to read and encode: the heartbeat must advance through it. With the
    interval set near zero, every record is an interval, so 60 records show it without timing."""
    monkeypatch.setenv(LOADING_BEAT_ENV, "0.000001")
    spec = make_job(tmp_path / "run", data_file, model_dir, max_steps=1, eval_every=0, checkpoint_every=0)
    status = RecordingStatus(Path(spec.status_file), spec.job_id, spec.job_name)
    report = reporter(spec, status)
    result = worker.train_job(spec, StopFlag(), report)
    report.db.close()
    assert result.outcome == WorkerOutcome.COMPLETED
    encoding = [(hb, msg) for hb, phase, msg in status.written if phase == "loading" and msg.startswith("encoding")]
    done = [int(msg.split()[1].split("/")[0].replace(",", "")) for _, msg in encoding]
    assert len({hb for hb, _ in encoding}) >= 10  # many distinct heartbeats while encoding ran
    assert [hb for hb, _ in encoding] == sorted(hb for hb, _ in encoding)
    assert done == sorted(done) and done[0] < done[-1] == 60 and encoding[-1][1] == "encoding 60/60 records"
    reading = [msg for _, phase, msg in status.written if phase == "loading" and msg.startswith("reading job.jsonl")]
    assert reading[-1] == "reading job.jsonl: 60 records" and len(reading) > 10
    on_disk = read_status(Path(spec.status_file), TrainingStatus)
    assert on_disk is not None and on_disk.heartbeat == status.written[-1][0]


def test_loading_beat_needs_the_loading_thread_to_advance(tmp_path: Path) -> None:
    """Through one opaque call (a model load) a helper thread beats while the loading thread uses CPU,
    and not while it is blocked: a load stuck for good must still look hung to the watchdog."""
    status = StatusFile(tmp_path / "training.json", 1, "j")
    with LoadingBeat(status, "loading the model", every=0.02) as beat:
        deadline = time.monotonic() + 30
        x = 0
        while beat.beats < 3 and time.monotonic() < deadline:  # computing, as a load does
            x += 1
        assert beat.beats >= 3
    blocked = threading.Event()
    with LoadingBeat(status, "loading the model", every=0.05) as stuck:
        blocked.wait(0.5)  # 10 intervals without using the CPU, as a deadlocked load
        assert stuck.beats == 0
    on_disk = read_status(tmp_path / "training.json", TrainingStatus)
    assert on_disk is not None and on_disk.message.startswith("loading the model")
