"""``/metrics`` through ``prometheus_client`` (issue 19): counters derived from a real SQLite model DB, so
they survive any restart; the current job's step-time histogram; the exposition parsed back by the
library's own parser. (The gauges, and the route on a real server, are in tests/test_monitoring_*.py.)"""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from management.db import Job, ModelDB, ModelVersion, VersionGate
from monitoring.prometheus import Snapshot, render
from monitoring.prometheus_history import read_history, step_seconds


def _fill(db: ModelDB) -> None:
    with db.session() as s:
        for i, state in enumerate(["done", "done", "failed", "rejected", "running", "queued"], start=1):
            s.add(Job(id=i, name=f"j{i}.jsonl", state=state))
        s.add(ModelVersion(id=1, path="/m/v0001", job_id=1))
        s.add(ModelVersion(id=2, path="/m/v0002", job_id=2))
    with db.session() as s:
        s.add(VersionGate(version_id=1, promoted=True))
        s.add(VersionGate(version_id=2, promoted=False))
    db.event("training_completed", "done", 1, step=30, steps_trained=30, tokens=3000)
    db.event("training_interrupted", "paused", 2, step=10, steps_trained=10, tokens=1000)
    db.event("training_completed", "done", 2, step=25, steps_trained=15, tokens=1500)
    db.event("training_failed", "old worker", 3, step=5)  # written before issue 19: no steps_trained
    for kind in ("daemon_started", "daemon_started", "daemon_crashed", "job_retry"):
        db.event(kind, kind)


def test_counters_come_from_the_db_and_survive_restarts(any_db_url: str) -> None:
    """On SQLite and PostgreSQL (tests/conftest.py ``any_db_url``): the counters sum JSON fields of events."""
    db = ModelDB(any_db_url)
    _fill(db)
    db.close()
    db = ModelDB(any_db_url)  # a restarted server: nothing was kept in memory
    try:
        text = render(Snapshot(daemon_up=True, job_id=5, step=3), read_history(db), [0.1, 0.2, 0.3, 7.0])
    finally:
        db.close()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["trainbox_jobs_finished"].type == "counter"
    got = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert got[("trainbox_jobs_finished_total", (("outcome", "done"),))] == 2
    assert got[("trainbox_jobs_finished_total", (("outcome", "rejected"),))] == 1
    assert got[("trainbox_jobs_finished_total", (("outcome", "cancelled"),))] == 0
    assert got[("trainbox_steps_trained_total", ())] == 55
    assert got[("trainbox_tokens_trained_total", ())] == 5500
    assert got[("trainbox_gate_verdicts_total", (("verdict", "promoted"),))] == 1
    assert got[("trainbox_gate_verdicts_total", (("verdict", "not_promoted"),))] == 1
    assert got[("trainbox_restarts_total", (("what", "daemon_start"),))] == 2
    assert got[("trainbox_restarts_total", (("what", "daemon_crash"),))] == 1
    assert got[("trainbox_restarts_total", (("what", "job_retry"),))] == 1
    assert families["trainbox_step_seconds"].type == "histogram"
    job = ("job_id", "5")
    assert got[("trainbox_step_seconds_bucket", (job, ("le", "0.1")))] == 1
    assert got[("trainbox_step_seconds_bucket", (job, ("le", "0.25")))] == 2
    assert got[("trainbox_step_seconds_bucket", (job, ("le", "10.0")))] == 4
    assert got[("trainbox_step_seconds_bucket", (job, ("le", "+Inf")))] == 4
    assert got[("trainbox_step_seconds_count", (job,))] == 4
    assert abs(got[("trainbox_step_seconds_sum", (job,))] - 7.6) < 1e-9
    assert got[("trainbox_step", (job,))] == 3  # the gauges are still there


def test_step_seconds_from_metrics_lines() -> None:
    lines = [
        {"step": 1, "time": 100.0},
        {"step": 2, "time": 100.5},
        {"step": 4, "time": 101.5},  # two steps per line: 0.5 s each
        {"step": 5, "time": 102.0},
        {"step": 6, "time": 400.0},  # the worker restarted in between: not a step time
        {"step": 16, "time": 400.1, "advanced": 10},  # a hybrid jump: no step was computed
        {"step": 17, "time": 400.6},
        {"step": 18, "time": 401.1},
    ]
    assert step_seconds(lines) == [0.5, 0.5, 0.5, 0.5]
    assert step_seconds([]) == [] and step_seconds(lines[:1]) == []
