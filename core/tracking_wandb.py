"""The Weights & Biases tracker (``[tracking] wandb = true``): the job's scalars and its settings as the run's
config, one run per job in the project ``[tracking] project``, files under ``runs/job-N/wandb/``.

``wandb_mode = "offline"`` (the default: trainbox runs unattended, often without the network) writes only
local files, uploaded later with ``wandb sync runs/job-N/wandb/offline-run-*``. The run's id goes to
``runs/job-N/trackers.json``: a resumed worker opens the same id (``resume="allow"``), and the job report's
child attaches the report to it as an artefact (``management/report_trackers.py``).
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

from core.events import Event
from core.tracking import flat_settings, scalars_at
from trainbox.config import TrackingConfig
from trainbox.home import Home
from trainbox.jobspec import JobSpec
from trainbox.tracker_runs import TrackerRuns, WandbRun, close_wandb, open_wandb


class WandbTracker:
    name = "wandb"

    def __init__(self, spec: JobSpec, config: TrackingConfig, home: Home, settings: dict[str, Any]) -> None:
        self.run_dir, self.job_id, self.job_name = Path(spec.run_dir), spec.job_id, spec.job_name
        self.project, self.mode, self.settings, self.cache = config.project, config.wandb_mode, settings, home.cache
        self.run: Any = None
        self.log_every = 1

    def start(self, start_step: int, log_every: int) -> None:
        self.log_every = log_every
        runs = TrackerRuns.load(self.run_dir)
        known = runs.wandb if runs.wandb is not None and runs.wandb.project == self.project else None
        if known is None:  # recorded before the run opens, so a worker killed during init keeps its id
            run_id = f"job{self.job_id}-{secrets.token_hex(4)}"  # unique across homes sharing a project
            known = WandbRun(project=self.project, run_id=run_id, mode=self.mode, dir=str(self.run_dir))
            runs.wandb = known
            runs.save(self.run_dir)
        name = f"job-{self.job_id} {self.job_name}"[:128]
        self.run = open_wandb(known, self.cache, name=name, config=flat_settings(self.settings))

    def __call__(self, ev: Event) -> None:
        found = scalars_at(ev, self.log_every) if self.run is not None else None
        if found is not None and found[1]:
            step, scalars = found
            self.run.log(scalars, step=step)

    def close(self, outcome: str = "") -> None:
        if self.run is not None:
            self.run.finish(exit_code=1 if outcome == "failed" else 0)
            self.run = None
            close_wandb()
