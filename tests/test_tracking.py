"""TensorBoard tracking (issue 19): the worker's tracker fed the loop's events directly (no worker), its
scalars read back with TensorBoard's own ``EventAccumulator``; a tracker that breaks warns once and never
fails the job."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from core.events import EvalEvent, StepEvent
from core.tracking import TB_FOLDER, Tracking, open_tracking
from trainbox.config import TrainingConfig
from trainbox.home import Home
from trainbox.jobspec import JobSpec


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


def _scalars(tb: Path, tag: str) -> list[tuple[int, float]]:
    acc = EventAccumulator(str(tb))
    acc.Reload()
    return [(e.step, round(e.value, 6)) for e in acc.Scalars(tag)]


def test_tensorboard_gets_the_metrics_scalars_and_a_resume_replaces_steps(tmp_path: Path) -> None:
    spec = _spec(Home(tmp_path), "[tracking]\ntensorboard = true\n")
    tracking = open_tracking(spec)
    tracking.start(0, 1)
    tracking(EvalEvent(step=0, val_loss=3.0))
    for step in range(1, 5):
        tracking(_step(step, 4.0 - step, skipped=step == 2))
    tracking(EvalEvent(step=4, val_loss=1.5))
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

    def close(self) -> None:
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
