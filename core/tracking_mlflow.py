"""The MLflow tracker (``[tracking] mlflow = true``): the job's scalars, its settings as params, one run per
job in the experiment ``[tracking] project``, through ``MlflowClient`` (no global active run, so nothing
else in the process is touched).

The run's id goes to ``runs/job-N/trackers.json`` (``trainbox/tracker_runs.py``): a resumed worker logs into
the same run, and the job report's child attaches report.md and its plots to it as artefacts
(``management/report_trackers.py``). The URI is resolved once, here, and recorded there, so both agree.

Scalars are batched: one ``log_batch`` every ``FLUSH_S`` seconds and at the end, because each call is a
store write (a SQLite transaction, an HTTP request): sent per step, it cost 6-30 ms a step on the SQLite store
here, more than a small model's step. A worker killed meanwhile loses at most those seconds in MLflow
(metrics.jsonl keeps them).

A server that does not answer must not hold up training: unless the environment says otherwise, MLflow's
HTTP client is given one try and a 10 s timeout (``trainbox.tracker_runs.mlflow_env``); a failure is the
``Tracking`` boundary's single warning and the tracker is off for the rest of the run.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from core.events import Event
from core.tracking import flat_settings, scalars_at
from trainbox.config import TrackingConfig
from trainbox.home import Home
from trainbox.jobspec import JobSpec
from trainbox.tracker_runs import MlflowRun, TrackerRuns, mlflow_client

DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlflow-artifacts"
PARAM_BATCH = 100  # MLflow's limit on params per log_batch
PARAM_CHARS = 6000  # MLflow's limit on a param's value
FLUSH_S = 5.0  # metrics are sent at most this often (and at the end): one store write, not one per step
FLUSH_METRICS = 900  # ...or once this many wait (MLflow takes at most 1000 per log_batch)
STATUS = {"completed": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}  # a resume sets RUNNING again


def resolve_uri(uri: str, home: Path) -> tuple[str, str | None]:
    """(tracking URI, artefact location for a new experiment or None for the server's default). Empty: a
    SQLite store in the home; a relative ``sqlite:///`` path or a bare folder: in the home; a bare folder is
    MLflow's file store."""
    if not uri:
        return f"sqlite:///{home / DEFAULT_DB}", (home / DEFAULT_ARTIFACTS).as_uri()
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
        path = path if path.is_absolute() else home / path
        return f"sqlite:///{path}", (path.parent / DEFAULT_ARTIFACTS).as_uri()
    if "://" in uri or uri.startswith("file:"):
        return uri, None
    folder = Path(uri) if Path(uri).is_absolute() else home / uri
    return folder.as_uri(), None


class MlflowTracker:
    name = "mlflow"

    def __init__(self, spec: JobSpec, config: TrackingConfig, home: Home, settings: dict[str, Any]) -> None:
        self.run_dir, self.job_id, self.job_name = Path(spec.run_dir), spec.job_id, spec.job_name
        self.experiment, self.settings = config.project, settings
        self.uri, self.artifacts = resolve_uri(config.mlflow_uri, home.root)
        self.client: Any = None
        self.run_id = ""
        self.log_every = 1
        self.pending: list[Any] = []  # mlflow.entities.Metric not yet sent
        self.sent_at = 0.0

    def start(self, start_step: int, log_every: int) -> None:
        from mlflow.entities import Param

        self.log_every = log_every
        self.client = mlflow_client(self.uri)
        runs = TrackerRuns.load(self.run_dir)
        if runs.mlflow is not None and runs.mlflow.uri == self.uri:  # a resumed worker: the job's run
            self.run_id = runs.mlflow.run_id
            self.client.update_run(self.run_id, status="RUNNING")
            return
        found = self.client.get_experiment_by_name(self.experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(self.experiment, self.artifacts)
        run = self.client.create_run(
            experiment_id,
            run_name=f"job-{self.job_id} {self.job_name}"[:250],
            tags={"trainbox.job_id": str(self.job_id), "trainbox.job_name": self.job_name},
        )
        self.run_id = run.info.run_id
        runs.mlflow = MlflowRun(uri=self.uri, run_id=self.run_id)
        runs.save(self.run_dir)
        params = [Param(k, str(v)[:PARAM_CHARS]) for k, v in sorted(flat_settings(self.settings).items())]
        for i in range(0, len(params), PARAM_BATCH):
            self.client.log_batch(self.run_id, params=params[i : i + PARAM_BATCH])

    def __call__(self, ev: Event) -> None:
        found = scalars_at(ev, self.log_every) if self.client is not None else None
        if found is None or not found[1]:
            return
        from mlflow.entities import Metric

        step, scalars = found
        now = int(time.time() * 1000)
        self.pending += [Metric(k, v, now, step) for k, v in scalars.items()]
        if len(self.pending) >= FLUSH_METRICS or time.monotonic() - self.sent_at >= FLUSH_S:
            self.flush()

    def flush(self) -> None:
        batch, self.pending = self.pending, []
        self.sent_at = time.monotonic()
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def close(self, outcome: str = "") -> None:
        if self.client is not None and self.run_id:
            self.flush()
            self.client.set_terminated(self.run_id, STATUS.get(outcome, "FINISHED"))
