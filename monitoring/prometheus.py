"""``/metrics`` in the Prometheus text exposition format (0.0.4), for people who graph with Grafana.

Pure: ``render`` turns a ``Snapshot`` into text, so the format is unit-tested without a server.
Gauges only: every value is a reading of the current state, not a counter the server keeps.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


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


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


def _family(name: str, help_text: str, samples: Iterable[tuple[dict[str, str], float | None]]) -> list[str]:
    """One metric family; samples whose value is None are left out (and a family with none, entirely)."""
    lines = []
    for labels, value in samples:
        if value is None:
            continue
        label_text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
        lines.append(f"{name}{{{label_text}}} {_number(value)}" if label_text else f"{name} {_number(value)}")
    if not lines:
        return []
    return [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", *lines]


def render(s: Snapshot) -> str:
    job = {"job_id": str(s.job_id)} if s.job_id is not None else {}
    out: list[str] = []
    out += _family(
        "trainbox_daemon_up",
        "1 when the daemon's heartbeat is fresh and its process alive.",
        [({}, 1.0 if s.daemon_up else 0.0)],
    )
    out += _family("trainbox_step", "Optimizer step of the current job.", [(job, s.step)])
    out += _family("trainbox_total_steps", "Steps the current job will run.", [(job, s.total_steps)])
    out += _family("trainbox_loss", "Latest training loss of the current job.", [(job, s.loss)])
    out += _family("trainbox_val_loss", "Latest validation loss of the current job.", [(job, s.val_loss)])
    out += _family("trainbox_learning_rate", "Current learning rate.", [(job, s.learning_rate)])
    out += _family(
        "trainbox_tokens_per_second", "Training throughput of the current job.", [(job, s.tokens_per_second)]
    )
    out += _family(
        "trainbox_queue_depth",
        "Jobs waiting, by priority.",
        [({"priority": p}, float(n)) for p, n in s.queue_depth.items()],
    )
    out += _family(
        "trainbox_jobs",
        "Jobs in the model DB, by state.",
        [({"state": st}, float(n)) for st, n in sorted(s.jobs.items())],
    )
    out += _family(
        "trainbox_gpu_memory_used_bytes",
        "GPU memory in use.",
        [({"gpu": str(g.index), "name": g.name}, float(g.memory_used_bytes)) for g in s.gpus],
    )
    out += _family(
        "trainbox_gpu_memory_total_bytes",
        "GPU memory in all.",
        [({"gpu": str(g.index), "name": g.name}, float(g.memory_total_bytes)) for g in s.gpus],
    )
    out += _family(
        "trainbox_gpu_utilization_ratio",
        "GPU busy share over the last sample period (0-1).",
        [({"gpu": str(g.index), "name": g.name}, g.utilization_ratio) for g in s.gpus],
    )
    return "\n".join(out) + "\n"
