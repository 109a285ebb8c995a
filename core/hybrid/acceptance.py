"""The probe-verification rule: does a jump help, and how many plain steps is it worth?

A jump is judged on a small fixed probe set (training examples, never the validation set): the
probe loss before the jump and after it. The gain is converted into *earned steps* with the
measured progress rate of plain training (probe-loss decrease per real step, ``rate``): a jump
that lowers the probe loss as much as 12 plain steps would have earned 12 steps, whatever horizon
it claimed. Earned steps are capped at the horizon (the jump may not claim more than it predicted).
When the measured rate is not positive (a plateau, or probe noise) a gain cannot be valued and the
jump is rejected: an earlier rule that let any gain earn the whole horizon advanced the schedule
by 20 steps for a 1e-4 gain in the benchmark and cost 3% final loss.

Accepted: the probe loss is finite and lower by more than ``min_rel_gain`` (relative), and the
jump's net value is at least ``min_earned`` steps. Otherwise the caller rolls back.
The net value of an attempt (for the bandit and the fallback) is ``earned - cost`` in step units,
where ``cost`` is the attempt's overhead (probes, snapshot, prediction) divided by a plain step's time.
A jump must pay for its own probes: one that earned less than it cost changes the trajectory for nothing,
and a changed trajectory can end far from plain's (in the CPU benchmark one jump worth 2 steps, against about
1.4 steps of probes, was followed by a final loss 2.1% worse than plain's, above all of five plain runs from
the same weights in other data orders, 0.6961-0.7372).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Verdict:
    accepted: bool
    gain: float  # probe loss before - after (positive is better)
    earned_steps: float  # plain steps the gain is worth (0 when rejected)
    net_steps: float  # earned - cost: what the attempt saved (negative: it lost time)
    reason: str  # accepted, not_finite, no_gain, no_rate, too_small


def judge(
    loss_before: float,
    loss_after: float,
    rate: float,
    horizon: float,
    cost_steps: float,
    min_rel_gain: float = 1e-3,
    min_earned: float = 1.0,
) -> Verdict:
    """Verdict on one jump (see the module docstring)."""
    if not math.isfinite(loss_after) or not math.isfinite(loss_before):
        return Verdict(False, float("nan"), 0.0, -cost_steps, "not_finite")
    gain = loss_before - loss_after
    if gain <= min_rel_gain * abs(loss_before):
        return Verdict(False, gain, 0.0, -cost_steps, "no_gain")
    if rate <= 0:  # no measured plain progress to value the gain against: never advance on a guess
        return Verdict(False, gain, 0.0, -cost_steps, "no_rate")
    earned = min(horizon, gain / rate)
    if earned - cost_steps < min_earned:
        return Verdict(False, gain, 0.0, -cost_steps, "too_small")
    return Verdict(True, gain, earned, earned - cost_steps, "accepted")


class ProgressRate:
    """Probe-loss decrease per real step, from probe losses measured between stretches of plain steps.

    ``observe(loss_start, loss_end, steps)``: the probe loss went from ``loss_start`` to ``loss_end``
    over ``steps`` real steps with no jump in between. An exponential moving average keeps it
    current as training slows down.
    """

    def __init__(self, smoothing: float = 0.5) -> None:
        self.smoothing = smoothing
        self.value: float | None = None

    def observe(self, loss_start: float, loss_end: float, steps: int) -> None:
        if steps <= 0 or not (math.isfinite(loss_start) and math.isfinite(loss_end)):
            return
        r = (loss_start - loss_end) / steps
        self.value = r if self.value is None else self.smoothing * self.value + (1 - self.smoothing) * r

    def state_dict(self) -> dict[str, float | None]:
        return {"smoothing": self.smoothing, "value": self.value}

    def load_state_dict(self, state: dict[str, float | None]) -> None:
        self.smoothing = float(state["smoothing"] or 0.0)
        self.value = state["value"]
