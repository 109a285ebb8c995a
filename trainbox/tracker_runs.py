"""``runs/job-N/trackers.json``: which MLflow and W&B runs a job's worker logged to.

The worker writes it when a tracker opens its run (``core/tracking_mlflow.py``, ``core/tracking_wandb.py``);
a resumed worker reads it to go on logging into the same run, and the job report's child, which runs after the
worker has exited, reads it to attach the report to that run (``management/report_trackers.py``). Without this
file the report could not find the run: it is the only link between the two processes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from trainbox.atomic import atomic_write_json, read_json

TRACKER_RUNS = "trackers.json"


class MlflowRun(BaseModel):
    uri: str  # the tracking URI as resolved by the worker
    run_id: str


class WandbRun(BaseModel):
    project: str
    run_id: str
    mode: str  # offline or online
    dir: str  # the folder wandb.init was given (its files are under DIR/wandb/)


class TrackerRuns(BaseModel):
    model_config = ConfigDict(extra="ignore")

    mlflow: MlflowRun | None = None
    wandb: WandbRun | None = None

    def save(self, run_dir: Path) -> None:
        atomic_write_json(Path(run_dir) / TRACKER_RUNS, self.model_dump(mode="json"))

    @classmethod
    def load(cls, run_dir: Path) -> TrackerRuns:
        """Empty when absent or unreadable (then a resumed worker opens a new run)."""
        try:
            data = read_json(Path(run_dir) / TRACKER_RUNS)
            return cls() if data is None else cls.model_validate(data)
        except ValueError:
            return cls()


def mlflow_env(uri: str) -> None:
    """The environment MLflow reads, set where the user has not: a server that does not answer gets one try
    and 10 s (it must not hold up training), and a file store the user named by its folder is allowed (MLflow
    3 refuses its file store unless ``MLFLOW_ALLOW_FILE_STORE`` is set)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    if uri.startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")


def wandb_env(cache: Path) -> None:
    """W&B's own folders (artefact staging, cache, settings) under the home's ``cache/`` where the user has not
    set them: a service account's home may not exist or be hidden by the unit's sandbox."""
    for var, sub in (("WANDB_DATA_DIR", "data"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_CONFIG_DIR", "config")):
        os.environ.setdefault(var, str(cache / "wandb" / sub))


def mlflow_client(uri: str) -> Any:
    """An ``MlflowClient`` for ``uri``, after ``mlflow_env``."""
    mlflow_env(uri)
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def open_wandb(run: WandbRun, cache: Path, **extra: Any) -> Any:
    """``wandb.init`` of the job's run (resumed when it exists), quiet: no console capture, code, git or
    system stats (the worker's log is its own; no thread samples the machine while it trains)."""
    wandb_env(cache)
    import wandb

    quiet = wandb.Settings(console="off", silent=True, save_code=False, disable_git=True, x_disable_stats=True)
    return wandb.init(
        project=run.project,
        id=run.run_id,
        resume="allow",
        mode=run.mode,  # type: ignore[arg-type]  # written from the Literal setting wandb_mode
        dir=run.dir,
        settings=quiet,
        reinit="create_new",
        **extra,
    )


def close_wandb() -> None:
    """Stop this process's W&B service: ``finish()`` can return before the offline run file is written (its
    service process writes it), so a reader right after, or a process killed soon after, could find it empty.
    Once the service has stopped, the file is complete."""
    import wandb

    wandb.teardown()
