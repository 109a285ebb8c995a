"""The engine's phase state machine: warmup -> full -> predict <-> correct, with a full-step fallback (plain).

- ``warmup``: full steps, every example trained; losses recorded (the learning rate is still warming up).
- ``full``: full steps; the loss table fills and the validation curve gathers points. After ``full_steps`` and
  once the engine says it may (the table covers enough examples), ``predict``.
- ``predict``: examples predicted learned skip their passes. Every ``correct_every`` steps, ``correct``.
- ``correct``: an action at a step boundary, not a step: re-measure a sample of the skipped examples (forward
  only), then back to ``predict``.
- ``plain``: the divergence monitor rolled back: full steps for ``cooldown`` steps (doubling on each rollback up
  to ``max_cooldown``), then ``full`` again.
The machine is bookkeeping only: the engine does the work and tells it what happened.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
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
    correct_every: int = 20
    cooldown: int = 50
    max_cooldown: int = 640
    phase: Phase = Phase.WARMUP
    steps_in_phase: int = 0  # steps since entering the phase (predict: since the last correction)
    current_cooldown: int = 0  # length of the plain stretch in progress (0: none yet)
    fallbacks: int = 0

    def __post_init__(self) -> None:
        self.phase = Phase(self.phase)
        if self.phase == Phase.WARMUP and self.warmup_steps <= 0:
            self.phase = Phase.FULL

    @property
    def skipping(self) -> bool:
        """Whether the next step may skip examples."""
        return self.phase == Phase.PREDICT

    def on_step(self, may_predict: bool) -> Phase:
        """A training step finished; returns the phase of the next action. ``may_predict``: whether skipping may
        start (the loss table covers enough examples)."""
        if self.phase == Phase.CORRECT:
            raise RuntimeError("a step in phase correct: the correction comes first")
        self.steps_in_phase += 1
        limit = {Phase.WARMUP: self.warmup_steps, Phase.PLAIN: self.current_cooldown}.get(self.phase)
        if limit is not None and self.steps_in_phase >= limit:
            self._enter(Phase.FULL)
        elif self.phase == Phase.FULL and self.steps_in_phase >= self.full_steps and may_predict:
            self._enter(Phase.PREDICT)
        elif self.phase == Phase.PREDICT and self.steps_in_phase >= self.correct_every:
            self._enter(Phase.CORRECT)
        return self.phase

    def on_corrected(self) -> Phase:
        if self.phase != Phase.CORRECT:
            raise RuntimeError(f"a correction in phase {self.phase}")
        self._enter(Phase.PREDICT)
        return self.phase

    def fall_back(self) -> Phase:
        """Full steps for a cooldown (after a divergence rollback); the cooldown doubles each time."""
        self.fallbacks += 1
        self.current_cooldown = (
            self.cooldown if self.current_cooldown == 0 else min(2 * self.current_cooldown, self.max_cooldown)
        )
        self._enter(Phase.PLAIN)
        return self.phase

    def restart(self) -> Phase:
        """The Trainer rolled back (a NaN, a checkpoint): skipping resumes only after full steps again."""
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
            setattr(self, k, Phase(v) if k == "phase" else v)
