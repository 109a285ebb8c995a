"""Experiment trackers: one more consumer of the training loop's events, beside ``metrics.jsonl``.

Every tracker gets the scalars of the metrics lines (loss, lr, grad_norm, tokens_per_s every ``log_every``
steps, val_loss at each evaluation: ``scalars_at``) and the job's settings. The Reporter forwards every event
here (``core/reporting.py``).
- ``[tracking] tensorboard = true`` writes TensorBoard event files under ``runs/job-N/tb/`` through
  ``torch.utils.tensorboard.SummaryWriter``, the settings as hparams and as a text table;
- ``mlflow = true`` logs to an MLflow run (``core/tracking_mlflow.py``), ``wandb = true`` to a W&B run
  (``core/tracking_wandb.py``), each only where its package is installed; their run ids go to
  ``runs/job-N/trackers.json``, so a resumed worker logs into the same run and the job report, written by a
  child after the worker exits, is attached to it (``management/report_trackers.py``).

A tracker is a convenience, never a reason for a job to fail: ``Tracking`` catches whatever a tracker
raises (the package missing, a full disk, a bad folder), logs one warning naming it, and drops that
tracker for the rest of the run. A resumed run opens the writer with ``purge_step`` just past its
checkpoint's step, so TensorBoard hides the steps the previous run wrote after it, as ``metrics.jsonl`` is
cut back (a NaN rollback inside one run is not purged: its steps show twice). MLflow and W&B cannot take
back what they were sent: a resumed run logs the steps after its checkpoint again (MLflow keeps both values
at such a step; W&B drops a step below the run's last one).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
from pathlib import Path
from typing import Any, Protocol

from core.events import EvalEvent, Event, StepEvent
from trainbox.config import ConfigError, load_settings
from trainbox.home import Home
from trainbox.jobspec import JobSpec

log = logging.getLogger("core.worker")
TB_FOLDER = "tb"


class Tracker(Protocol):
    name: str

    def start(self, start_step: int, log_every: int) -> None: ...

    def __call__(self, ev: Event) -> None: ...

    def close(self, outcome: str = "") -> None: ...


def flat_settings(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings (``hybrid``) as ``hybrid.key``; values TensorBoard's hparams cannot hold (lists,
    None) as text."""
    out: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            out.update(flat_settings(value, f"{prefix}{key}."))
        elif isinstance(value, bool | int | float | str):
            out[f"{prefix}{key}"] = value
        else:
            out[f"{prefix}{key}"] = json.dumps(value)
    return out


def step_scalars(ev: StepEvent) -> dict[str, float]:
    """A step's scalars as its metrics line has them: a skipped update has no loss or gradient norm; non-finite
    values are left out."""
    values: dict[str, float | None] = {
        "loss": None if ev.skipped else ev.loss,
        "lr": ev.lr,
        "grad_norm": None if ev.skipped else ev.grad_norm,
        "tokens_per_s": ev.tokens_per_s,
    }
    return {k: v for k, v in values.items() if v is not None and math.isfinite(v)}


def scalars_at(ev: Event, log_every: int) -> tuple[int, dict[str, float]] | None:
    """(step, scalars) a tracker records for an event, as metrics.jsonl has them: a step's at every
    ``log_every`` steps, an evaluation's val_loss; None for anything else."""
    if isinstance(ev, StepEvent) and ev.step % log_every == 0:
        return ev.step, step_scalars(ev)
    if isinstance(ev, EvalEvent) and math.isfinite(ev.val_loss):
        return ev.step, {"val_loss": ev.val_loss}
    return None


class TensorBoardTracker:
    name = "tensorboard"

    def __init__(self, log_dir: Path, settings: dict[str, Any]) -> None:
        self.log_dir, self.settings = log_dir, settings
        self.writer: Any = None
        self.log_every = 1

    def start(self, start_step: int, log_every: int) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self.log_every = log_every
        # what an earlier process wrote past the checkpoint this one starts from is hidden (all of it on a
        # fresh start), as metrics.jsonl is cut back
        self.writer = SummaryWriter(str(self.log_dir), purge_step=start_step + 1 if start_step > 0 else 0)
        flat = flat_settings(self.settings)
        for summary in hparams(flat, {"val_loss": math.nan}):  # the hparams plugin's three summaries
            self.writer.file_writer.add_summary(summary)
        table = "| setting | value |\n| --- | --- |\n" + "".join(f"| {k} | {v} |\n" for k, v in sorted(flat.items()))
        self.writer.add_text("settings", table, start_step)

    def __call__(self, ev: Event) -> None:
        found = scalars_at(ev, self.log_every) if self.writer is not None else None
        if found is not None:
            step, scalars = found
            for tag, value in scalars.items():
                self.writer.add_scalar(tag, value, step)

    def close(self, outcome: str = "") -> None:
        if self.writer is not None:
            self.writer.close()


class Tracking:
    """The job's trackers behind one boundary: a failing tracker is reported once and dropped."""

    def __init__(self, trackers: list[Tracker]) -> None:
        self.trackers = trackers

    def _each(self, call: str, *args: Any) -> None:
        for tracker in list(self.trackers):
            try:
                if call == "event":
                    tracker(*args)
                else:
                    getattr(tracker, call)(*args)
            except Exception as e:  # boundary: a tracker never fails a job
                why = f"{type(e).__name__}: {e}"
                log.warning("tracker %s failed (%s): it is off for the rest of this run", tracker.name, why)
                self.trackers.remove(tracker)
                with contextlib.suppress(Exception):  # boundary: already reported
                    tracker.close("failed")

    def start(self, start_step: int, log_every: int) -> None:
        self._each("start", start_step, log_every)

    def __call__(self, ev: Event) -> None:
        self._each("event", ev)

    def close(self, outcome: str = "") -> None:
        """``outcome``: how the run ended (completed, interrupted, failed), for trackers that keep a status."""
        self._each("close", outcome)


def _installed(key: str, package: str) -> bool:
    if importlib.util.find_spec(package) is None:
        log.warning("tracking.%s is on, but the %s package is not installed: not tracked", key, package)
        return False
    return True


def open_tracking(spec: JobSpec) -> Tracking:
    """The trackers the home's ``[tracking]`` asks for (read here: they observe, they do not change the
    training, so they are not part of the job's fixed spec)."""
    home = Home(Path(spec.status_file).parents[1])  # the host's home: status/ lives there, runs/ may not
    try:
        config = load_settings(home.config_file).tracking
    except (ConfigError, OSError) as e:
        log.warning("no tracking: cannot read %s: %s", home.config_file, e)
        return Tracking([])
    settings = spec.training.model_dump(mode="json")
    trackers: list[Tracker] = []
    if config.tensorboard:
        trackers.append(TensorBoardTracker(Path(spec.run_dir) / TB_FOLDER, settings))
    if config.mlflow and _installed("mlflow", "mlflow"):
        from core.tracking_mlflow import MlflowTracker

        trackers.append(MlflowTracker(spec, config, home, settings))
    if config.wandb and _installed("wandb", "wandb"):
        from core.tracking_wandb import WandbTracker

        trackers.append(WandbTracker(spec, config, home, settings))
    return Tracking(trackers)
