"""The training loop: nanoGPT's order (lr, eval/checkpoint, step, log), readable in one sitting.

The engine knows nothing of files, the DB or HTTP. It reports through ``emit`` (core.events), asks
``should_stop()`` at every step boundary, and saves through a ``save_checkpoint()`` callable the worker
supplies. Everything a resumed run needs to continue bit for bit (step, data position, optimizer, RNG,
losses, micro-batch) is in ``Trainer.state_dict()``; the lr is a pure function of the step.

What a step must get right besides the arithmetic is in objects with small interfaces, called in order:
- ``precision`` (core.precision): autocast, and under fp16 the gradient scaler;
- ``ranks`` (core.distributed.Lockstep): this process's share of the step, FSDP's padding passes, the sums
  after the accumulation and the decisions every rank takes together (one process is the trivial case);
- ``recovery`` (core.recovery): out-of-memory back-off, NaN skips and rollbacks, fp16 overflow reruns;
- ``faults`` (core.faults): test-only failures at named points; the default one does nothing;
- ``clock`` (core.step_timing): the seconds of each phase (data, forward and backward, optimizer, evaluation,
  checkpoints), emitted as a ``TimingEvent`` at a logged step every 10 s and at the loop's end.

``engine = "hybrid"`` adds ``core.hybrid.HybridEngine`` (``self.hybrid``): it sets the learning rate (the cosine,
cut short where its curve model says the run is done), picks which examples of a step get their passes (with
``compact``, filling the step from the micro-batches after it), records
their losses from the forward pass, re-measures skipped ones at step boundaries, reads each evaluation, and may
end the run early (``stop_reason``). Its state is part of ``state_dict()``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from core import readback, rng, sharding, speedups
from core.data import DataPosition, collate, real_tokens, total_steps
from core.distributed import Dist, Lockstep
from core.encode import Example
from core.errors import CheckpointError
from core.events import CheckpointEvent, EvalEvent, Event, Outcome, PhaseEvent, StepEvent, WarningEvent
from core.faults import Faults
from core.health import Alert, HealthMonitor
from core.hybrid.engine import HybridEngine
from core.lookahead import Lookahead, PreparedStep
from core.loss import mean_loss, stage, staged_loss_sum
from core.memory import free_memory
from core.precision import Precision, weights_finite
from core.recovery import Recovery
from core.schedule import lr_at, make_optimizer, warmup_steps
from core.state import StepResult, TrainState, crossed, first_line
from core.step_timing import LoopClock
from trainbox.config import TrainingConfig


class Trainer:
    def __init__(
        self,
        model: torch.nn.Module,
        cfg: TrainingConfig,
        train: list[Example],
        val: list[Example],
        pad_id: int,
        device: torch.device,
        faults: Faults | None = None,
        dist: Dist | None = None,
    ) -> None:
        self.model, self.cfg, self.train_set, self.val_set = model, cfg, train, val
        self.ranks = Lockstep(dist or Dist(), sharding.is_sharded(model))
        self.pad_id, self.device = pad_id, device
        # the optimizer before the probes' forward passes: under FSDP2 a forward leaves the root module's
        # parameters unsharded, and the optimizer must hold the sharded ones
        self.optimizer = make_optimizer(model, cfg, device)
        self.precision = Precision(cfg, device)
        self.state = TrainState()
        self.health = HealthMonitor(patience=cfg.overfit_patience)
        self.faults = faults if faults is not None else Faults()
        self.recovery = Recovery(self)
        self.speedups = speedups.choose(model, cfg, device, self.ranks)
        self.batches = speedups.batches(train, cfg, self.speedups.packed)
        self.total_steps = total_steps(cfg.max_steps, cfg.epochs, self.batches.per_epoch, cfg.grad_accum)
        self.lookahead = Lookahead(self._prepare_step)
        self.clock = LoopClock(device)  # where the loop's time goes, for the job report (core.step_timing)
        mean_length = sum(len(e.input_ids) for e in train) / max(len(train), 1)
        tokens = int(self.total_steps * self.effective_batch * mean_length)
        self.compiled = speedups.compile_if_it_pays(model, self.speedups.split, cfg, device, tokens)
        self._emit: Callable[[Event], None] = lambda e: None
        self._phase = ""
        self.hybrid = self._make_hybrid()
        self._held: readback.Held | None = None  # the last step, its numbers not yet read (core.readback)

    def _make_hybrid(self) -> HybridEngine | None:
        if self.cfg.engine != "hybrid":
            return None
        return HybridEngine(self, self.cfg.hybrid, packed=self.speedups.packed)

    # sizes
    @property
    def micro_batch_size(self) -> int:
        return self.state.micro_size or self.cfg.batch_size

    @property
    def accum_steps(self) -> int:
        """Forward passes per optimizer step at the current micro-batch."""
        return self.cfg.grad_accum * math.ceil(self.cfg.batch_size / self.micro_batch_size)

    @property
    def effective_batch(self) -> int:
        return self.cfg.batch_size * self.cfg.grad_accum

    def set_micro_batch(self, size: int) -> None:
        """Start with a smaller micro-batch (preflight, the cache of what worked); never above batch_size."""
        self.state.micro_size = max(1, min(size, self.cfg.batch_size))

    @property
    def defers_reads(self) -> bool:
        """Whether a step's numbers are read one step late (core.readback), its non-finite skip made on the device."""
        return self.precision.scaler is None and self.hybrid is None and readback.can_mask(self.optimizer)

    def lr(self) -> float:
        s, cfg = self.state, self.cfg
        if self.hybrid is not None:
            return self.hybrid.lr(s.step) * s.lr_scale
        return lr_at(s.step, self.total_steps, cfg.learning_rate, cfg.warmup_ratio, cfg.min_lr_ratio) * s.lr_scale

    # resume
    def state_dict(self) -> dict[str, Any]:
        """Sharded, the optimizer's full state is gathered (unsharded format): every rank must call this."""
        return {
            "trainer": asdict(self.state),
            "optimizer": self.ranks.optimizer_state(self.model, self.optimizer),
            "rng": rng.capture(),
            "schedule": {"kind": "warmup_cosine", "total_steps": self.total_steps},
            "data": self._data_shape(),
            "health": self.health.state_dict(),
            **({"hybrid": self.hybrid.state_dict()} if self.hybrid is not None else {}),
            **self.precision.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state_dict()``; refuses a state whose data or schedule differ from this run's."""
        saved = {**state["data"], "total_steps": state["schedule"]["total_steps"]}
        if "order" not in saved:  # made before length grouping: continue in that run's plain shuffled order
            self.batches.ungroup()
        mine = {**self._data_shape(), "total_steps": self.total_steps}
        if saved != mine:
            raise CheckpointError(f"checkpoint was made for {saved}, this run has {mine}: data or settings changed")
        self.state, self._held = TrainState(**state["trainer"]), None
        self.ranks.load_optimizer_state(self.model, self.optimizer, state["optimizer"])
        rng.restore(state["rng"])
        if "health" in state:
            self.health.load_state_dict(state["health"])
        if self.hybrid is not None and "hybrid" in state:
            self.hybrid.load_state_dict(state["hybrid"])
        self.precision.load_state_dict(state)

    def reset(self) -> None:
        """Back to step 0 (the caller reloads the initial weights): fresh optimizer, counters, RNG."""
        self.optimizer = make_optimizer(self.model, self.cfg, self.device)
        self.state, self._held = TrainState(), None
        self.health = HealthMonitor(patience=self.cfg.overfit_patience)
        self.hybrid = self._make_hybrid()
        self.precision.reset()
        rng.seed_all(self.cfg.seed)

    def _data_shape(self) -> dict[str, Any]:
        shape: dict[str, Any] = {"n_train": len(self.train_set), "n_val": len(self.val_set)}
        shape["batch_size"] = self.cfg.batch_size
        if self.batches.order_kind != "random":  # absent (plain shuffle) in checkpoints from before length grouping
            shape["order"] = self.batches.order_kind
        return shape

    # the loop
    def run(
        self,
        emit: Callable[[Event], None],
        should_stop: Callable[[], bool],
        save_checkpoint: Callable[[], Path],
        restore: Callable[[], None] | None = None,
    ) -> Outcome:
        """Train to the end (or an early stop); ``restore()`` loads the newest complete checkpoint (or
        the initial weights) into this trainer, for rollbacks; without it a rollback fails the job."""
        self._emit, self.recovery.restore = emit, restore
        for note in self.speedups.notes:
            emit(WarningEvent(self.state.step, "speedup_off", note, {}))
        started = time.time()
        self.clock.restart()
        while True:
            s = self.state  # a rollback replaces it
            # 1. learning rate of the step about to run
            lr = self.lr()
            # 2. evaluate and checkpoint at this step boundary (the last step's numbers read first)
            if self._held is not None and (self._eval_due() or self._checkpoint_due() or self._finished()):
                self._settle()
                continue  # a rollback may have replaced the state
            if self._eval_due():
                self.clock.timed("eval", self._evaluate, emit)
            if self._checkpoint_due() and not self.clock.timed("checkpoint", self._checkpoint, emit, save_checkpoint):
                continue  # refused (non-finite weights) and rolled back
            if self._finished():
                emit(self.clock.event(s.step))
                return "completed"
            if should_stop():
                self._settle()
                s = self.state
                if s.step > 0 and s.last_checkpoint_step != s.step:
                    self.clock.timed("checkpoint", self._checkpoint, emit, save_checkpoint)
                emit(self.clock.event(s.step))
                return "interrupted"
            # 3. one optimizer step (the hybrid engine may re-measure skipped examples first)
            self._set_phase(emit, "training")
            if self.hybrid is not None:
                self.hybrid.before_step(emit)
            engine_phase = self.hybrid.phase if self.hybrid is not None else ""
            self.faults.hang("training", s.step + 1)
            t0 = time.time()
            outcome = self._optimizer_step(lr)
            if outcome is None:
                continue  # out of memory (backed off) or an fp16 overflow (scale halved): the step runs again
            self._settle()  # the previous step's numbers, now that this one is queued
            if self.state is not s:
                continue  # they rolled the run back (this step's update went with it)
            # the hybrid engine compares its overhead with this: on a GPU, wait for the step's queued kernels
            dt = max((self.hybrid.clock() if self.hybrid is not None else time.time()) - t0, 1e-9)
            s.step += 1
            s.tokens_seen += outcome.tokens
            self._held = readback.Held(
                s.step,
                lr,
                dt,
                self._epoch(),
                time.time() - started,
                self.micro_batch_size,
                self.accum_steps,
                engine_phase,
                outcome,
            )
            # 4. log (now, or after the next step is queued)
            if not self.defers_reads:
                self._settle()

    def _finished(self) -> bool:
        return self.state.step >= self.total_steps or bool(self.state.stop_reason)

    def _settle(self) -> None:
        """Read the held step's loss and gradient norm and make its records: the loss history, the hybrid
        engine's, its event, the health checks, a skip (too many within the window roll back)."""
        held, self._held = self._held, None
        if held is None:
            return
        r, s = held.result(), self.state
        if not r.skipped:
            s.record_loss(r.loss)
            if self.hybrid is not None:
                self.hybrid.after_real_step(r.loss, r.grad_norm, held.dt, self._emit)
                s.stop_reason = s.stop_reason or self.hybrid.stop_reason()
        self._emit_step(self._emit, self._step_event(r, held))
        if held.step % self.cfg.log_every == 0 and self.clock.due():
            self._emit(self.clock.event(held.step))
        warmup_done = held.step > warmup_steps(self.total_steps, self.cfg.warmup_ratio)
        peak = self.cfg.learning_rate
        self._alerts(self.health.on_step(held.step, self.total_steps, r.loss, r.grad_norm, held.lr, peak, warmup_done))
        if r.skipped:
            self.recovery.skipped(held.step, r.loss, r.grad_norm, held.lr)

    def _step_event(self, r: StepResult, h: readback.Held) -> StepEvent:
        return StepEvent(
            h.step,
            self.total_steps,
            r.loss,
            h.lr,
            r.grad_norm,
            r.tokens,
            r.tokens / h.dt,
            h.epoch,
            h.elapsed,
            r.skipped,
            h.micro_batch,
            h.grad_accum,
            **(self.hybrid.step_fields(h.engine_phase) if self.hybrid is not None else {}),
        )

    # the step
    def _optimizer_step(self, lr: float) -> StepResult | readback.Pending | None:
        """One optimizer step over grad_accum configured micro-batches, each split into forward passes of
        ``micro_batch_size``; loss normalised by all trained tokens of the step. None when the step must run
        again (out of memory: backed off; an fp16 overflow: the scale halved); nothing was applied then. Its
        loss and gradient norm are read now, or left on the device (``defers_reads``: ``Pending``), a non-finite
        step then masked in the update."""
        step = self.state.step + 1
        self.model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        prepared = self.clock.timed("data", self.lookahead.take, self.state.position, self.micro_batch_size)
        plan = prepared.plan
        self.faults.arm_step(step)
        rng_before = rng.torch_rng()
        oom = ""
        try:
            values, tokens = self.clock.timed("forward_backward", self._accumulate, prepared)
        except torch.OutOfMemoryError as e:
            oom = first_line(e)  # keep no reference: the traceback holds the activations
        if oom:
            self._drop_gradients(free=True)
            rng.set_torch_rng(rng_before)
            self.recovery.out_of_memory(oom, step)
            return None
        if self.defers_reads:
            with readback.masked_if_not_finite(self.optimizer, values):
                oom = self.clock.timed("optimizer", self._update)
            if oom:
                self._drop_gradients(free=True)
                self._settle()  # the held step's records before the rollback replaces the state
                self.recovery.out_of_memory_in_update(oom, step)
                return None
            self.optimizer.zero_grad(set_to_none=True)
            self.faults.after_update(self.model, step)
            self.state.position = plan.end
            return readback.Pending(values, tokens)
        loss, norm = values.tolist()
        if self.precision.overflowed(loss, norm) and self.recovery.retry_overflow():
            self.optimizer.zero_grad(set_to_none=True)
            rng.set_torch_rng(rng_before)
            return None
        if not (math.isfinite(loss) and math.isfinite(norm)):
            self._drop_gradients()  # never reaches the weights; the data moves on
            self.state.position = plan.end
            return StepResult(loss, norm, tokens, skipped=True)
        oom = self.clock.timed("optimizer", self._update)
        if oom:
            self._drop_gradients(free=True)
            self.recovery.out_of_memory_in_update(oom, step)
            return None
        if self.hybrid is not None:
            self.hybrid.trained(plan, step)
        self.optimizer.zero_grad(set_to_none=True)
        self.faults.after_update(self.model, step)
        self.state.position = plan.end
        return StepResult(loss, norm, tokens, skipped=False)

    def _prepare_step(self, pos: DataPosition, micro: int) -> PreparedStep:
        keep = self.hybrid.keep if self.hybrid is not None else None
        reads = self.hybrid.reads() if self.hybrid is not None else 1  # compaction fills a step from further data
        plan = self.ranks.plan(
            self.batches, pos, self.train_set, self.cfg.grad_accum, micro, self._collate, keep, reads
        )
        return PreparedStep(plan, [stage(b, self.device, self.speedups.split) for b in plan.passes])

    def _accumulate(self, prepared: PreparedStep) -> tuple[torch.Tensor, int]:
        """Forward and backward over the step's passes (the last ``plan.padding`` of them zero-loss ones);
        returns ([loss, grad norm] on the device, tokens) of the whole global step, after queueing the passes
        and preparing the next step's batches; reading them is the step's one sync."""
        plan = prepared.plan
        loss_sum = torch.zeros((), device=self.device)
        per_token = self.hybrid.start_step() if self.hybrid is not None else None  # per-example losses for it
        tokens, oom = 0, ""  # with several ranks an OOM is agreed on before the gradients are summed
        try:
            for i, (batch, staged) in self.faults.forward_passes(list(zip(plan.passes, prepared.staged, strict=True))):
                with self.precision.autocast():
                    loss = staged_loss_sum(self.model, staged, self.speedups.split, per_token) / plan.n_trained
                loss = self.faults.poison(loss, i)
                self.precision.backward(loss)
                loss_sum += loss.detach()
                if i < len(plan.passes) - plan.padding:
                    tokens += real_tokens(batch)
        except torch.OutOfMemoryError as e:
            if not self.ranks.defers_oom:
                raise
            oom = first_line(e)
        if not oom and self.hybrid is None:  # the hybrid's next step depends on this one's losses: built then
            self.clock.timed("data", self.lookahead.prepare, plan.end, self.micro_batch_size)
        loss_sum, tokens = self.ranks.reduce(oom, loss_sum, tokens, self.model.parameters())
        self.precision.unscale(self.optimizer)  # the true gradients, before clipping and the norm
        return torch.stack([loss_sum.float(), self._clip_gradients().float()]), tokens

    def _clip_gradients(self) -> torch.Tensor:
        """The gradient norm before clipping (``grad_clip`` > 0 clips), on the device; sharded, over the shards."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        grads = [p.grad for p in params if p.grad is not None]
        if self.cfg.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm(grads)
        return sharding.full(norm).detach()

    def _update(self) -> str:
        """Apply the update; '' when applied, else the out-of-memory message (any rank's is every rank's)."""
        oom = ""
        try:
            if self.precision.step(self.optimizer):
                self.state.overflows = 0
        except torch.OutOfMemoryError as e:
            oom = first_line(e)
        return self.ranks.agree_oom(oom)

    def _drop_gradients(self, free: bool = False) -> None:
        """Nothing of a failed attempt reaches the weights; after an OOM its memory goes back too."""
        self.precision.end_step()
        self.optimizer.zero_grad(set_to_none=True)
        if free:
            free_memory(self.device)

    def _collate(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        return collate(examples, self.pad_id, self.speedups.packed)

    def _epoch(self) -> float:
        return self.state.epoch + self.state.micro_batch / self.batches.per_epoch

    # evaluation
    def evaluate(self) -> float:
        """Mean loss per trained token over the whole validation set."""
        size = self.state.eval_size or self.cfg.batch_size
        self.faults.before_eval(self.state.step, len(self.val_set))
        packed, n = self.speedups.packed, len(self.val_set)
        batches = (collate(self.val_set[i : i + size], self.pad_id, packed) for i in range(0, n, size))
        loss = self.mean_loss(batches)
        self.model.train()
        return loss

    def mean_loss(self, batches: Iterable[dict[str, torch.Tensor]]) -> float:
        """Mean loss per trained token over collated batches, no gradient (evaluation, the hybrid probe)."""
        return mean_loss(self.model, batches, self.device, self.precision.autocast, self.speedups.split)

    # boundaries: "crossed a multiple of every since the last one" (with steps of 1: step % every == 0)
    def _eval_due(self) -> bool:
        s, every = self.state, self.cfg.eval_every
        if not self.val_set or s.last_eval_step == s.step:
            return False
        done = s.step >= self.total_steps or bool(s.stop_reason)
        return s.step == 0 or done or crossed(s.step, s.last_eval_step, every)

    def _checkpoint_due(self) -> bool:
        s, every = self.state, self.cfg.checkpoint_every
        if s.step == 0 or s.last_checkpoint_step == s.step:
            return False
        return s.step >= self.total_steps or bool(s.stop_reason) or crossed(s.step, s.last_checkpoint_step, every)

    def _evaluate(self, emit: Callable[[Event], None]) -> None:
        s = self.state
        self._set_phase(emit, "evaluating")
        self.faults.hang("evaluating", s.step)
        while True:
            oom = ""
            try:
                val = self.evaluate()
                break
            except torch.OutOfMemoryError as e:
                oom = first_line(e)
            self.model.train()
            free_memory(self.device)
            self.recovery.eval_out_of_memory(oom)
        s.last_eval_step, s.last_val_loss = s.step, val
        if s.step == 0:
            s.first_val_loss = val
        if s.best_val_loss is None or val < s.best_val_loss:
            s.best_val_loss = val
        emit(EvalEvent(s.step, val))
        if self.hybrid is not None:
            self.hybrid.after_eval(s.step, val, emit)
        if s.step > 0:
            alerts = self.health.on_eval(s.step, val, s.train_loss)
            self._alerts(alerts)
            if self.cfg.early_stop_on_overfit and any(a.kind == "overfitting" for a in alerts):
                s.stop_reason = f"stopped early at step {s.step}: " + next(
                    a.message for a in alerts if a.kind == "overfitting"
                )

    def _checkpoint(self, emit: Callable[[Event], None], save_checkpoint: Callable[[], Path]) -> bool:
        """Save at this boundary; False when the weights are not finite (then rolled back instead)."""
        self._set_phase(emit, "checkpointing")
        if not self.ranks.agree_finite(weights_finite(self.model)):
            self.recovery.non_finite_weights()
            return False
        self.faults.hang("checkpointing", self.state.step)
        self.state.last_checkpoint_step = self.state.step  # recorded inside the checkpoint itself
        path = save_checkpoint()
        emit(CheckpointEvent(self.state.step, path))
        return True

    # reports
    def warn(self, kind: str, message: str, **data: Any) -> None:
        """A repair or an alert a person should know of, at the current step."""
        self._emit(WarningEvent(self.state.step, kind, message, data))

    def _alerts(self, alerts: list[Alert]) -> None:
        for a in alerts:
            self._emit(WarningEvent(a.step, a.kind, a.message, a.data))

    def _emit_step(self, emit: Callable[[Event], None], ev: StepEvent) -> None:
        emit(ev)
        self.faults.after_step()

    def _set_phase(self, emit: Callable[[Event], None], phase: str) -> None:
        if phase != self._phase:
            self._phase = phase
            emit(PhaseEvent(phase, self.state.step))
