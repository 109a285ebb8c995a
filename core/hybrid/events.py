"""Events of the hybrid engine; they go through core/train.py's ``emit`` callback beside its own.

Steps (real and predicted) are ``core.events.StepEvent``s, which carry the engine phase, whether the
step was predicted and the running counters. ``JumpEvent`` is the accept/rollback history, one per
attempt; ``RollbackEvent`` a divergence-monitor restore. ``as_record()`` gives the metrics-log line.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class JumpEvent:
    step: int  # schedule step after the verdict
    real_steps: int
    horizon: float
    scale: float
    probe_before: float
    probe_after: float
    accepted: bool
    reason: str  # accepted, not_finite, no_gain, no_rate, too_small, prediction_error
    earned_steps: float
    advanced: int
    net_steps: float
    cost_s: float  # probes + prediction + restore

    def as_record(self) -> dict[str, Any]:
        return {"kind": "hybrid_jump", **asdict(self)}


@dataclass(frozen=True)
class RollbackEvent:
    step: int
    reason: str  # not_finite, loss_spike, grad_spike
    restored_real_step: int  # the real step count of the restored point

    def as_record(self) -> dict[str, Any]:
        return {"kind": "hybrid_rollback", **asdict(self)}


HybridEvent = JumpEvent | RollbackEvent
