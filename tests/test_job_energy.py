"""A job's GPU energy and cost in its report (issue 19, item 3): the per-run log the worker appends, the
sums and prices (pure), the bottleneck line, and the meter on a machine without a GPU."""

from __future__ import annotations

from pathlib import Path

import torch

from core.energy import EnergyMeter
from management.report_sections import TimeSplit, bottleneck, job_energy
from trainbox.config import ReportConfig
from trainbox.energy_log import ENERGY_LOG, EnergyRecord, append, read


def test_runs_add_up_and_are_priced_by_kwh_and_gpu_hour() -> None:
    runs = [
        EnergyRecord(1.0, 1800.0, "cuda", 2, 1.8e6),  # half an hour on two GPUs, 0.5 kWh
        EnergyRecord(2.0, 3600.0, "cuda", 1, 1.8e6),  # a resumed run: one more GPU-hour, 0.5 kWh
    ]
    e = job_energy(runs, ReportConfig(price_per_kwh=0.30, price_per_gpu_hour=2.0))
    assert (round(e.gpu_hours, 6), round(e.kwh or 0, 6), e.unmeasured_runs) == (2.0, 1.0, 0)
    assert e.cost is not None and abs(e.cost - (1.0 * 0.30 + 2.0 * 2.0)) < 1e-9
    assert job_energy(runs, ReportConfig()).cost is None  # no price: no cost line
    unread = job_energy([EnergyRecord(1.0, 3600.0, "cuda", 1, None)], ReportConfig(price_per_kwh=0.3))
    assert (unread.kwh, unread.unmeasured_runs, unread.cost) == (None, 1, None)  # nothing measured to price
    cpu = job_energy([EnergyRecord(1.0, 60.0, "cpu", 0, None)], ReportConfig(price_per_gpu_hour=2.0))
    assert (cpu.gpu_hours, cpu.unmeasured_runs, cpu.cost) == (0.0, 0, None)


def test_bottleneck_names_a_dominant_part_that_is_not_the_training() -> None:
    parts = {"start-up (process start, loading, first step)": 6.0, "training steps and the final save": 4.0}
    found = bottleneck(TimeSplit(wall_s=10.0, parts={**parts, "evaluation": 0.0, "checkpoints": 0.0}))
    assert found is not None and "start-up took 60%" in found and "warm_worker" in found
    steady = {"start-up (process start, loading, first step)": 1.0, "training steps and the final save": 9.0}
    assert bottleneck(TimeSplit(wall_s=10.0, parts=steady)) is None


def test_the_log_keeps_complete_lines_and_the_meter_records_a_cpu_run(tmp_path: Path) -> None:
    append(tmp_path, EnergyRecord(1.0, 2.0, "cuda", 1, 5.0))
    with open(tmp_path / ENERGY_LOG, "a") as f:
        f.write('{"time": 3.0, "seconds"')  # a run killed mid-write
    assert read(tmp_path) == [EnergyRecord(1.0, 2.0, "cuda", 1, 5.0)]
    (tmp_path / ENERGY_LOG).unlink()
    record = EnergyMeter(tmp_path, torch.device("cpu")).stop()
    assert record is not None and (record.device, record.gpus, record.joules) == ("cpu", 0, None)
    assert read(tmp_path) == [record]
    assert EnergyMeter(tmp_path, torch.device("cpu"), enabled=False).stop() is None  # other ranks write nothing
    assert len(read(tmp_path)) == 1
