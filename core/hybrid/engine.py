"""``HybridEngine``: plain steps plus verified extrapolation jumps, driven by ``core.train.Trainer``.

The Trainer runs the loop and every real step (same batches, accumulation, clipping, AdamW, NaN
skips and rollbacks), so with no jump accepted the engine trains exactly like the plain loop. It
calls three hooks (``TrainerView`` is everything the engine uses of it):
- ``wants_jump()`` at a step boundary; if so, ``jump(emit)`` in place of the step: the extrapolated
  weights ``H`` real steps ahead are written into the model (no forward or backward pass but the
  probe), verified on the probe (one no-grad forward over ``probe_examples`` fixed training examples)
  before and after, and kept or rolled back (weights and AdamW state); an accepted jump tells the
  Trainer how many schedule steps it earned (``JumpEvent.advanced``, ``acceptance.py``);
- ``after_real_step(loss, grad_norm, dt, emit)`` after an applied step: a weight snapshot every
  ``snapshot_every`` real steps in phase full, phase transitions (``phases.py``), and, once a jump
  was accepted, the divergence monitor (loss and gradient-norm spikes restore the last good point;
  non-finite steps never get here: the Trainer skips them);
- ``reset_trajectory()`` after the Trainer rolled back (the snapshots no longer lead to the weights).
The bandit picks (H, scale) per attempt from the net steps saved. An attempt starts only while the engine's
overhead, that attempt's expected cost included, stays within ``max_overhead`` of the time in real steps: jumps
at a tuned lr have not paid in any measurement (docs/BENCHMARKS.md), so this bounds what the attempts can cost a
job. Outside the budget: one probe when the first trajectory starts (it also times an attempt) and the weight
snapshots (1.8 % on the SmolLM2 LoRA profile, where no attempt fitted in 100 steps).

Optional cheap alternative (off by default, measured in scripts/bench_hybrid.py):
- ``freeze``: AutoFreeze-style freezing of converged leading blocks (relative weight change over
  ``freeze_window`` real steps below ``freeze_threshold``), bottom-up, so backward stops early.

``state_dict()``/``load_state_dict()`` hold everything the engine learned (phase, snapshots,
bandit, monitor, progress rate, counters); the Trainer keeps it in its own state, so checkpoints,
pause/resume and crashes do not reset it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Protocol

import torch

from core.data import collate
from core.encode import Example
from core.hybrid.acceptance import ProgressRate, Verdict, judge
from core.hybrid.bandit import LinUCB
from core.hybrid.divergence import DivergenceMonitor
from core.hybrid.events import HybridEvent, JumpEvent, RollbackEvent
from core.hybrid.extrapolate import TrajectoryPredictor
from core.hybrid.phases import Phase, PhaseMachine
from trainbox.config import HybridConfig, TrainingConfig

STATE_VERSION = 1
MAX_CONSECUTIVE_DIVERGENCES = 3  # restores in a row with no good step between: leave it to the Trainer


class StepCounter(Protocol):
    step: int


class TrainerView(Protocol):
    """What the engine uses of ``core.train.Trainer``: public attributes and one method, nothing private."""

    @property
    def model(self) -> torch.nn.Module: ...
    @property
    def optimizer(self) -> torch.optim.Optimizer: ...
    @property
    def device(self) -> torch.device: ...
    @property
    def pad_id(self) -> int: ...
    @property
    def cfg(self) -> TrainingConfig: ...
    @property
    def total_steps(self) -> int: ...
    @property
    def state(self) -> StepCounter: ...  # read only: the Trainer advances its own step

    def mean_loss(self, batches: Iterable[dict[str, torch.Tensor]]) -> float: ...


@dataclass
class Counters:
    real_steps: int = 0
    attempts: int = 0
    accepted: int = 0
    rolled_back: int = 0
    divergence_rollbacks: int = 0
    advanced_steps: int = 0  # schedule steps advanced by accepted jumps
    backward_skipped: int = 0
    real_step_s: float = 0.0  # time in real steps
    overhead_s: float = 0.0  # probes, snapshots, predictions, restores, freezing checks
    frozen: list[str] = field(default_factory=list)


class HybridEngine:
    def __init__(self, trainer: TrainerView, cfg: HybridConfig, probe: Sequence[Example]) -> None:
        self.trainer, self.cfg = trainer, cfg
        self.params = [p for p in trainer.model.parameters() if p.requires_grad]
        self.probe_batches = [
            collate(list(probe[i : i + trainer.cfg.batch_size]), trainer.pad_id)
            for i in range(0, min(len(probe), cfg.probe_examples), trainer.cfg.batch_size)
        ]
        self.machine = PhaseMachine(
            cfg.warmup_steps, cfg.full_steps, cfg.fallback_after, cfg.cooldown_steps, cfg.max_cooldown_steps
        )
        self.predictor = TrajectoryPredictor(cfg.history)
        self.bandit = LinUCB([(h, s) for h in cfg.horizons for s in cfg.scales], dim=3, alpha=cfg.bandit_alpha)
        self.monitor = DivergenceMonitor(spike_factor=cfg.spike_factor, prediction_tol=cfg.prediction_tol)
        self.rate = ProgressRate(cfg.rate_smoothing)
        self.counters = Counters()
        self.step_time: float | None = None  # EMA of a real step's seconds
        self.accept_ema = 0.5
        self.last_probe: tuple[float, int] | None = None  # (probe loss, real step) with only real steps since
        self.attempt_s: float | None = None  # expected seconds of one attempt (two probes, copies, restore)
        self._good: tuple[int, list[torch.Tensor], dict[int, dict[str, Any]]] | None = None
        self._freeze_ref: tuple[int, dict[str, list[torch.Tensor]]] | None = None
        self._divergences_in_row = 0
        self._traj_start = 0  # real step where the current trajectory (snapshot spacing) began

    # --- the hooks the Trainer calls ----------------------------------------------------------------

    @property
    def phase(self) -> str:
        return str(self.machine.phase)

    def wants_jump(self) -> bool:
        """Whether the next action at this step boundary is a jump instead of a real step."""
        return self.machine.phase == Phase.PREDICT

    def after_real_step(self, loss: float, grad_norm: float, dt: float, emit: Callable[[HybridEvent], None]) -> None:
        """An applied (finite) real step of ``dt`` seconds: snapshots, phase transitions, divergence checks."""
        c = self.counters
        reason = self.monitor.observe(loss, grad_norm)
        c.real_steps += 1
        c.real_step_s += dt
        if reason is not None and self._divergence_rollback(emit, reason):
            return
        self._divergences_in_row = 0
        self.step_time = dt if self.step_time is None else 0.9 * self.step_time + 0.1 * dt

        t1 = self.clock()
        if (c.real_steps - self._traj_start) % self.cfg.snapshot_every == 0:
            if c.accepted > 0:  # only then can a divergence roll back (until then the weights are plain's)
                self._save_good()  # kept recent, so a divergence never rolls back far
            if self.machine.snapshotting:
                self.predictor.add(c.real_steps, self.params)
        if self.cfg.freeze:
            self._maybe_freeze()
        before = self.machine.phase
        after = self.machine.on_real_step(self.predictor.ready(self.cfg.method) and self.within_budget())
        if before != Phase.FULL and after == Phase.FULL:  # a new trajectory starts here
            self.predictor.clear()
            self.predictor.add(c.real_steps, self.params)
            self._traj_start = c.real_steps
            if self.last_probe is None:
                t_probe = self.clock()
                self.last_probe = (self.probe_loss(), c.real_steps)  # the first point of the progress rate
                if self.attempt_s is None:  # an attempt runs the probe twice
                    self.attempt_s = 2 * (self.clock() - t_probe)
        c.overhead_s += self.clock() - t1

    def within_budget(self) -> bool:
        """Whether one more attempt keeps the engine's time within ``max_overhead`` of the real steps' time."""
        c = self.counters
        return c.overhead_s + (self.attempt_s or 0.0) <= self.cfg.max_overhead * c.real_step_s

    def jump(self, emit: Callable[[HybridEvent], None]) -> JumpEvent:
        """One verified jump (only when ``wants_jump()``); emits and returns its ``JumpEvent``. The caller
        advances its step counter by ``advanced`` (0 when rejected: weights and AdamW state restored)."""
        tr, c, cfg = self.trainer, self.counters, self.cfg
        step = tr.state.step
        t0 = self.clock()
        self.machine.on_jump()
        before = self.probe_loss()
        if self.last_probe is not None:
            self.rate.observe(self.last_probe[0], before, c.real_steps - self.last_probe[1])
        context = self._context()
        arm = self.bandit.choose(context)
        horizon, scale = self.bandit.arms[arm]
        self._save_good()
        predicted = self.predictor.predict(horizon, cfg.method, scale)
        with torch.no_grad():
            for p, new in zip(self.params, predicted, strict=True):
                p.copy_(new)
        after = self.probe_loss()
        step_time = self.step_time or 1.0
        cost_s = self.clock() - t0
        # a jump may claim at most its own horizon, or the snapshot window it averaged over (H = 0 is LAWA)
        cap = max(horizon * scale, cfg.snapshot_every * (cfg.history - 1))
        verdict = judge(
            before, after, self.rate.value or 0.0, cap, cost_s / step_time, cfg.min_rel_gain, cfg.min_earned
        )
        error = self.monitor.check_prediction(before, after)
        if error is not None and verdict.accepted:
            verdict = Verdict(False, verdict.gain, 0.0, verdict.net_steps - verdict.earned_steps, error)
        c.attempts += 1
        advanced = 0
        if verdict.accepted:
            c.accepted += 1
            if cfg.advance_schedule:
                advanced = min(int(verdict.earned_steps), tr.total_steps - step)
            c.advanced_steps += advanced
            c.backward_skipped += advanced * tr.cfg.grad_accum
            self.predictor.clear()
            self.predictor.add(c.real_steps, self.params)  # the new trajectory starts at the jump
            self._traj_start = c.real_steps
            self.last_probe = (after, c.real_steps)
            self._save_good()
        else:
            c.rolled_back += 1
            self._restore_good()
            self.last_probe = (before, c.real_steps)
        self.accept_ema = 0.7 * self.accept_ema + 0.3 * float(verdict.accepted)
        self.bandit.update(arm, context, verdict.net_steps / max(max(cfg.horizons) * max(cfg.scales), 1.0))
        self.machine.on_verdict(verdict.accepted, verdict.net_steps)
        cost_s = self.clock() - t0
        c.overhead_s += cost_s
        self.attempt_s = cost_s if self.attempt_s is None else 0.5 * (self.attempt_s + cost_s)
        event = JumpEvent(
            step + advanced,
            c.real_steps,
            horizon,
            scale,
            before,
            after,
            verdict.accepted,
            verdict.reason,
            verdict.earned_steps,
            advanced,
            verdict.net_steps,
            cost_s,
        )
        emit(event)
        return event

    def reset_trajectory(self) -> None:
        """The Trainer rolled back (to a checkpoint or the start): the snapshots and the last good point no
        longer lead to the weights, so a new trajectory starts; a pending jump waits for it."""
        self.predictor.clear()
        self._good = None
        self.last_probe = None
        self._traj_start = self.counters.real_steps
        self._divergences_in_row = 0
        self.machine.restart()

    def speedup_estimate(self) -> float | None:
        """Schedule steps done per second of engine time, over what plain steps alone would give: the
        plain-equivalent time (steps done x mean real step time) over the time spent (steps + overhead)."""
        c = self.counters
        if c.real_steps == 0 or c.real_step_s <= 0:
            return None
        step_s = c.real_step_s / c.real_steps
        return (c.real_steps + c.advanced_steps) * step_s / (c.real_step_s + c.overhead_s)

    def time_saved_s(self) -> float | None:
        """Seconds saved so far: the schedule steps jumps advanced, at the mean real step's time, less everything
        the engine spent (probes, copies, restores). Negative when it cost time, the usual case (BENCHMARKS.md)."""
        c = self.counters
        if c.real_steps == 0:
            return None
        return c.advanced_steps * c.real_step_s / c.real_steps - c.overhead_s

    def step_fields(self, phase: str, predicted: bool, advanced: int) -> dict[str, Any]:
        """The engine's fields of a ``StepEvent`` (core.events): the phase it ran in and the counters so far."""
        return {
            "phase": phase,
            "predicted": predicted,
            "advanced": advanced,
            "backward_skipped": self.counters.backward_skipped,
            "speedup_estimate": self.speedup_estimate(),
            "time_saved_s": self.time_saved_s(),
        }

    def summary(self) -> dict[str, Any]:
        """The engine's record of a run, for the job's DB event at its end."""
        c = self.counters
        return {
            "attempts": c.attempts,
            "accepted": c.accepted,
            "rolled_back": c.rolled_back,
            "divergence_rollbacks": c.divergence_rollbacks,
            "real_steps": c.real_steps,
            "advanced_steps": c.advanced_steps,
            "backward_skipped": c.backward_skipped,
            "overhead_s": round(c.overhead_s, 3),
            "time_saved_s": self.time_saved_s(),
            "speedup_estimate": self.speedup_estimate(),
        }

    # --- pieces -----------------------------------------------------------------------------------

    def clock(self) -> float:
        """Seconds, after the device finished its queued work: on a GPU the engine's copies and probes run
        asynchronously, and their time would otherwise land in the next real step's instead of the overhead."""
        if self.trainer.device.type == "cuda":
            torch.cuda.synchronize(self.trainer.device)
        return time.time()

    def probe_loss(self) -> float:
        """Mean loss per trained token on the fixed probe examples (no gradient)."""
        return self.trainer.mean_loss(self.probe_batches)

    def _context(self) -> list[float]:
        s = self.trainer.state
        return [1.0, s.step / max(self.trainer.total_steps, 1), self.accept_ema]

    def _save_good(self) -> None:
        """The last good point: trainable weights and the optimizer state (copies)."""
        opt_state = {
            i: {k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in st.items()}
            for i, p in enumerate(self.params)
            if (st := self.trainer.optimizer.state.get(p))
        }
        self._good = (self.counters.real_steps, [p.detach().clone() for p in self.params], opt_state)

    def _restore_good(self) -> None:
        assert self._good is not None
        _, weights, opt_state = self._good
        opt = self.trainer.optimizer
        with torch.no_grad():
            for i, (p, w) in enumerate(zip(self.params, weights, strict=True)):
                p.copy_(w)
                saved = opt_state.get(i)
                if saved is None:
                    opt.state.pop(p, None)
                    continue
                live = opt.state[p]
                for k, v in saved.items():
                    if torch.is_tensor(v) and torch.is_tensor(live.get(k)):
                        live[k].copy_(v)
                    else:
                        live[k] = v.clone() if torch.is_tensor(v) else v

    def _divergence_rollback(self, emit: Callable[[HybridEvent], None], reason: str) -> bool:
        """Restore the last good point after a spike; True when it did. Only once a jump was accepted:
        until then the weights are exactly plain training's, and a spike is the Trainer's business."""
        if self.counters.accepted == 0 or self._good is None:
            return False
        self._divergences_in_row += 1
        if self._divergences_in_row > MAX_CONSECUTIVE_DIVERGENCES:
            return False  # restoring does not help: carry on as plain training would
        self._restore_good()
        self.counters.divergence_rollbacks += 1
        self.predictor.clear()
        self._traj_start = self.counters.real_steps
        self.last_probe = None
        if self.machine.phase in (Phase.FULL, Phase.PLAIN):
            self.machine.fall_back()
        emit(RollbackEvent(self.trainer.state.step, reason, self._good[0]))
        return True

    def _maybe_freeze(self) -> None:
        """Freeze the leading block whose weights stopped moving (AutoFreeze), one block at a time."""
        c, cfg = self.counters, self.cfg
        if c.real_steps % cfg.freeze_window != 0:
            return
        blocks = self._blocks()
        current = {name: [p.detach().clone() for p in ps] for name, ps in blocks.items() if name not in c.frozen}
        ref = self._freeze_ref
        self._freeze_ref = (c.real_steps, current)
        if ref is None:
            return
        for name, ps in blocks.items():
            if name in c.frozen:
                continue
            old = ref[1].get(name)
            if old is None:
                return
            num = math.sqrt(sum(float((p.detach() - o).pow(2).sum()) for p, o in zip(ps, old, strict=True)))
            den = math.sqrt(sum(float(o.pow(2).sum()) for o in old)) or 1.0
            if num / den >= cfg.freeze_threshold:
                return  # only a prefix of blocks is frozen, so backward can stop early
            for p in ps:
                p.requires_grad_(False)
                p.grad = None
            c.frozen.append(name)
            return

    def _blocks(self) -> dict[str, list[torch.nn.Parameter]]:
        """Trainable parameters grouped by transformer block in forward order (embeddings are not frozen)."""
        out: dict[str, list[torch.nn.Parameter]] = {}
        for name, p in self.trainer.model.named_parameters():
            parts = name.split(".")
            if "layers" in parts:
                i = parts.index("layers")
                out.setdefault(".".join(parts[: i + 2]), []).append(p)
        return out

    # --- state ------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "config": self.cfg.model_dump(mode="json"),
            "machine": self.machine.state_dict(),
            "predictor": self.predictor.state_dict(),
            "bandit": self.bandit.state_dict(),
            "monitor": self.monitor.state_dict(),
            "rate": self.rate.state_dict(),
            "counters": asdict(self.counters),
            "step_time": self.step_time,
            "accept_ema": self.accept_ema,
            "traj_start": self._traj_start,
            "last_probe": list(self.last_probe) if self.last_probe else None,
            "attempt_s": self.attempt_s,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"hybrid engine state version {state.get('version')!r}, expected {STATE_VERSION}")
        self.machine.load_state_dict(state["machine"])
        self.predictor.load_state_dict(state["predictor"], device=self.trainer.device)
        self.bandit.load_state_dict(state["bandit"])
        self.monitor.load_state_dict(state["monitor"])
        self.rate.load_state_dict(state["rate"])
        known = {f.name for f in fields(Counters)}
        self.counters = Counters(**{k: v for k, v in state["counters"].items() if k in known})
        self.step_time = state["step_time"]
        self.accept_ema = float(state["accept_ema"])
        self._traj_start = int(state["traj_start"])
        lp = state["last_probe"]
        self.last_probe = (float(lp[0]), int(lp[1])) if lp else None
        self.attempt_s = state.get("attempt_s")  # absent in checkpoints written before the overhead budget
        names = dict(self._blocks())
        for name in self.counters.frozen:
            for p in names.get(name, []):
                p.requires_grad_(False)
        self._good = None  # taken again at the next snapshot or jump
