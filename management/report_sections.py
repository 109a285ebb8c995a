"""Three of the job report's sections as pure functions: what changed from the previous job's settings,
where the time went, and the GPUs' energy and the job's cost. Inputs are plain values read elsewhere
(``management/report_facts.py``), so each is tested with hand-built numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from management.run_series import TimingPoint
from trainbox.config import ReportConfig
from trainbox.energy_log import EnergyRecord


def _flat(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flat(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = value


def settings_diff(previous: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(setting, previous value, this job's value) for every effective setting that differs; nested
    tables (``hybrid``) as dotted names. A key one side lacks shows as None there."""
    a: dict[str, Any] = {}
    b: dict[str, Any] = {}
    _flat("", previous, a)
    _flat("", current, b)
    return [(k, a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]


@dataclass(frozen=True)
class RunSpan:
    """One worker start: from the daemon's run row."""

    attempt: int
    started_at: float
    ended_at: float | None
    outcome: str = ""


@dataclass
class TimeSplit:
    wall_s: float = 0.0  # every run's start to end, summed
    process_hours: float = 0.0  # wall x processes (nproc): what the job occupied
    parts: dict[str, float] = field(default_factory=dict)  # label -> seconds, summing to wall_s
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class JobEnergy:
    """A job's GPU use over its runs' training loops, and its price where ``[report]`` sets one."""

    gpu_hours: float
    kwh: float | None  # None: no run measured energy (no GPU, or no counter)
    unmeasured_runs: int  # GPU runs whose energy counter could not be read
    cost: float | None  # None: no price set, or nothing measured to price


BOTTLENECK_SHARE = 0.3  # a part other than the model's own work taking this share of the wall-clock is named
BOTTLENECK_FIX = {
    "start-up": "each job pays its worker's start (imports, model and data load, first step): put small files "
    "together into one job; keep daemon.warm_worker on (the default), which does the imports ahead",
    "waiting for data": "the training process collates and stages every batch itself: keep training.packing = "
    '"auto" (fewer, denser rows), lower training.max_length if few examples need it, give the worker more '
    "CPU threads (training.threads); on a GPU the next step's batches are already prepared while the current "
    "one runs, so a large share there means the host's CPU is the limit",
    "optimizer": "the update costs as much as the passes: raise training.grad_accum (one update for more "
    "tokens), or train a LoRA adapter (training.lora = true: AdamW then updates only the adapter)",
    "evaluation": "raise training.eval_every or lower training.eval_max_examples",
    "checkpoints": "raise training.checkpoint_every (a resume then repeats more steps)",
}


def bottleneck(split: TimeSplit) -> str | None:
    """The part that dominates where it is not the training itself, with the setting that shrinks it."""
    if split.wall_s <= 0:
        return None
    for label, seconds in split.parts.items():
        key = next((k for k in BOTTLENECK_FIX if label.startswith(k)), None)
        share = seconds / split.wall_s
        if key is not None and share >= BOTTLENECK_SHARE:
            return f"bottleneck: {key} took {share:.0%} of the wall-clock; {BOTTLENECK_FIX[key]}"
    return None


def job_energy(records: list[EnergyRecord], prices: ReportConfig) -> JobEnergy:
    """Sum the runs (``runs/job-N/energy.jsonl``); price the kWh and the GPU-hours that were measured."""
    gpu_hours = sum(r.seconds * r.gpus for r in records) / 3600
    measured = [r.joules for r in records if r.joules is not None]
    kwh = sum(measured) / 3.6e6 if measured else None
    unmeasured = sum(1 for r in records if r.gpus and r.joules is None)
    parts = []
    if prices.price_per_kwh and kwh is not None:
        parts.append(kwh * prices.price_per_kwh)
    if prices.price_per_gpu_hour and gpu_hours:
        parts.append(gpu_hours * prices.price_per_gpu_hour)
    return JobEnergy(gpu_hours, kwh, unmeasured, sum(parts) if parts else None)


def _at_or_before(times: list[tuple[int, float]], step: int) -> float | None:
    found = [t for s, t in times if s <= step]
    return max(found) if found else None


LOOP_PARTS = {  # a timing line's phase -> the report's label
    "data": "waiting for data (collating and staging batches)",
    "forward_backward": "forward and backward",
    "optimizer": "optimizer step",
    "eval": "evaluation",
    "checkpoint": "checkpoints",
    "other": "other loop work (reporting, trackers, health checks)",
}


def time_split(
    runs: list[RunSpan],
    train_times: list[tuple[int, float]],
    eval_times: list[tuple[int, float]],
    checkpoint_times: list[tuple[int, float]],
    processes: int,
    loop: list[TimingPoint] | None = None,
) -> TimeSplit:
    """Wall-clock from the run rows, split by the worker's timing lines (``loop``) where it wrote them, else
    estimated from the other lines' times. Metrics lines a resume cut back are gone, so a resumed job's split
    covers what its file still holds."""
    out = TimeSplit()
    closed = [r for r in runs if r.ended_at is not None]
    out.wall_s = sum(max(0.0, (r.ended_at or r.started_at) - r.started_at) for r in closed)
    out.process_hours = out.wall_s * max(1, processes) / 3600
    if len(closed) < len(runs):
        out.notes.append(f"{len(runs) - len(closed)} run(s) without an end time are not counted")
    timed = [p for p in loop or [] if p.time is not None]
    if timed and closed:
        _measured_split(out, closed, timed)
    else:
        _estimated_split(out, closed, train_times, eval_times, checkpoint_times)
    return out


def _at(p: TimingPoint) -> float:
    return p.time or 0.0


def _measured_split(out: TimeSplit, closed: list[RunSpan], loop: list[TimingPoint]) -> None:
    """Start-up is each run's start to its loop's start (its first timing line's time less that line's
    interval); the loop's phases are the timing lines' sums; the rest (the final save, scoring the training
    examples, the exit) is finishing."""
    starting, inside = 0.0, []
    for r in closed:
        mine = sorted((p for p in loop if r.started_at <= (p.time or 0.0) <= (r.ended_at or 0.0)), key=_at)
        if mine:
            starting += max(0.0, _at(mine[0]) - mine[0].loop_s - r.started_at)
        inside += mine
    loop = inside  # a line of a run without an end time is not counted, as its run is not
    phases = {name: sum(p.seconds.get(name, 0.0) for p in loop) for name in LOOP_PARTS}
    in_loop = sum(p.loop_s for p in loop)
    out.parts = {"start-up (process start, loading)": starting}
    out.parts.update({label: phases[name] for name, label in LOOP_PARTS.items()})
    out.parts["finishing (final save, scoring the examples, exit)"] = max(0.0, out.wall_s - starting - in_loop)
    if any(p.device_timed for p in loop):
        out.notes.append(
            "on the GPU, forward and backward and the optimizer step are the device's time (CUDA events); "
            "data time is the host's, partly overlapping it, so the parts may add up to more than the loop took"
        )


def _estimated_split(
    out: TimeSplit,
    closed: list[RunSpan],
    train_times: list[tuple[int, float]],
    eval_times: list[tuple[int, float]],
    checkpoint_times: list[tuple[int, float]],
) -> None:
    """A run from before the worker wrote timing lines: evaluation and checkpoint time as the gap between a
    step's line and the evaluation's line / the checkpoint's event that follows it (the loop's order: step,
    eval, checkpoint); start-up as each run's start to its first step line; the rest is training and
    finishing."""
    evaluating = 0.0
    for step, t in eval_times:
        before = _at_or_before(train_times, step)
        if before is not None and t >= before:
            evaluating += t - before
    checkpointing = 0.0
    lines = train_times + eval_times
    for step, t in checkpoint_times:
        before = _at_or_before(lines, step)
        if before is not None and t >= before:
            checkpointing += t - before
    starting = 0.0
    for r in closed:
        first = min((t for _, t in train_times if r.started_at <= t <= (r.ended_at or t)), default=None)
        if first is not None:
            starting += first - r.started_at
    rest = max(0.0, out.wall_s - evaluating - checkpointing - starting)
    out.parts = {
        "start-up (process start, loading, first step)": starting,
        "training steps and the final save": rest,
        "evaluation": evaluating,
        "checkpoints": checkpointing,
    }
    out.notes.append(
        "this run's worker recorded no timing lines: forward, backward, optimizer and data time are not split"
    )
