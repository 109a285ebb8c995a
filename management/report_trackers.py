"""The job report as an artefact of the job's MLflow and W&B runs.

The report is written by a child the daemon starts after the worker has exited (``management/job_report.py``),
so the worker's trackers are closed by then: this module opens the same runs again from the ids the worker
recorded (``runs/job-N/trackers.json``) and attaches ``report.md`` and its plots. MLflow: the files under the
run's artefact folder ``report/`` (``MlflowClient.log_artifact``). W&B: an artefact ``job-N-report`` of type
``report``, logged from the same run id resumed (offline, a second run folder under ``runs/job-N/wandb/``
that ``wandb sync`` merges into the run).

A tracker that fails here (a server down, a package gone) is logged and skipped: the report is written all
the same, and the job's outcome was settled before the report began.
"""

from __future__ import annotations

import logging
from pathlib import Path

from trainbox.home import Home
from trainbox.tracker_runs import MlflowRun, TrackerRuns, WandbRun, close_wandb, mlflow_client, open_wandb

log = logging.getLogger("trainbox.report")
ARTIFACT_FOLDER = "report"  # the report's folder in the MLflow run's artefacts


def _mlflow(run: MlflowRun, files: list[Path]) -> None:
    client = mlflow_client(run.uri)
    for f in files:
        client.log_artifact(run.run_id, str(f), ARTIFACT_FOLDER)


def _wandb(run: WandbRun, files: list[Path], job_id: int, cache: Path) -> None:
    import wandb

    from_report = open_wandb(run, cache, job_type="report")
    try:
        artifact = wandb.Artifact(f"job-{job_id}-report", type="report")
        for f in files:
            artifact.add_file(str(f), name=f.name)
        from_report.log_artifact(artifact)
    finally:
        from_report.finish()
        close_wandb()


def send_report(home: Home, job_id: int, files: list[Path]) -> list[str]:
    """Attach ``files`` (report.md first, then the plots) to the job's tracker runs; returns the trackers it
    reached. Never raises: a tracker that fails is a warning in the report's log."""
    run_dir = home.run_dir(job_id)
    runs = TrackerRuns.load(run_dir)
    sent: list[str] = []
    if runs.mlflow is not None:
        try:
            _mlflow(runs.mlflow, files)
            sent.append("mlflow")
        except Exception as e:  # boundary: a tracker never fails the report
            log.warning(
                "job %d: report not attached to MLflow run %s: %s: %s", job_id, runs.mlflow.run_id, type(e).__name__, e
            )
    if runs.wandb is not None:
        try:
            _wandb(runs.wandb, files, job_id, home.cache)
            sent.append("wandb")
        except Exception as e:  # boundary: as above
            log.warning(
                "job %d: report not attached to W&B run %s: %s: %s", job_id, runs.wandb.run_id, type(e).__name__, e
            )
    return sent
