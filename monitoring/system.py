"""Readings of the machine: CPU, RAM and disk from psutil, GPUs from NVML.

No GPU is a normal state (CPU-only boxes, CI): NVML failing to load is reported as
``gpu_state = "no GPU: <reason>"`` and an empty list, never as an error.
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from typing import Any

import psutil
from pydantic import BaseModel


class GpuInfo(BaseModel):
    index: int
    name: str
    utilization_percent: float | None = None
    memory_used_bytes: int
    memory_total_bytes: int
    temperature_c: float | None = None
    power_w: float | None = None
    power_limit_w: float | None = None


class SystemInfo(BaseModel):
    cpu_percent: float
    cpu_count: int
    load_avg: list[float]
    ram_used_bytes: int
    ram_total_bytes: int
    ram_percent: float
    disk_path: str
    disk_used_bytes: int
    disk_free_bytes: int
    disk_total_bytes: int
    disk_percent: float
    gpus: list[GpuInfo]
    gpu_state: str  # "ok: N GPU(s)" or "no GPU: <reason>"


def _optional(fn: Any, *args: Any) -> Any:
    """One NVML reading that a GPU may not support (power on some boards): None instead of an error."""
    import pynvml

    try:
        return fn(*args)
    except pynvml.NVMLError:
        return None


class Gpus:
    """NVML, initialised once per server and shut down with it; ``read`` is safe from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ok = False
        self.state = "no GPU: not probed"

    def start(self) -> None:
        try:
            import pynvml

            pynvml.nvmlInit()
            count = pynvml.nvmlDeviceGetCount()
        except ImportError as e:
            self.state = f"no GPU: nvidia-ml-py is not installed ({e})"
            return
        except Exception as e:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...: a CPU-only machine
            self.state = f"no GPU: {type(e).__name__}: {e}"
            return
        self._ok = True
        self.state = f"ok: {count} GPU(s)" if count else "no GPU: NVML found no device"

    def stop(self) -> None:
        if self._ok:
            import pynvml

            with contextlib.suppress(pynvml.NVMLError):
                pynvml.nvmlShutdown()
            self._ok = False

    def read(self) -> list[GpuInfo]:
        if not self._ok:
            return []
        import pynvml

        out = []
        with self._lock:
            try:
                for i in range(pynvml.nvmlDeviceGetCount()):
                    h = pynvml.nvmlDeviceGetHandleByIndex(i)
                    name = pynvml.nvmlDeviceGetName(h)
                    mem = pynvml.nvmlDeviceGetMemoryInfo(h)
                    util = _optional(pynvml.nvmlDeviceGetUtilizationRates, h)
                    temp = _optional(pynvml.nvmlDeviceGetTemperature, h, pynvml.NVML_TEMPERATURE_GPU)
                    power = _optional(pynvml.nvmlDeviceGetPowerUsage, h)
                    limit = _optional(pynvml.nvmlDeviceGetEnforcedPowerLimit, h)
                    out.append(
                        GpuInfo(
                            index=i,
                            name=name.decode() if isinstance(name, bytes) else str(name),
                            utilization_percent=float(util.gpu) if util is not None else None,
                            memory_used_bytes=int(mem.used),
                            memory_total_bytes=int(mem.total),
                            temperature_c=float(temp) if temp is not None else None,
                            power_w=power / 1000.0 if power is not None else None,
                            power_limit_w=limit / 1000.0 if limit is not None else None,
                        )
                    )
            except pynvml.NVMLError as e:  # a GPU fell off the bus: say so, keep serving
                self.state = f"GPU error: {e}"
        return out


def prime_cpu_percent() -> None:
    """psutil's non-blocking cpu_percent measures since the previous call; the first returns 0.0."""
    psutil.cpu_percent(interval=None)


def read_system(disk_path: Path, gpus: Gpus) -> SystemInfo:
    vm = psutil.virtual_memory()
    du = psutil.disk_usage(str(disk_path))
    try:
        load = [round(x, 2) for x in psutil.getloadavg()]
    except (AttributeError, OSError):
        load = []
    gpu_list = gpus.read()
    return SystemInfo(
        cpu_percent=psutil.cpu_percent(interval=None),
        cpu_count=psutil.cpu_count() or 0,
        load_avg=load,
        ram_used_bytes=vm.total - vm.available,
        ram_total_bytes=vm.total,
        ram_percent=vm.percent,
        disk_path=str(disk_path),
        disk_used_bytes=du.used,
        disk_free_bytes=du.free,
        disk_total_bytes=du.total,
        disk_percent=du.percent,
        gpus=gpu_list,
        gpu_state=gpus.state,
    )
