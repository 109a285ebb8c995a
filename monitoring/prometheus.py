"""``/metrics`` for Prometheus, through the official client library (``prometheus_client``).

The server is one of several processes and may restart at any time, so it keeps no metric objects that
count in memory: ``TrainboxCollector`` is a custom collector that reads everything at scrape time, the
current state as gauges (``Snapshot``: the status files, the spool, GPUs) and the instance's history as
counters derived from the model DB (``monitoring/prometheus_history.py``), plus a histogram of the current
job's step time. The library writes the exposition format (escaping, ``_total``, ``_bucket``/``le``).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from monitoring.prometheus_history import History

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # the text format generate_latest writes
STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)  # seconds per step


@dataclass
class GpuReading:
    index: int
    name: str
    memory_used_bytes: int
    memory_total_bytes: int
    utilization_ratio: float | None = None


@dataclass
class Snapshot:
    daemon_up: bool
    job_id: int | None = None
    step: int | None = None
    total_steps: int | None = None
    loss: float | None = None
    val_loss: float | None = None
    learning_rate: float | None = None
    tokens_per_second: float | None = None
    queue_depth: dict[str, int] = field(default_factory=dict)  # priority -> waiting jobs
    jobs: dict[str, int] = field(default_factory=dict)  # state -> jobs in the DB
    gpus: list[GpuReading] = field(default_factory=list)


@dataclass
class Reading:
    """One scrape's worth of facts."""

    snapshot: Snapshot
    history: History | None = None
    step_seconds: list[float] = field(default_factory=list)  # the current job's, seconds per step


def _gauge(name: str, doc: str, labels: list[str], samples: Iterable[tuple[list[str], float | None]]) -> Metric | None:
    """A gauge family; samples whose value is None are left out (and a family with none, entirely)."""
    family = GaugeMetricFamily(name, doc, labels=labels)
    for values, value in samples:
        if value is not None:
            family.add_metric(values, value)
    return family if family.samples else None


def gauges(s: Snapshot) -> Iterator[Metric]:
    """Today's readings, under the names they always had."""
    job_labels = ["job_id"] if s.job_id is not None else []
    job = [str(s.job_id)] if s.job_id is not None else []
    gpu = ["gpu", "name"]
    families = [
        _gauge(
            "trainbox_daemon_up",
            "1 when the daemon's heartbeat is fresh and its process alive.",
            [],
            [([], 1.0 if s.daemon_up else 0.0)],
        ),
        _gauge("trainbox_step", "Optimizer step of the current job.", job_labels, [(job, s.step)]),
        _gauge("trainbox_total_steps", "Steps the current job will run.", job_labels, [(job, s.total_steps)]),
        _gauge("trainbox_loss", "Latest training loss of the current job.", job_labels, [(job, s.loss)]),
        _gauge("trainbox_val_loss", "Latest validation loss of the current job.", job_labels, [(job, s.val_loss)]),
        _gauge("trainbox_learning_rate", "Current learning rate.", job_labels, [(job, s.learning_rate)]),
        _gauge(
            "trainbox_tokens_per_second",
            "Training throughput of the current job.",
            job_labels,
            [(job, s.tokens_per_second)],
        ),
        _gauge(
            "trainbox_queue_depth",
            "Jobs waiting, by priority.",
            ["priority"],
            [([p], float(n)) for p, n in s.queue_depth.items()],
        ),
        _gauge(
            "trainbox_jobs",
            "Jobs in the model DB, by state.",
            ["state"],
            [([st], float(n)) for st, n in sorted(s.jobs.items())],
        ),
        _gauge(
            "trainbox_gpu_memory_used_bytes",
            "GPU memory in use.",
            gpu,
            [([str(g.index), g.name], float(g.memory_used_bytes)) for g in s.gpus],
        ),
        _gauge(
            "trainbox_gpu_memory_total_bytes",
            "GPU memory in all.",
            gpu,
            [([str(g.index), g.name], float(g.memory_total_bytes)) for g in s.gpus],
        ),
        _gauge(
            "trainbox_gpu_utilization_ratio",
            "GPU busy share over the last sample period (0-1).",
            gpu,
            [([str(g.index), g.name], g.utilization_ratio) for g in s.gpus],
        ),
    ]
    yield from (f for f in families if f is not None)


def _counter(name: str, doc: str, value: float, labels: dict[str, str] | None = None) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=list(labels or {}))
    family.add_metric(list((labels or {}).values()), value)
    return family


def counters(h: History) -> Iterator[Metric]:
    """The instance's history; names end in ``_total`` as written by the library."""
    jobs = CounterMetricFamily(
        "trainbox_jobs_finished", "Jobs that reached a final state, by outcome.", labels=["outcome"]
    )
    for outcome, n in sorted(h.jobs_finished.items()):
        jobs.add_metric([outcome], n)
    yield jobs
    yield _counter("trainbox_steps_trained", "Optimizer steps trained by workers whose run ended.", h.steps_trained)
    yield _counter("trainbox_tokens_trained", "Tokens trained by workers whose run ended.", h.tokens_trained)
    gates = CounterMetricFamily("trainbox_gate_verdicts", "Eval gate verdicts on model versions.", labels=["verdict"])
    for verdict in ("promoted", "not_promoted"):
        gates.add_metric([verdict], h.gate_verdicts.get(verdict, 0))
    yield gates
    restarts = CounterMetricFamily(
        "trainbox_restarts",
        "Restarts: daemon starts, starts after an unclean daemon death, retries of failed job attempts.",
        labels=["what"],
    )
    for what, kind in (
        ("daemon_start", "daemon_started"),
        ("daemon_crash", "daemon_crashed"),
        ("job_retry", "job_retry"),
    ):
        restarts.add_metric([what], h.events.get(kind, 0))
    yield restarts
    yield _counter(
        "trainbox_notifications_given_up",
        "Webhook notifications given up after every try.",
        h.events.get("notification_given_up", 0),
    )


def step_histogram(seconds: list[float], job_id: int | None) -> Metric:
    """The current job's step time as a histogram (cumulative buckets, as Prometheus wants them)."""
    labels = ["job_id"] if job_id is not None else []
    family = HistogramMetricFamily(
        "trainbox_step_seconds",
        "Seconds per optimizer step of the current job (its recent metrics lines).",
        labels=labels,
    )
    ordered = sorted(seconds)
    buckets = [(str(b), float(bisect.bisect_right(ordered, b))) for b in STEP_BUCKETS]
    buckets.append(("+Inf", float(len(ordered))))
    family.add_metric([str(job_id)] if job_id is not None else [], buckets, sum(ordered))
    return family


class TrainboxCollector(Collector):
    """Registered once per server; ``read`` gathers one ``Reading`` per scrape."""

    def __init__(self, read: Callable[[], Reading]) -> None:
        self.read = read

    def collect(self) -> Iterator[Metric]:
        r = self.read()
        yield from gauges(r.snapshot)
        if r.history is not None:
            yield from counters(r.history)
        if r.snapshot.job_id is not None:
            yield step_histogram(r.step_seconds, r.snapshot.job_id)


def registry_for(read: Callable[[], Reading]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(TrainboxCollector(read))
    return registry


def render(s: Snapshot, history: History | None = None, step_seconds: list[float] | None = None) -> str:
    """The exposition text of one reading (the unit tests' way in; the server keeps its registry)."""
    reading = Reading(s, history, step_seconds or [])
    return generate_latest(registry_for(lambda: reading)).decode()
