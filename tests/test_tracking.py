"""Trackers (issue 19). TensorBoard, MLflow and W&B fed the loop's events directly (no worker), read back
through each one's own reader (TensorBoard's ``EventAccumulator``, ``MlflowClient`` on a file store, the
W&B offline run file parsed with wandb's protobuf records: tests/wandb_log.py); a resume logging into the
same run. A real job in-process whose report reaches its MLflow and W&B runs as artefacts, and one whose
trackers are all broken (a closed port, folders that cannot be made) ending exactly as it would without
them. A tracker that breaks warns once and never fails the job."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from core import distributed, worker
from core.embedded import ensure_embedded_model
from core.events import EvalEvent, StepEvent
from core.metrics import METRICS, read_metrics
from core.result import RunInfo
from core.runtime import StopFlag
from core.tracking import TB_FOLDER, Tracking, open_tracking
from core.tracking_mlflow import resolve_uri
from management.db import Job, ModelDB, Run
from management.job_report import generate
from management.report_trackers import ARTIFACT_FOLDER
from tests import wandb_log
from trainbox.config import TrainingConfig
from trainbox.home import Home
from trainbox.jobspec import JobSpec, WorkerResult
from trainbox.states import EXIT_COMPLETED, WorkerOutcome
from trainbox.tracker_runs import TrackerRuns, mlflow_client


def _spec(home: Home, config: str) -> JobSpec:
    home.ensure()
    home.config_file.write_text(config)
    run_dir = home.run_dir(1)
    run_dir.mkdir(parents=True, exist_ok=True)
    return JobSpec(
        job_id=1,
        job_name="a.jsonl",
        data_file=str(home.processing / "a.jsonl"),
        embedded_model_dir=str(home.embedded_model),
        run_dir=str(run_dir),
        status_file=str(home.status / "training.json"),
        db_url=home.db_url,
        training=TrainingConfig(max_steps=6, learning_rate=1e-3),
    )


def _step(step: int, loss: float, skipped: bool = False) -> StepEvent:
    return StepEvent(
        step=step, total_steps=6, loss=loss, lr=1e-3 * step, grad_norm=0.5, tokens=100, tokens_per_s=1000.0 + step,
        epoch=0.1 * step, elapsed=float(step), skipped=skipped,
    )  # fmt: skip


def _feed(tracking: Tracking) -> None:
    """A fresh run's events: evaluations at 0 and 4, steps 1-4 (step 2's update skipped: not finite)."""
    tracking.start(0, 1)
    tracking(EvalEvent(step=0, val_loss=3.0))
    for step in range(1, 5):
        tracking(_step(step, 4.0 - step, skipped=step == 2))
    tracking(EvalEvent(step=4, val_loss=1.5))


def _scalars(tb: Path, tag: str) -> list[tuple[int, float]]:
    acc = EventAccumulator(str(tb))
    acc.Reload()
    return [(e.step, round(e.value, 6)) for e in acc.Scalars(tag)]


def test_tensorboard_gets_the_metrics_scalars_and_a_resume_replaces_steps(tmp_path: Path) -> None:
    spec = _spec(Home(tmp_path), "[tracking]\ntensorboard = true\n")
    tracking = open_tracking(spec)
    _feed(tracking)
    tracking.close()
    tb = Path(spec.run_dir) / TB_FOLDER
    assert _scalars(tb, "loss") == [(1, 3.0), (3, 1.0), (4, 0.0)]  # the skipped update has no loss
    assert [s for s, _ in _scalars(tb, "grad_norm")] == [1, 3, 4]
    assert _scalars(tb, "lr") == [(1, 0.001), (2, 0.002), (3, 0.003), (4, 0.004)]
    assert _scalars(tb, "tokens_per_s")[0] == (1, 1001.0)
    assert _scalars(tb, "val_loss") == [(0, 3.0), (4, 1.5)]
    acc = EventAccumulator(str(tb))
    acc.Reload()
    assert "settings/text_summary" in acc.Tags()["tensors"]
    assert "max_steps" in acc.Tensors("settings/text_summary")[0].tensor_proto.string_val[0].decode()
    hparams = acc.PluginTagToContent("hparams")  # the settings as hparams too
    assert b"max_steps" in hparams["_hparams_/experiment"]
    assert b"learning_rate" in hparams["_hparams_/session_start_info"]

    resumed = open_tracking(spec)  # a new worker process resuming from its step-3 checkpoint
    resumed.start(3, 1)
    resumed(_step(4, 0.25))
    resumed.close()
    assert _scalars(tb, "loss") == [(1, 3.0), (3, 1.0), (4, 0.25)]  # step 4 once, the new run's

    again = open_tracking(spec)  # a fresh start (no checkpoint): the earlier runs' steps are hidden
    again.start(0, 1)
    again(_step(1, 2.5))
    again.close()
    assert _scalars(tb, "loss") == [(1, 2.5)]


class _Breaks:
    name = "breaks"

    def __init__(self) -> None:
        self.calls = 0

    def start(self, start_step: int, log_every: int) -> None:
        pass

    def __call__(self, ev: object) -> None:
        self.calls += 1
        raise OSError(28, "No space left on device")

    def close(self, outcome: str = "") -> None:
        raise OSError(28, "No space left on device")


def test_a_broken_tracker_warns_once_and_never_raises(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.WARNING, logger="core.worker")
    breaks = _Breaks()
    tracking = Tracking([breaks])
    tracking.start(0, 1)
    for step in range(1, 4):
        tracking(_step(step, 1.0))  # a full disk: reported once, then the tracker is off
    tracking.close()
    assert breaks.calls == 1 and tracking.trackers == []
    assert [r.getMessage() for r in caplog.records] == [
        "tracker breaks failed (OSError: [Errno 28] No space left on device): it is off for the rest of this run"
    ]

    caplog.clear()
    spec = _spec(Home(tmp_path / "a"), "[tracking]\ntensorboard = true\nmlflow = true\n")
    monkeypatch.setitem(sys.modules, "mlflow", None)  # not installed (find_spec says None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # the package cannot be imported
    tracking = open_tracking(spec)
    tracking.start(0, 1)
    tracking(_step(1, 1.0))
    tracking.close()
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == "tracking.mlflow is on, but the mlflow package is not installed: not tracked"
    assert messages[1].startswith("tracker tensorboard failed (ModuleNotFoundError") and len(messages) == 2
    monkeypatch.undo()

    spec = _spec(Home(tmp_path / "b"), "[tracking]\ntensorboard = true\n")
    (Path(spec.run_dir) / TB_FOLDER).write_text("a file where the folder goes")  # a disk error at open
    tracking = open_tracking(spec)
    tracking.start(0, 1)
    tracking(_step(1, 1.0))
    tracking.close()
    assert tracking.trackers == []


def test_no_tracking_by_default(tmp_path: Path) -> None:
    spec = _spec(Home(tmp_path), "")
    tracking = open_tracking(spec)
    tracking.start(0, 1)
    tracking(_step(1, 1.0))
    tracking.close()
    assert tracking.trackers == [] and not (Path(spec.run_dir) / TB_FOLDER).exists()


# --- MLflow and W&B ---------------------------------------------------------------------------------------


TRACKER_ENV = (  # what the trackers set in their process where the user has not (trainbox/tracker_runs.py)
    "WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_ALLOW_FILE_STORE",
)  # fmt: skip


@pytest.fixture(autouse=True)
def own_tracker_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test's trackers set these for its own home (a worker has one home per process); unset before, and
    restored after by monkeypatch, so one test's W&B folders are not the next one's."""
    for var in TRACKER_ENV:
        monkeypatch.setenv(var, "")  # recorded by monkeypatch, so its value after the test is undone...
        monkeypatch.delenv(var)  # ...and absent during it, as in a fresh worker


@pytest.fixture
def store(tmp_path: Path) -> Path:
    """An MLflow file store (a folder): opens at once, where a new SQLite store (the default: its URI is checked below)
    first runs MLflow's ~70 migrations, seconds on these machines."""
    return tmp_path / "mlruns"


def both(store: Path) -> str:
    return f'[tracking]\nmlflow = true\nmlflow_uri = "{store}"\nwandb = true\nproject = "tb-test"\n'


def _mlflow(store: Path) -> Any:
    return mlflow_client(store.as_uri())  # MlflowClient, the file store allowed as the tracker allows it


def test_the_mlflow_uri_defaults_to_a_store_in_the_home_and_relative_paths_are_in_it(tmp_path: Path) -> None:
    assert resolve_uri("", tmp_path) == (f"sqlite:///{tmp_path}/mlflow.db", (tmp_path / "mlflow-artifacts").as_uri())
    assert resolve_uri("sqlite:///db/m.db", tmp_path)[0] == f"sqlite:///{tmp_path}/db/m.db"
    assert resolve_uri("sqlite:////abs/m.db", tmp_path)[0] == "sqlite:////abs/m.db"
    assert resolve_uri("mlruns", tmp_path) == ((tmp_path / "mlruns").as_uri(), None)  # MLflow's file store
    assert resolve_uri("http://mlflow.local:5000", tmp_path) == ("http://mlflow.local:5000", None)


def _history(client: Any, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, round(m.value, 6)) for m in client.get_metric_history(run_id, key)]


def test_mlflow_and_wandb_get_the_scalars_and_settings_and_a_resume_goes_on_in_the_same_run(
    tmp_path: Path, store: Path
) -> None:
    spec = _spec(Home(tmp_path), both(store))
    tracking = open_tracking(spec)
    _feed(tracking)
    tracking.close("completed")
    assert [t.name for t in tracking.trackers] == ["mlflow", "wandb"]  # none dropped
    runs = TrackerRuns.load(Path(spec.run_dir))
    assert runs.mlflow is not None and runs.wandb is not None

    client = _mlflow(store)
    run = client.get_run(runs.mlflow.run_id)
    assert run.info.run_name == "job-1 a.jsonl" and run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "tb-test"
    assert run.data.params["max_steps"] == "6" and run.data.params["learning_rate"] == "0.001"
    assert run.data.params["hybrid.warmup_steps"] == str(TrainingConfig().hybrid.warmup_steps)  # nested: dotted names
    assert _history(client, run.info.run_id, "loss") == [(1, 3.0), (3, 1.0), (4, 0.0)]  # as TensorBoard's
    assert _history(client, run.info.run_id, "val_loss") == [(0, 3.0), (4, 1.5)]
    assert [s for s, _ in _history(client, run.info.run_id, "lr")] == [1, 2, 3, 4]

    [first] = wandb_log.run_files(Path(spec.run_dir), runs.wandb.run_id)
    scalars = wandb_log.history(first)
    assert scalars["loss"] == [(1, 3.0), (3, 1.0), (4, 0.0)] and scalars["val_loss"] == [(0, 3.0), (4, 1.5)]
    assert [s for s, _ in scalars["grad_norm"]] == [1, 3, 4] and scalars["tokens_per_s"][0] == (1, 1001.0)
    assert wandb_log.config(first)["max_steps"] == 6

    resumed = open_tracking(spec)  # a new worker process resuming from its step-3 checkpoint
    resumed.start(3, 1)
    resumed(_step(4, 0.25))
    resumed.close("interrupted")
    again = TrackerRuns.load(Path(spec.run_dir))
    assert again == runs  # the same runs, not new ones
    run = client.get_run(runs.mlflow.run_id)
    assert run.info.status == "KILLED"  # stopped, to be resumed
    assert _history(client, run.info.run_id, "loss")[-1] == (4, 0.25)  # MLflow keeps both values at step 4
    files = wandb_log.run_files(Path(spec.run_dir), runs.wandb.run_id)
    assert len(files) == 2 and wandb_log.history(files[1])["loss"] == [(4, 0.25)]  # W&B: the resumed part


def _job(home: Home, config: str, tag: str = "") -> JobSpec:
    """A job as the daemon leaves it for its worker: data in processing/, job.json, the job's DB row."""
    home.ensure()
    home.config_file.write_text(config)
    data = home.processing / "tiny.jsonl"
    words = ["river", "bridge", "garden", "station", "market", "library"]
    data.write_text(
        "".join(json.dumps({"text": f"The {words[i % 6]} is {i} steps away{tag}."}) + "\n" for i in range(24))
    )
    db = ModelDB(home.db_url)
    with db.session() as s:
        s.add(Job(id=1, name="tiny.jsonl", state="running", n_records=24, started_at=time.time()))
        s.add(Run(job_id=1, attempt=1, started_at=time.time()))
    db.close()
    run_dir = home.run_dir(1)
    run_dir.mkdir(parents=True, exist_ok=True)
    spec = JobSpec(
        job_id=1,
        job_name="tiny.jsonl",
        data_file=str(data),
        embedded_model_dir=str(ensure_embedded_model(home.embedded_model)),
        run_dir=str(run_dir),
        status_file=str(home.status / "training.json"),
        db_url=home.db_url,
        training=TrainingConfig(max_steps=6, batch_size=4, eval_every=3, checkpoint_every=3, threads=1, max_length=32),
    )
    spec.save()
    return spec


def _train(spec: JobSpec) -> WorkerResult:
    """The worker's job in this process, as ``core.worker.main`` runs it (its report, trackers and end)."""
    report = worker.open_report(spec, distributed.from_env())
    result = worker.train_job(spec, StopFlag(), report, RunInfo())
    assert worker.finish(result, Path(spec.run_dir), report) == EXIT_COMPLETED
    db = ModelDB(spec.db_url)
    with db.session() as s:  # the daemon closes the run and files the job
        s.get(Job, 1).state = "done"  # type: ignore[union-attr]
        s.query(Run).filter_by(job_id=1).update({"ended_at": time.time(), "outcome": "completed"})
    db.close()
    return result


def test_a_jobs_scalars_and_report_reach_its_mlflow_and_wandb_runs(tmp_path: Path, store: Path) -> None:
    home = Home(tmp_path / "home")
    spec = _job(home, both(store))
    result = _train(spec)
    run_dir = Path(spec.run_dir)
    trained = [(m["step"], round(m["loss"], 6)) for m in read_metrics(run_dir / METRICS) if m["kind"] == "train"]
    runs = TrackerRuns.load(run_dir)
    assert runs.mlflow is not None and runs.wandb is not None
    client = _mlflow(store)
    assert _history(client, runs.mlflow.run_id, "loss") == trained  # every metrics line's loss, once
    logged = wandb_log.history(wandb_log.run_files(run_dir, runs.wandb.run_id)[0])["loss"]
    assert [(s, round(v, 6)) for s, v in logged] == trained

    db = ModelDB(home.db_url)
    try:
        report = generate(home, db, 1)  # what the daemon's report child runs once the job is filed
    finally:
        db.close()
    plots = sorted(p.name for p in run_dir.glob("*.png"))
    assert plots and result.step == 6
    text = report.read_text()  # the report says where its runs are
    assert f"- MLflow run `{runs.mlflow.run_id}`" in text
    assert f"- W&B run `{runs.wandb.run_id}` in project tb-test" in text
    assert f"`wandb sync runs/{run_dir.name}/wandb/offline-run-*`" in text
    listed = sorted(f.path for f in client.list_artifacts(runs.mlflow.run_id, ARTIFACT_FOLDER))
    assert listed == sorted(f"report/{name}" for name in ["report.md", *plots])
    copy = client.download_artifacts(runs.mlflow.run_id, "report/report.md", str(tmp_path))
    assert Path(copy).read_bytes() == report.read_bytes()

    last = wandb_log.run_files(run_dir, runs.wandb.run_id)[-1]  # the report's, resumed from the job's id
    [artifact] = [r.artifact for r in wandb_log.records(last) if r.WhichOneof("record_type") == "artifact"]
    assert (artifact.name, artifact.type, artifact.run_id) == ("job-1-report", "report", runs.wandb.run_id)
    contents = {c.path: c.digest for c in artifact.manifest.contents}
    assert sorted(contents) == sorted(["report.md", *plots])
    assert contents["report.md"] == base64.b64encode(hashlib.md5(report.read_bytes()).digest()).decode()


def test_broken_trackers_never_change_a_jobs_outcome(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    plain = _train(_job(Home(tmp_path / "plain"), ""))
    home = Home(tmp_path / "broken")
    closed_port = '[tracking]\ntensorboard = true\nmlflow = true\nmlflow_uri = "http://127.0.0.1:9"\nwandb = true\n'
    spec = _job(home, closed_port)
    run_dir = Path(spec.run_dir)
    (run_dir / TB_FOLDER).write_text("a file where the folder goes")
    (run_dir / "wandb").write_text("a file where the folder goes")
    broken = _train(spec)
    assert (broken.outcome, broken.step, broken.failure_class) == (WorkerOutcome.COMPLETED, 6, "")
    assert broken.train_loss == plain.train_loss and broken.val_loss == plain.val_loss  # trained the same
    failed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("tracker ")]
    assert sorted(m.split(" ")[1] for m in failed) == ["mlflow", "tensorboard", "wandb"]  # once each

    caplog.clear()
    db = ModelDB(home.db_url)
    try:
        assert generate(home, db, 1).is_file()  # the report is written all the same
    finally:
        db.close()
    runs = TrackerRuns.load(run_dir)
    assert runs.mlflow is None  # nothing listening: no run was made, so none to attach to
    assert runs.wandb is not None and "report not attached to W&B run" in caplog.text  # its id, then it broke
