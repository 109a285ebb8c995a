"""What Prometheus counts over the instance's life, read from the model DB at scrape time.

The status server keeps no counters of its own: it may restart at any moment and several processes do the
work. Every count is therefore a query over rows the daemon and the worker already write (jobs by final
state, the ``training_*`` events' steps and tokens, gate verdicts, daemon starts and unclean restarts, job
retries), so a counter never goes backwards when the server, the daemon or the machine restarts. The step
time histogram is the current job's, from its ``metrics.jsonl`` lines (``step_seconds``, pure).
"""

from __future__ import annotations

import itertools
import statistics
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select

from management.db import Event, Job, ModelDB, VersionGate

FINISHED_STATES = ("done", "failed", "cancelled", "rejected")
RUN_END_EVENTS = ("training_completed", "training_interrupted", "training_failed")  # core/reporting.py finish
COUNTED_EVENTS = ("daemon_started", "daemon_crashed", "job_retry", "notification_given_up")
OUTLIER_FACTOR = 10.0  # a gap this many times the median step is a restart, an evaluation or a save


@dataclass
class History:
    jobs_finished: dict[str, int] = field(default_factory=dict)  # final state -> jobs
    steps_trained: int = 0
    tokens_trained: int = 0
    gate_verdicts: dict[str, int] = field(default_factory=dict)  # promoted / not_promoted -> verdicts
    events: dict[str, int] = field(default_factory=dict)  # COUNTED_EVENTS kind -> events


def read_history(db: ModelDB) -> History:
    h = History(jobs_finished=dict.fromkeys(FINISHED_STATES, 0), events=dict.fromkeys(COUNTED_EVENTS, 0))
    with db.session() as s:
        for state, n in s.execute(
            select(Job.state, func.count()).where(Job.state.in_(FINISHED_STATES)).group_by(Job.state)
        ):
            h.jobs_finished[state] = int(n)
        # the JSON accessors SQLAlchemy renders for each backend (SQLite JSON_EXTRACT, PostgreSQL ->>)
        steps, tokens = Event.data["steps_trained"].as_integer(), Event.data["tokens"].as_integer()
        row = s.execute(select(func.sum(steps), func.sum(tokens)).where(Event.kind.in_(RUN_END_EVENTS))).one()
        h.steps_trained, h.tokens_trained = int(row[0] or 0), int(row[1] or 0)
        for promoted, n in s.execute(select(VersionGate.promoted, func.count()).group_by(VersionGate.promoted)):
            h.gate_verdicts["promoted" if promoted else "not_promoted"] = int(n)
        for kind, n in s.execute(
            select(Event.kind, func.count()).where(Event.kind.in_(COUNTED_EVENTS)).group_by(Event.kind)
        ):
            h.events[kind] = int(n)
    return h


def step_seconds(train: list[dict[str, Any]], tail: int = 1000) -> list[float]:
    """Seconds per optimizer step between consecutive metrics lines (of the last ``tail``): the time between
    two lines over the steps between them. Hybrid jumps are left out (no step was computed), and so is a
    gap over ``OUTLIER_FACTOR`` times the median: the worker restarted, evaluated or saved in it."""
    points = train[-tail:]
    out = []
    for a, b in itertools.pairwise(points):
        if a.get("advanced") or b.get("advanced"):
            continue
        ta, tb = a.get("time"), b.get("time")
        if not isinstance(ta, int | float) or not isinstance(tb, int | float):
            continue
        steps, seconds = b["step"] - a["step"], tb - ta
        if steps > 0 and seconds >= 0:
            out.append(seconds / steps)
    if not out:
        return out
    limit = statistics.median(out) * OUTLIER_FACTOR
    return [x for x in out if x <= limit]
