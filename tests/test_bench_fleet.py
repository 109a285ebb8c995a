"""scripts/bench_fleet.py's CPU accounting (``--cpu-report``): children by kind, and a child that lived and
was reaped between two samples still counted (as ``unsampled``, from its parent's exact ``children_*``
times), so the per-kind table adds up to what the processes used."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_fleet.py"
BURN = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass  # core.worker"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_fleet", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_fleet"] = module
    spec.loader.exec_module(module)
    return module


def test_children_are_told_apart_by_their_module(bench: ModuleType) -> None:
    python = sys.executable
    assert bench.kind_of([python, "-m", "core.worker", "--run-dir", "r"]) == "worker"
    assert bench.kind_of([python, "-m", "core.standby"]) == "worker"
    kept = [python, "-m", "trainbox.child_server"]
    assert bench.kind_of([*kept, "core.evaluate:main", "--home", "h"]) == "gate"
    assert bench.kind_of([*kept, "management.job_report:main", "--home", "h"]) == "report"
    assert bench.kind_of([python, "-m", "cli", "daemon"]) == "other child"


def test_a_child_reaped_between_samples_is_counted_as_unsampled(bench: ModuleType) -> None:
    """A stand-in daemon runs a child that burns 0.3 CPU seconds and is reaped; the meter samples only at
    start and stop (a 1000 s interval), so it never sees the child: its time is in ``unsampled``."""
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import subprocess, sys, time\nsys.stdin.readline()\n"
            f"subprocess.run([sys.executable, '-c', {BURN!r}])\nprint('done', flush=True)\ntime.sleep(60)",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        meter = bench.CpuMeter([parent.pid], None, interval=1000.0)
        meter.start()
        assert parent.stdin is not None and parent.stdout is not None
        parent.stdin.write("go\n")
        parent.stdin.flush()
        assert parent.stdout.readline().strip() == "done"
        used = meter.stop()
    finally:
        parent.kill()
        parent.wait()
    assert used["unsampled"] >= 0.25 and used["worker"] == 0.0
    table = bench.cpu_table({1: [used], 2: [used]}, 1, 2)
    assert "| unsampled |" in table
