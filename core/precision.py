"""The numeric format of a training step: which autocast dtype, and under fp16 the gradient scaler.

bf16 needs nothing beyond autocast. fp16 (a GPU without bf16, or ``precision = "fp16"``) flushes small
gradients to zero unless the loss is scaled up before backward, so ``Precision`` owns a
``torch.amp.GradScaler`` and the one rule it imposes on the loop: once the scaler unscaled a step's gradients,
that step must end through it (``end_step``) whatever became of it, or the next step's unscale refuses to run.
A finite loss with non-finite gradients is then the scale's fault (``overflowed``), not the model's.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch

from core import sharding
from trainbox.config import TrainingConfig


def autocast_dtype(precision: str, device_type: str, bf16_supported: bool) -> torch.dtype | None:
    """The autocast dtype (None: fp32). auto: bf16 on a GPU that has it; fp16 on one that does not (before
    Ampere), where a gradient scaler keeps small gradients from flushing to zero; fp32 on the CPU, where
    half precision is slower. An explicit fp16 is honoured anywhere (the CPU too: it tests the scaler path)."""
    if precision == "fp16":
        return torch.float16
    if device_type != "cuda" or precision == "fp32":
        return None
    if bf16_supported:
        return torch.bfloat16
    return torch.float16 if precision == "auto" else None  # bf16 asked where missing: preflight refuses


def amp_dtype(cfg: TrainingConfig, device: torch.device) -> torch.dtype | None:
    bf16_supported = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return autocast_dtype(cfg.precision, device.type, bf16_supported)


def weights_finite(model: Any) -> bool:
    """Whether every weight this process holds is finite (sharded: its shards only; the ranks agree through
    core.distributed). One device sync for the whole model, not one per tensor."""
    flags = [torch.isfinite(sharding.local(p)).all() for p in model.parameters()]
    return bool(torch.stack(flags).all()) if flags else True


class Precision:
    """Autocast and, under fp16, the loss scaling around one training step."""

    def __init__(self, cfg: TrainingConfig, device: torch.device) -> None:
        self.device_type = device.type
        self.dtype = amp_dtype(cfg, device)
        self.scaler = self._new_scaler()
        self._unscaled = False  # the scaler unscaled this step's gradients and awaits its update

    @property
    def bf16(self) -> bool:
        return self.dtype == torch.bfloat16

    @property
    def half(self) -> bool:
        """16-bit activations (the memory estimate)."""
        return self.dtype is not None

    def _new_scaler(self) -> torch.amp.GradScaler | None:
        """fp16 only: the loss is scaled up before backward so small gradients survive in fp16, and a step
        whose gradients overflowed is run again at a halved scale."""
        return torch.amp.GradScaler(self.device_type) if self.dtype == torch.float16 else None

    def reset(self) -> None:
        """A fresh scale (a rollback to step 0, where no checkpoint holds one)."""
        self.scaler = self._new_scaler()

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.dtype is not None:
            return torch.autocast(device_type=self.device_type, dtype=self.dtype)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """The true gradients, before clipping and the norm."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
            self._unscaled = True

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Apply the update (the gradients are finite); True when the scaler took it, which ends a run of
        overflows."""
        if self.scaler is None:
            optimizer.step()
            return False
        self.scaler.step(optimizer)
        self.end_step()
        return True

    def end_step(self) -> None:
        """End the scaler's step (it adjusts the scale) once its gradients were unscaled, whatever became of
        the step: the next step's unscale_ refuses to run before it."""
        if self.scaler is not None and self._unscaled:
            self.scaler.update()
            self._unscaled = False

    def overflowed(self, loss: float, norm: float) -> bool:
        """fp16: a finite loss with non-finite gradients is the scale's fault, not the model's; the scaler
        halves it here (how many in a row still count as overflows is core.recovery's call)."""
        if self.scaler is None or not math.isfinite(loss) or math.isfinite(norm):
            return False
        self.end_step()
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"scaler": self.scaler.state_dict()} if self.scaler is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
