"""The energy a run's GPUs drew: NVML's cumulative energy counter (``nvmlDeviceGetTotalEnergyConsumption``,
millijoules since the driver loaded, Volta and newer) read before and after the training loop, over
every GPU this process can see (the daemon sets ``CUDA_VISIBLE_DEVICES`` to the job's GPUs, so under
torchrun rank 0 measures the whole job on its host). A counter beats sampling power: nothing runs
beside the loop and no spike between samples is missed. Without a GPU, NVML or the counter, the
reading is None and the job goes on: energy is for the report, never a reason to fail.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from trainbox.energy_log import EnergyRecord, append

log = logging.getLogger("core.worker")


def _handles() -> list[Any] | None:
    """NVML handles of the GPUs torch sees, matched by UUID (NVML's indices ignore CUDA_VISIBLE_DEVICES)."""
    if not torch.cuda.is_available():
        return None
    try:
        import pynvml

        pynvml.nvmlInit()
        handles = []
        for i in range(torch.cuda.device_count()):
            uuid = str(torch.cuda.get_device_properties(i).uuid)
            handles.append(pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"))
        return handles
    except Exception as e:  # boundary: NVML missing, too old a GPU, a UUID it does not know
        log.info("GPU energy not measured: %s", e)
        return None


def _millijoules(handles: list[Any]) -> int | None:
    try:
        import pynvml

        return sum(int(pynvml.nvmlDeviceGetTotalEnergyConsumption(h)) for h in handles)
    except Exception as e:  # boundary: the counter is optional
        log.info("GPU energy counter unreadable: %s", e)
        return None


class EnergyMeter:
    """``start`` before the loop, ``stop`` after it (in a ``finally``): one ``energy.jsonl`` line per run."""

    def __init__(self, run_dir: Path, device: torch.device, enabled: bool = True) -> None:
        self.run_dir, self.device, self.enabled = run_dir, device, enabled
        self.handles = _handles() if enabled and device.type == "cuda" else None
        self.t0 = time.perf_counter()
        self.mj0 = _millijoules(self.handles) if self.handles else None

    def stop(self) -> EnergyRecord | None:
        if not self.enabled:
            return None
        mj1 = _millijoules(self.handles) if self.handles else None
        joules = (mj1 - self.mj0) / 1000 if mj1 is not None and self.mj0 is not None else None
        record = EnergyRecord(
            time.time(), time.perf_counter() - self.t0, self.device.type, len(self.handles or []), joules
        )
        try:
            append(self.run_dir, record)
        except OSError as e:  # a full disk is handled by the loop's own checks; this line is optional
            log.warning("could not record the run's energy: %s", e)
        return record
