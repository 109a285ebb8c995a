"""Events of the hybrid engine; they go through core/train.py's ``emit`` callback beside its own.

Steps are ``core.events.StepEvent``s, which carry the engine phase and the share of the step's examples skipped.
``CorrectionEvent``: one re-measurement of skipped examples; ``CurveEvent``: the curve model after an evaluation
(predicted final validation loss, the step it expects to stop at); ``RollbackEvent``: a divergence-monitor restore.
``as_record()`` gives the metrics-log line.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class CorrectionEvent:
    step: int
    examples: int  # skipped examples re-measured (forward only)
    mean_before: float  # their mean loss as the table had it
    mean_after: float  # re-measured
    came_back: int  # whose loss rose by more than rise_tol: trained at their next turn
    forget_rate: float  # the predictor's recalibrated growth of a skipped example's loss, per step
    cost_s: float

    def as_record(self) -> dict[str, Any]:
        return {"kind": "hybrid_correction", **asdict(self)}


@dataclass(frozen=True)
class CurveEvent:
    step: int
    val_loss: float
    predicted_final: float | None  # the curve's loss at the expected stop (before the decay's own gain)
    stop_step: int | None  # where the engine expects to stop (decay start + its length)
    decay_start: int | None  # set once the decay has started
    keep_share: float  # the bandit's arm for the next interval
    # the fitted curve, sampled: [step, predicted val loss] from the first fitted evaluation to the expected stop
    # (the dashboard's "predicted" line); empty before the first fit
    curve: tuple[tuple[int, float], ...] = ()

    def as_record(self) -> dict[str, Any]:
        return {"kind": "hybrid_curve", **asdict(self)}


@dataclass(frozen=True)
class RollbackEvent:
    step: int
    reason: str  # remeasured_rise, val_rise, not_finite
    restored_step: int  # the step whose weights and optimizer state were restored

    def as_record(self) -> dict[str, Any]:
        return {"kind": "hybrid_rollback", **asdict(self)}


HybridEvent = CorrectionEvent | CurveEvent | RollbackEvent
