"""The engine's phase state machine: warmup -> full -> predict -> correct -> full ..., with a plain fallback.

- ``warmup``: real steps only, nothing fitted (early weights move erratically); ``warmup_steps`` long.
- ``full``: real steps; the engine snapshots the weights (the trajectory the predictor fits).
  After ``full_steps`` real steps since the last attempt, and once the engine says it may (the
  predictor has enough snapshots and the overhead budget has room), the next action is a jump.
- ``predict``: one jump: extrapolate the weights ``H`` steps ahead (no forward or backward pass
  except the probe).
- ``correct``: the probe verdict: accept (keep the weights, advance) or roll back.
- ``plain``: predicting stopped paying (``fallback_after`` consecutive rejections, or the last
  ``fallback_after`` attempts lost time on balance) or the divergence monitor fired: plain steps
  with no overhead for ``cooldown`` steps, which doubles on each fallback up to ``max_cooldown``;
  then ``full`` again. A net-positive attempt resets the cooldown.
The machine is pure bookkeeping: the engine does the work and tells it what happened.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any


class Phase(StrEnum):
    WARMUP = "warmup"
    FULL = "full"
    PREDICT = "predict"
    CORRECT = "correct"
    PLAIN = "plain"


@dataclass
class PhaseMachine:
    warmup_steps: int = 20
    full_steps: int = 10
    fallback_after: int = 3
    cooldown: int = 40
    max_cooldown: int = 640
    phase: Phase = Phase.WARMUP
    steps_in_phase: int = 0  # real steps since entering the phase (full: since the last attempt)
    consecutive_rejects: int = 0
    recent_net: list[float] = field(default_factory=list)  # net steps of the last attempts
    current_cooldown: int = 0  # length of the plain stretch in progress (0: none yet)
    fallbacks: int = 0

    def __post_init__(self) -> None:
        self.phase = Phase(self.phase)
        if self.phase == Phase.WARMUP and self.warmup_steps <= 0:
            self.phase = Phase.FULL

    @property
    def snapshotting(self) -> bool:
        """Whether real steps in this phase feed the predictor."""
        return self.phase == Phase.FULL

    def on_real_step(self, predictor_ready: bool) -> Phase:
        """A real (forward + backward) step finished; returns the phase of the next action. ``predictor_ready``:
        whether a jump may be attempted now (enough snapshots, and room in the overhead budget)."""
        if self.phase in (Phase.PREDICT, Phase.CORRECT):
            raise RuntimeError(f"a real step in phase {self.phase}")
        self.steps_in_phase += 1
        limit = {Phase.WARMUP: self.warmup_steps, Phase.PLAIN: self.current_cooldown}.get(self.phase)
        if limit is not None and self.steps_in_phase >= limit:
            self._enter(Phase.FULL)
        elif self.phase == Phase.FULL and self.steps_in_phase >= self.full_steps and predictor_ready:
            self._enter(Phase.PREDICT)
        return self.phase

    def on_jump(self) -> Phase:
        if self.phase != Phase.PREDICT:
            raise RuntimeError(f"a jump in phase {self.phase}")
        self._enter(Phase.CORRECT)
        return self.phase

    def on_verdict(self, accepted: bool, net_steps: float) -> Phase:
        if self.phase != Phase.CORRECT:
            raise RuntimeError(f"a verdict in phase {self.phase}")
        self.consecutive_rejects = 0 if accepted else self.consecutive_rejects + 1
        self.recent_net = [*self.recent_net, net_steps][-self.fallback_after :]
        if net_steps > 0:
            self.current_cooldown = 0
        losing = len(self.recent_net) >= self.fallback_after and sum(self.recent_net) < 0
        if self.consecutive_rejects >= self.fallback_after or losing:
            self.fall_back()
        else:
            self._enter(Phase.FULL)
        return self.phase

    def fall_back(self) -> Phase:
        """Plain steps for a cooldown (also called by the engine after a divergence rollback)."""
        self.fallbacks += 1
        self.consecutive_rejects = 0
        self.recent_net = []
        self.current_cooldown = (
            self.cooldown if self.current_cooldown == 0 else min(2 * self.current_cooldown, self.max_cooldown)
        )
        self._enter(Phase.PLAIN)
        return self.phase

    def restart(self) -> Phase:
        """A rollback outside the engine broke the trajectory: a pending jump becomes full steps again."""
        if self.phase in (Phase.PREDICT, Phase.CORRECT):
            self._enter(Phase.FULL)
        return self.phase

    def _enter(self, phase: Phase) -> None:
        self.phase = phase
        self.steps_in_phase = 0

    def state_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["phase"] = str(self.phase)
        return d

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, Phase(v) if k == "phase" else (list(v) if isinstance(v, list) else v))
