"""``runs/job-N/energy.jsonl``: one line per worker run, what its GPUs drew while it trained (issue 19).

Written by the worker (``core/energy.py`` reads NVML's energy counter at the start and the end of the
training loop), read by the job report, which sums the runs of a job into kWh, GPU-hours and, with
``[report]`` prices, what the job cost. One line per run, appended: a resumed job's runs add up. A run
without a GPU still writes its line (``joules`` None) so the report can say why there is no figure.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

ENERGY_LOG = "energy.jsonl"


@dataclass(frozen=True)
class EnergyRecord:
    time: float  # when the run's training loop ended
    seconds: float  # the training loop's wall-clock
    device: str  # "cuda" or "cpu"
    gpus: int  # GPUs measured (0 on the CPU)
    joules: float | None  # drawn by those GPUs over ``seconds``; None: not measured (no GPU, no counter)


def append(run_dir: Path, record: EnergyRecord) -> None:
    """One line, flushed and fsynced: a run killed later keeps what it recorded."""
    with open(Path(run_dir) / ENERGY_LOG, "a", encoding="utf-8") as f:
        f.write(json.dumps(asdict(record)) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read(run_dir: Path) -> list[EnergyRecord]:
    """Every complete line; a torn last line (a kill mid-write) is skipped."""
    try:
        text = (Path(run_dir) / ENERGY_LOG).read_text(encoding="utf-8")
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        try:
            out.append(EnergyRecord(**json.loads(line)))
        except (ValueError, TypeError):
            continue
    return out
