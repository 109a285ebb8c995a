"""Issue 19 end to end: a real daemon trains one real small job (the embedded tiny model) and its report
child writes ``runs/job-N/report.md`` with readable plots, the worker's data counts and per-example
losses, and the report's copy beside the job's file in ``queue/done/``. One worker start."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from management.job_report import REPORT, REPORT_PENDING
from tests.e2e_helpers import DaemonProc, make_home, wait_for, write_jsonl
from trainbox.data_stats import DataStats

pytestmark = pytest.mark.e2e

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_a_real_job_gets_its_report_plots_and_spool_copy(tmp_path: Path, embedded: Path) -> None:
    home = make_home(tmp_path / "home", embedded, max_steps=20)
    rows = [json.loads(x) for x in (EXAMPLES / "arithmetic.jsonl").read_text().splitlines()[:60]]
    daemon = DaemonProc(home)
    try:
        write_jsonl(home.inbox / "arithmetic.jsonl", rows)
        run_dir = home.run_dir(1)
        wait_for(
            lambda: (run_dir / REPORT).is_file() and not (run_dir / REPORT_PENDING).exists(), 180, "the job's report"
        )
    finally:
        assert daemon.stop() == 0, daemon.log_text()
    text = (run_dir / REPORT).read_text()
    assert text.startswith("# Job 1: arithmetic.jsonl") and "**Outcome: done**" in text and "## Diagnosis" in text
    for png in ("loss.png", "lr.png", "grad_norm.png", "tokens_per_s.png"):
        assert (run_dir / png).read_bytes().startswith(b"\x89PNG"), png
        assert f"]({png})" in text
    (copy,) = home.done.glob("*arithmetic.jsonl.report.md")
    assert "](../../runs/job-000001/loss.png)" in copy.read_text()
    stats = DataStats.load(run_dir)
    assert stats is not None and stats.records == 60 and stats.example_losses is not None
    assert stats.example_losses.scored == stats.train_examples
    assert "produced: version 1, promoted to current" in text and "Wall-clock" in text
