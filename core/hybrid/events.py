"""Events of the hybrid engine, shaped to go through core/train.py's ``emit`` callback later.

``HybridStepEvent`` has every field of ``core.train.StepEvent`` plus the engine's: the phase, whether
the step was predicted (a jump: ``advanced`` schedule steps with no backward pass), and running
counters. ``JumpEvent`` is the accept/rollback history, one per attempt; ``RollbackEvent`` a
divergence-monitor restore. ``as_record()`` gives the metrics-log line.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class HybridStepEvent:
    step: int  # schedule steps done (real + advanced by accepted jumps)
    total_steps: int
    loss: float  # train loss of a real step; the probe loss after the jump for a predicted one
    lr: float
    grad_norm: float  # 0.0 for a predicted step (no gradient was computed)
    tokens: int
    tokens_per_s: float
    epoch: float
    elapsed: float
    phase: str  # warmup, full, predict, plain (the phase the step ran in)
    predicted: bool  # True: a jump, no backward pass
    advanced: int  # schedule steps this event covers (1 for a real step)
    real_steps: int  # real optimizer steps so far
    backward_skipped: int  # backward passes skipped so far (advanced steps x grad_accum)
    est_saved_s: float  # estimated seconds saved so far (earned steps x step time - overhead)

    def as_record(self) -> dict[str, Any]:
        return {"kind": "train", **asdict(self)}


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
        return {"kind": "jump", **asdict(self)}


@dataclass(frozen=True)
class RollbackEvent:
    step: int
    reason: str  # not_finite, loss_spike, grad_spike
    restored_real_step: int  # the real step count of the restored point

    def as_record(self) -> dict[str, Any]:
        return {"kind": "rollback", **asdict(self)}


HybridEvent = HybridStepEvent | JumpEvent | RollbackEvent
