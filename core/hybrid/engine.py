"""``HybridEngine``: drives a ``core.train.Trainer`` with plain steps plus verified extrapolation jumps.

The real steps are the Trainer's own (``Trainer._optimizer_step``: same batches, accumulation,
clipping, AdamW), so with no jump accepted the engine trains exactly like the plain loop. Around
them it adds, per phase (``phases.py``):
- full: a weight snapshot every ``snapshot_every`` real steps (a copy of the trainable tensors);
- predict: the extrapolated weights ``H`` real steps ahead, written into the model: no forward or
  backward pass, a few tensor operations per parameter;
- correct: the probe loss (one no-grad forward over ``probe_examples`` fixed training examples)
  before and after; accepted jumps advance the schedule by the steps they earned
  (``acceptance.py``), rejected ones restore the weights and the optimizer state;
- plain: nothing but real steps (the fallback when jumps stop paying).
The divergence monitor checks every real step and restores the last good point (weights + AdamW
state) on NaN/Inf or a spike. The bandit picks (H, scale) per attempt from the net steps saved.

Optional cheap alternatives (off by default, measured in scripts/bench_hybrid.py):
- ``freeze``: AutoFreeze-style freezing of converged leading blocks (relative weight change over
  ``freeze_window`` real steps below ``freeze_threshold``), bottom-up, so backward stops early.

``state_dict()``/``load_state_dict()`` hold everything the engine learned (phase, snapshots,
bandit, monitor, progress rate, counters), to sit beside the Trainer's state in a checkpoint.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from core.data import collate
from core.encode import Example
from core.errors import TrainingDiverged
from core.hybrid.acceptance import ProgressRate, Verdict, judge
from core.hybrid.bandit import LinUCB
from core.hybrid.divergence import DivergenceMonitor
from core.hybrid.events import HybridEvent, HybridStepEvent, JumpEvent, RollbackEvent
from core.hybrid.extrapolate import Method, TrajectoryPredictor
from core.hybrid.phases import Phase, PhaseMachine
from core.schedule import lr_at
from core.train import RECENT_LOSSES, Event, Outcome, Trainer, token_loss_sum, trained_positions

STATE_VERSION = 1
MAX_CONSECUTIVE_DIVERGENCES = 3  # restores in a row with no good step between: give up like the plain loop


@dataclass
class HybridConfig:
    """Every knob of the engine, with the defaults the benchmark measured (docs/BENCHMARKS.md)."""

    warmup_steps: int = 20  # real steps before the first snapshot
    full_steps: int = 10  # real steps between jump attempts (at least)
    snapshot_every: int = 5  # real steps between weight snapshots
    history: int = 3  # snapshots the extrapolation fits
    method: Method = "linear"  # linear | exponential
    horizons: tuple[int, ...] = (5, 10, 20)  # bandit arms: real steps to predict ahead
    scales: tuple[float, ...] = (1.0,)  # bandit arms: multiplier on the predicted displacement
    probe_examples: int = 16  # fixed training examples the jumps are verified on
    min_rel_gain: float = 1e-3  # probe gain below this (relative) is a rejection (probe noise level)
    min_earned: float = 1.0  # a jump must be worth at least this many plain steps
    advance_schedule: bool = True  # accepted jumps advance the step counter (and lr) by the steps earned
    bandit_alpha: float = 0.5
    fallback_after: int = 2  # consecutive rejections (or losing attempts) before falling back to plain
    cooldown_steps: int = 50  # first plain stretch after a fallback; doubles each time
    max_cooldown_steps: int = 640
    rate_smoothing: float = 0.5  # EMA of the plain progress rate (probe loss per step)
    prediction_tol: float = 0.05  # probe loss this much worse after a jump: prediction error
    spike_factor: float = 2.0  # loss spike: above factor x running mean (and 6 sigma)
    freeze: bool = False  # AutoFreeze-style freezing of converged leading blocks
    freeze_window: int = 50
    freeze_threshold: float = 2e-3

    def __post_init__(self) -> None:
        self.horizons = tuple(int(h) for h in self.horizons)
        self.scales = tuple(float(s) for s in self.scales)
        if self.method == "exponential" and self.history < 3:
            raise ValueError("the exponential fit needs history >= 3")


@dataclass
class Counters:
    real_steps: int = 0
    attempts: int = 0
    accepted: int = 0
    rolled_back: int = 0
    divergence_rollbacks: int = 0
    advanced_steps: int = 0  # schedule steps advanced by accepted jumps
    backward_skipped: int = 0
    earned_steps: float = 0.0
    real_step_s: float = 0.0  # time in real steps
    overhead_s: float = 0.0  # probes, snapshots, predictions, restores, freezing checks
    frozen: list[str] = field(default_factory=list)

    def est_saved_s(self, step_time: float) -> float:
        return self.earned_steps * step_time - self.overhead_s


def real_step(trainer: Trainer, lr: float) -> tuple[float, float, int] | None:
    """One real optimizer step through the Trainer; (loss, grad norm, tokens), or None when the Trainer
    backed off and applied nothing. Accepts both step signatures core/train.py has had: (loss, norm,
    tokens) raising TrainingDiverged, and (loss, norm, tokens, skipped) | None, where a skipped step
    (non-finite, never applied) comes back with its non-finite values for the divergence monitor."""
    result: Any = trainer._optimizer_step(lr)
    if result is None:
        return None
    loss, grad_norm, tokens = result[0], result[1], result[2]
    return float(loss), float(grad_norm), int(tokens)


class HybridEngine:
    def __init__(self, trainer: Trainer, cfg: HybridConfig, probe: Sequence[Example]) -> None:
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
        self._good: tuple[int, list[torch.Tensor], dict[int, dict[str, Any]]] | None = None
        self._freeze_ref: tuple[int, dict[str, list[torch.Tensor]]] | None = None
        self._divergences_in_row = 0
        self._traj_start = 0  # real step where the current trajectory (snapshot spacing) began

    # --- the loop ---------------------------------------------------------------------------------

    def run(
        self,
        emit: Callable[[Event | HybridEvent], None],
        should_stop: Callable[[], bool],
        save_checkpoint: Callable[[], Path] | None = None,
    ) -> Outcome:
        """Trainer.run's order (lr, eval/checkpoint, step, log) with jumps in place of some steps."""
        tr = self.trainer
        if hasattr(tr, "_emit"):
            tr._emit = emit  # the Trainer's own warnings go to the same place
        started = time.time()
        while True:
            s = tr.state  # the Trainer may replace it on its own rollbacks
            if self._eval_due():
                tr._evaluate(emit)
            if save_checkpoint is not None and self._checkpoint_due():
                tr._checkpoint(emit, save_checkpoint)
            if s.step >= tr.total_steps:
                return "completed"
            if should_stop():
                if save_checkpoint is not None and s.step > 0 and s.last_checkpoint_step != s.step:
                    tr._checkpoint(emit, save_checkpoint)
                return "interrupted"
            tr._set_phase(emit, "training")
            if self.machine.phase == Phase.PREDICT:
                self._attempt_jump(emit, started)
            else:
                self._real_step(emit, started)

    def _real_step(self, emit: Callable[[Event | HybridEvent], None], started: float) -> None:
        tr, s, c = self.trainer, self.trainer.state, self.counters
        phase = self.machine.phase
        lr = lr_at(s.step, tr.total_steps, tr.cfg.learning_rate, tr.cfg.warmup_ratio, tr.cfg.min_lr_ratio)
        if self._good is None:
            self._save_good()
        t0 = time.time()
        try:
            result = real_step(tr, lr)
        except TrainingDiverged:
            tr.optimizer.zero_grad(set_to_none=True)
            result = (math.nan, math.nan, 0)
        if result is None:
            return  # the Trainer backed off (out of memory) and applied nothing: the step runs again
        loss, grad_norm, tokens = result
        reason = self.monitor.observe(loss, grad_norm)
        dt = max(time.time() - t0, 1e-9)
        s.step += 1
        c.real_steps += 1
        c.real_step_s += dt
        if reason is not None:
            self._divergence_rollback(emit, reason)
            return
        self._divergences_in_row = 0
        self.step_time = dt if self.step_time is None else 0.9 * self.step_time + 0.1 * dt
        s.tokens_seen += tokens
        s.recent_losses = [*s.recent_losses, loss][-RECENT_LOSSES:]

        t1 = time.time()
        if (c.real_steps - self._traj_start) % self.cfg.snapshot_every == 0:
            self._save_good()  # in every phase, so a divergence never rolls back far
            if self.machine.snapshotting:
                self.predictor.add(c.real_steps, self.params)
        if self.cfg.freeze:
            self._maybe_freeze()
        before = self.machine.phase
        after = self.machine.on_real_step(self.predictor.ready(self.cfg.method))
        if before != Phase.FULL and after == Phase.FULL:  # a new trajectory starts here
            self.predictor.clear()
            self.predictor.add(c.real_steps, self.params)
            self._traj_start = c.real_steps
            if self.last_probe is None:
                self.last_probe = (self.probe_loss(), c.real_steps)  # the first point of the progress rate
        c.overhead_s += time.time() - t1
        emit(self._step_event(phase, False, 1, loss, lr, grad_norm, tokens, dt, started))

    def _attempt_jump(self, emit: Callable[[Event | HybridEvent], None], started: float) -> None:
        tr, s, c, cfg = self.trainer, self.trainer.state, self.counters, self.cfg
        t0 = time.time()
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
        cost_s = time.time() - t0
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
            c.earned_steps += verdict.earned_steps
            if cfg.advance_schedule:
                advanced = min(int(verdict.earned_steps), tr.total_steps - s.step)
                s.step += advanced
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
        cost_s = time.time() - t0
        c.overhead_s += cost_s
        lr = lr_at(s.step, tr.total_steps, tr.cfg.learning_rate, tr.cfg.warmup_ratio, tr.cfg.min_lr_ratio)
        emit(
            JumpEvent(
                s.step,
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
        )
        if verdict.accepted:
            emit(self._step_event(Phase.PREDICT, True, advanced, after, lr, 0.0, 0, cost_s, started))

    # --- pieces -----------------------------------------------------------------------------------

    @torch.no_grad()
    def probe_loss(self) -> float:
        """Mean loss per trained token on the fixed probe examples (no gradient)."""
        tr = self.trainer
        was_training = tr.model.training
        tr.model.eval()
        total, count = 0.0, 0
        for batch in self.probe_batches:
            b = {k: v.to(tr.device) for k, v in batch.items()}
            with tr._autocast():
                logits = tr.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            total += float(token_loss_sum(logits, b["labels"]))
            count += trained_positions(batch["labels"])
        tr.model.train(was_training)
        return total / max(count, 1)

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

    def _divergence_rollback(self, emit: Callable[[Event | HybridEvent], None], reason: str) -> None:
        self._divergences_in_row += 1
        if self._divergences_in_row > MAX_CONSECUTIVE_DIVERGENCES or self._good is None:
            raise TrainingDiverged(
                f"step {self.trainer.state.step}: {reason} {self._divergences_in_row} times in a row "
                "after restoring the last good point; lower learning_rate or check the data"
            )
        self._restore_good()
        self.counters.divergence_rollbacks += 1
        self.predictor.clear()
        self._traj_start = self.counters.real_steps
        self.last_probe = None
        if self.machine.phase in (Phase.FULL, Phase.PLAIN):
            self.machine.fall_back()
        emit(RollbackEvent(self.trainer.state.step, reason, self._good[0]))

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

    def _eval_due(self) -> bool:
        tr, s = self.trainer, self.trainer.state
        every = tr.cfg.eval_every
        if not tr.val_set or s.last_eval_step == s.step:
            return False
        if s.step == 0 or s.step >= tr.total_steps:
            return True
        return every > 0 and s.step // every > max(s.last_eval_step, 0) // every

    def _checkpoint_due(self) -> bool:
        tr, s = self.trainer, self.trainer.state
        every = tr.cfg.checkpoint_every
        if s.step == 0 or s.last_checkpoint_step == s.step:
            return False
        return s.step >= tr.total_steps or (every > 0 and s.step // every > max(s.last_checkpoint_step, 0) // every)

    def _step_event(
        self,
        phase: Phase,
        predicted: bool,
        advanced: int,
        loss: float,
        lr: float,
        grad_norm: float,
        tokens: int,
        dt: float,
        started: float,
    ) -> HybridStepEvent:
        tr, s, c = self.trainer, self.trainer.state, self.counters
        return HybridStepEvent(
            step=s.step,
            total_steps=tr.total_steps,
            loss=loss,
            lr=lr,
            grad_norm=grad_norm,
            tokens=tokens,
            tokens_per_s=tokens / dt,
            epoch=s.epoch + s.micro_batch / tr.batches.per_epoch,
            elapsed=time.time() - started,
            phase=str(phase),
            predicted=predicted,
            advanced=advanced,
            real_steps=c.real_steps,
            backward_skipped=c.backward_skipped,
            est_saved_s=c.est_saved_s(self.step_time or 0.0),
        )

    # --- state ------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "config": asdict(self.cfg),
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
        names = dict(self._blocks())
        for name in self.counters.frozen:
            for p in names.get(name, []):
                p.requires_grad_(False)
        self._good = None  # taken again at the next real step
