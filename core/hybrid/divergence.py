"""The divergence monitor: says when the engine must restore its last good point.

Triggers, checked on every real step (``observe``) and on every jump (``check_prediction``):
- ``not_finite``: loss or gradient norm NaN/Inf;
- ``loss_spike``: loss above ``spike_factor`` x its running mean and above mean + ``spike_sigmas`` std;
- ``grad_spike``: the same for the gradient norm (``grad_spike_factor``);
- ``prediction_error``: a jump's probe loss worse than before by more than ``prediction_tol`` (relative).
Spike checks start after ``warmup`` observations (the statistics need a few values). Values that
triggered are not folded into the statistics.
"""

from __future__ import annotations

import math
from typing import Any


class RunningStat:
    """Exponentially weighted mean and variance."""

    def __init__(self, decay: float = 0.9) -> None:
        self.decay = decay
        self.mean = 0.0
        self.var = 0.0
        self.count = 0

    def add(self, x: float) -> None:
        if self.count == 0:
            self.mean, self.var = x, 0.0
        else:
            d = x - self.mean
            self.mean += (1 - self.decay) * d
            self.var = self.decay * (self.var + (1 - self.decay) * d * d)
        self.count += 1

    @property
    def std(self) -> float:
        return math.sqrt(max(self.var, 0.0))


class DivergenceMonitor:
    def __init__(
        self,
        spike_factor: float = 2.0,
        spike_sigmas: float = 6.0,
        grad_spike_factor: float = 10.0,
        prediction_tol: float = 0.05,
        warmup: int = 10,
    ) -> None:
        self.spike_factor, self.spike_sigmas = spike_factor, spike_sigmas
        self.grad_spike_factor, self.prediction_tol, self.warmup = grad_spike_factor, prediction_tol, warmup
        self.loss = RunningStat()
        self.grad = RunningStat()
        self.triggers: dict[str, int] = {}

    def observe(self, loss: float, grad_norm: float) -> str | None:
        """The trigger this step sets off, or None (then the step's values join the statistics)."""
        reason = self._check(loss, grad_norm)
        if reason is None:
            self.loss.add(loss)
            self.grad.add(grad_norm)
        else:
            self.triggers[reason] = self.triggers.get(reason, 0) + 1
        return reason

    def _check(self, loss: float, grad_norm: float) -> str | None:
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return "not_finite"
        if self.loss.count < self.warmup:
            return None
        if loss > self.spike_factor * self.loss.mean and loss > self.loss.mean + self.spike_sigmas * self.loss.std:
            return "loss_spike"
        if (
            grad_norm > self.grad_spike_factor * self.grad.mean
            and grad_norm > self.grad.mean + self.spike_sigmas * self.grad.std
        ):
            return "grad_spike"
        return None

    def check_prediction(self, probe_before: float, probe_after: float) -> str | None:
        if not math.isfinite(probe_after):
            reason = "not_finite"
        elif probe_after > probe_before * (1 + self.prediction_tol):
            reason = "prediction_error"
        else:
            return None
        self.triggers[reason] = self.triggers.get(reason, 0) + 1
        return reason

    def state_dict(self) -> dict[str, Any]:
        return {
            "loss": vars(self.loss).copy(),
            "grad": vars(self.grad).copy(),
            "triggers": dict(self.triggers),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for stat, saved in ((self.loss, state["loss"]), (self.grad, state["grad"])):
            stat.decay, stat.mean, stat.var, stat.count = saved["decay"], saved["mean"], saved["var"], saved["count"]
        self.triggers = dict(state["triggers"])
