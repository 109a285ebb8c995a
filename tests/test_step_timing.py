"""Where the loop's time goes (issue 19): the loop clock on a fake clock (nesting, the interval, ``other``), the
report's split and bottleneck line from recorded timing lines, and a real loop whose timing events add up to
its wall-clock. The worker's metrics lines are checked in tests/test_core_worker.py."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from core import step_timing
from core.events import Event, TimingEvent
from management.report_facts import JobFacts
from management.report_markdown import render
from management.report_sections import RunSpan, bottleneck, time_split
from management.run_series import parse_metrics
from tests.test_core_train import examples, make_trainer, model_dir  # noqa: F401 (fixtures)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_nested_spans_are_booked_once_and_the_rest_is_other(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    monkeypatch.setattr(step_timing.time, "perf_counter", clock)
    loop = step_timing.LoopClock(torch.device("cpu"))
    loop.restart()
    with loop.span("data"):
        clock.now += 1.0
    with loop.span("forward_backward"):
        clock.now += 3.0
        with loop.span("data"):  # the next step's batches, prepared inside the passes
            clock.now += 0.5
        clock.now += 1.0
    assert loop.timed("optimizer", lambda x: x * 2, 21) == 42
    clock.now += 0.25  # logging, between the phases
    ev = loop.event(step=1)
    assert ev.loop_s == 5.75
    assert ev.seconds == {
        "data": 1.5, "forward_backward": 4.0, "optimizer": 0.0, "eval": 0.0, "checkpoint": 0.0, "other": 0.25
    }  # fmt: skip
    with pytest.raises(RuntimeError), loop.span("eval"):  # a phase that raises (an OOM) is still booked
        clock.now += 2.0
        raise RuntimeError("out of memory")
    second = loop.event(step=2)  # a new interval: the first one's seconds are not counted again
    assert second.loop_s == 2.0 and second.seconds["eval"] == 2.0 and second.seconds["data"] == 0.0
    record = second.as_record()
    assert record["kind"] == "timing" and record["eval_s"] == 2.0 and "device_timed" not in record


def _timing_line(step: int, at: float, loop: float, **phases: float) -> str:
    fields = "".join(f', "{k}_s": {v}' for k, v in phases.items())
    return f'{{"kind": "timing", "step": {step}, "time": {at}, "loop_s": {loop}{fields}}}\n'


def test_split_from_timing_lines_names_a_data_or_optimizer_bottleneck() -> None:
    # a run from 100 to 200: its loop starts at 110 (first line at 150 covering 40 s), ends at 190
    text = _timing_line(10, 150.0, 40.0, data=20.0, forward_backward=12.0, optimizer=4.0, eval=3.0, other=1.0)
    text += _timing_line(20, 190.0, 40.0, data=20.0, forward_backward=12.0, optimizer=4.0, checkpoint=3.0, other=1.0)
    text += _timing_line(25, 400.0, 9.0, data=9.0)  # outside any closed run: not counted
    series = parse_metrics(text)
    assert [p.step for p in series.timing] == [10, 20, 25]
    split = time_split([RunSpan(1, 100.0, 200.0), RunSpan(2, 390.0, None)], [], [], [], 1, series.timing)
    assert split.wall_s == 100.0
    assert split.parts == {
        "start-up (process start, loading)": 10.0,
        "waiting for data (collating and staging batches)": 40.0,
        "forward and backward": 24.0,
        "optimizer step": 8.0,
        "evaluation": 3.0,
        "checkpoints": 3.0,
        "other loop work (reporting, trackers, health checks)": 2.0,
        "finishing (final save, scoring the examples, exit)": 10.0,
    }
    found = bottleneck(split)
    assert found is not None and found.startswith("bottleneck: waiting for data took 40% of the wall-clock")
    assert "training.packing" in found
    text = render(JobFacts(job_id=1), [], [], [], None, split)
    assert "| waiting for data (collating and staging batches) | 40.0 s | 40% |" in text
    assert f"**{found}**" in text  # the whole line with its fix, not cut like a file name

    heavy_update = parse_metrics(_timing_line(10, 190.0, 90.0, forward_backward=50.0, optimizer=35.0, other=5.0))
    found = bottleneck(time_split([RunSpan(1, 100.0, 200.0)], [], [], [], 1, heavy_update.timing))
    assert found is not None and found.startswith("bottleneck: optimizer took 35%") and "grad_accum" in found

    model_bound = parse_metrics(_timing_line(10, 190.0, 90.0, forward_backward=80.0, optimizer=5.0, data=5.0))
    assert bottleneck(time_split([RunSpan(1, 100.0, 200.0)], [], [], [], 1, model_bound.timing)) is None

    older = time_split([RunSpan(1, 100.0, 200.0)], [(1, 111.0)], [], [], 1, [])  # a worker without timing lines
    assert "start-up (process start, loading, first step)" in older.parts
    assert "no timing lines" in older.notes[-1]


def test_a_real_loop_times_every_phase_and_adds_up_to_its_wall_clock(model_dir: Path, examples: object) -> None:  # noqa: F811
    trainer = make_trainer(model_dir, examples, max_steps=8, eval_every=4, checkpoint_every=4, log_every=2)
    trainer.clock.every_s = 0.0  # every logged step (10 s apart in a job: a few lines a minute)
    events: list[Event] = []
    saves: list[int] = []

    def save() -> Path:
        saves.append(trainer.state.step)
        return Path()

    started = time.perf_counter()
    assert trainer.run(events.append, lambda: False, save) == "completed"
    wall = time.perf_counter() - started
    timing = [e for e in events if isinstance(e, TimingEvent)]
    assert [e.step for e in timing] == [2, 4, 6, 8, 8]  # every log_every step, then the loop's end
    loop = sum(e.loop_s for e in timing)
    assert loop <= wall and loop > 0.9 * wall  # the loop's intervals cover its run, none twice
    for e in timing:
        assert all(v >= 0 for v in e.seconds.values())
        assert sum(e.seconds.values()) == pytest.approx(e.loop_s, rel=1e-6, abs=1e-9)  # other is the rest
    total = {k: sum(e.seconds[k] for e in timing) for k in timing[0].seconds}
    assert all(total[k] > 0 for k in ("data", "forward_backward", "optimizer", "eval"))
    assert saves == [4, 8] and total["checkpoint"] > 0
    assert timing[-1].seconds["forward_backward"] == 0.0  # the last interval: the final eval and checkpoint only
    assert timing[-1].seconds["eval"] > 0 and timing[-1].seconds["checkpoint"] > 0
