"""The job report: ``runs/job-N/report.md`` and its PNG plots, written once a job has ended.

``main`` runs in the daemon's kept report child (``trainbox/child_server.py``, handed requests by
``daemon/reports.py``): matplotlib's import and the drawing take seconds, which the daemon's tick must
never spend. ``trainbox report N`` calls ``ensure`` in its own process.

Order: the plots, then ``report.md`` (atomic), then its copy beside the job's file in the spool
(``queue/done/<name>.report.md``, image links pointing into the run folder; a copy, never a symlink:
the spool's folders are read by people and tools that must not follow links). A report that fails is
only logged (the daemon records an event): it never changes the job's outcome. The daemon's request
``runs/job-N/report-pending.json`` is deleted only after the child exits, so a daemon killed
meanwhile writes the report at its next start; a report.md that is missing is also written by the
first ``trainbox report N``.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from management import diagnosis
from management.db import ModelDB
from management.report_facts import JobFacts, gather
from management.report_markdown import render
from management.report_plots import PLOT_NAMES, Plot, draw
from management.report_sections import job_energy, settings_diff, time_split
from management.report_trackers import send_report
from trainbox.atomic import atomic_write_text
from trainbox.config import ConfigError, ReportConfig, load_settings
from trainbox.home import Home

log = logging.getLogger("trainbox.report")

REPORT = "report.md"
REPORT_PENDING = "report-pending.json"  # the daemon's request; see daemon/reports.py
REPORT_LOG = "report.log"
SPOOL_SUFFIX = ".report.md"
DB_URL_ENV = "TRAINBOX_DB_URL"  # the daemon's DB URL for its report child (a password never on an argv)


def spool_copy_path(facts: JobFacts) -> Path | None:
    """Where the report's copy goes: beside the job's file in the spool (done/ or failed/)."""
    f = facts.spool_file
    if f is None or f.parent.name not in ("done", "failed"):
        return None
    return f.with_name(f.name + SPOOL_SUFFIX)


def markdown(facts: JobFacts, plots: list[Plot], image_prefix: str = "", prices: ReportConfig | None = None) -> str:
    """The report's text for gathered facts and drawn plots (pure)."""
    findings = diagnosis.diagnose(facts.series, facts.cfg, facts.stats, facts.gate)
    missing = diagnosis.missing(facts.series, facts.stats)
    diff = settings_diff(facts.previous.training, facts.cfg.model_dump(mode="json")) if facts.previous else None
    split = time_split(
        facts.runs,
        [(p.step, p.time) for p in facts.series.train if p.time is not None],
        [(e.step, e.time) for e in facts.series.evals if e.time is not None],
        facts.checkpoint_times,
        facts.cfg.nproc,
        facts.series.timing,
    )
    prices = prices or ReportConfig()
    energy = job_energy(facts.energy, prices) if facts.energy else None
    return render(facts, findings, missing, plots, diff, split, image_prefix, energy, prices.currency)


def report_prices(home: Home) -> ReportConfig:
    """The home's ``[report]`` prices; a config that does not load prices nothing (the report still comes)."""
    try:
        return load_settings(home.config_file).report
    except ConfigError as e:
        log.warning("no prices for the report: %s", e)
        return ReportConfig()


def generate(home: Home, db: ModelDB, job_id: int) -> Path:
    """Write the report of one job (again, if it exists); returns ``runs/job-N/report.md``."""
    run_dir = home.run_dir(job_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    facts = gather(home, db, job_id)
    for stale in PLOT_NAMES:
        (run_dir / stale).unlink(missing_ok=True)
    plots = draw(facts.series, run_dir, [w.step for w in facts.series.warnings])
    prices = report_prices(home)
    atomic_write_text(run_dir / REPORT, markdown(facts, plots, prices=prices))
    copy = spool_copy_path(facts)
    if copy is not None:
        prefix = os.path.relpath(run_dir, copy.parent) + "/"
        atomic_write_text(copy, markdown(facts, plots, prefix, prices))
    sent = send_report(home, job_id, [run_dir / REPORT, *(run_dir / p.file for p in plots)])
    if sent:
        log.info("job %d: report attached to the %s run(s)", job_id, " and ".join(sent))
    return run_dir / REPORT


def ensure(home: Home, db: ModelDB, job_id: int) -> Path:
    """The report, written first if it is missing (a daemon killed before its child wrote it)."""
    path = home.run_dir(job_id) / REPORT
    return path if path.is_file() else generate(home, db, job_id)


def main(argv: list[str] | None = None) -> int:
    """``N --home H``: what the daemon's kept report child runs for each request (``daemon/reports.py``)."""
    parser = argparse.ArgumentParser(prog="management.job_report", description=__doc__)
    parser.add_argument("job_id", type=int)
    parser.add_argument("--home", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    home = Home.resolve(args.home)
    db = ModelDB(os.environ.get(DB_URL_ENV) or load_settings(home.config_file).db.url_for(home.db_url))
    try:
        path = generate(home, db, args.job_id)
    finally:
        db.close()
    log.info("job %d: report written to %s", args.job_id, path)
    return 0
