"""The worker process's set-up: the stop flag its signal handlers set, CPU threads, the device, and which
settings a resumed run takes from its checkpoint rather than from job.json."""

from __future__ import annotations

import logging
import os
import signal
import threading
from types import FrameType
from typing import Any

import torch

from core.distributed import Dist
from trainbox.config import TrainingConfig

log = logging.getLogger("core.worker")

# Settings that may differ between the run that wrote a checkpoint and the one resuming it: how the
# machine runs and reports, not what is trained. Every other key comes from the checkpoint.
RUNTIME_KEYS = (
    "threads",
    "device",
    "precision",
    "log_every",
    "eval_every",
    "checkpoint_every",
    "keep_checkpoints",
    "disk_margin_mb",
    "gradient_checkpointing",  # the same numbers, less memory
    "nproc",  # the global batch is split across processes: the same run with any number of them
    "nnodes",  # ... and across hosts
    "rdzv_endpoint",
    "sharding",  # the same numbers and checkpoint format sharded or not (core.sharding)
)


class StopFlag:
    """Set by SIGTERM/SIGINT; the handler does nothing else (no I/O, no locks)."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()


class AgreedStop:
    """The loop's ``should_stop``: every rank stops at the same step boundary, so a stop requested on any rank
    (SIGTERM reaches each through the torchrun agent) is every rank's."""

    def __init__(self, flag: StopFlag, ranks: Dist) -> None:
        self.flag, self.ranks = flag, ranks

    def __call__(self) -> bool:
        return self.ranks.any_flag(self.flag.is_set())


def thread_count(configured: int) -> int:
    """``training.threads``; 0 means $OMP_NUM_THREADS when set, else half the cores."""
    if configured > 0:
        return configured
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, (os.cpu_count() or 2) // 2)


def use_threads(cfg: TrainingConfig) -> int:
    """Set torch's CPU threads for this process; returns how many."""
    threads = thread_count(cfg.threads)
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)  # tiny models hit denormals; without this CPU steps crawl
    return threads


def pick_device(cfg: TrainingConfig) -> torch.device:
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def describe_device(device: torch.device, threads: int) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.current_device()} ({torch.cuda.get_device_name()})"
    return f"cpu ({threads} thread{'s' if threads != 1 else ''})"


def resolve_config(spec_cfg: TrainingConfig, saved: dict[str, Any] | None) -> TrainingConfig:
    """A resumed run trains with its checkpoint's settings (exact continuation), except runtime keys."""
    if saved is None:
        return spec_cfg
    saved_cfg = TrainingConfig.model_validate(saved)
    cfg = saved_cfg.model_copy(update={k: getattr(spec_cfg, k) for k in RUNTIME_KEYS})
    changed = [
        k
        for k in TrainingConfig.model_fields
        if getattr(cfg, k) != getattr(spec_cfg, k) and not (k == "learning_rate" and spec_cfg.learning_rate == 0)
    ]
    if changed:
        log.warning("resuming with the checkpoint's settings; job.json differs in: %s", ", ".join(changed))
    return cfg
