"""The repairs the training loop makes instead of failing, in one object with a few entry points, so the loop
reads "step; if it went wrong, tell recovery" and every policy (how far to back off, when a streak of NaN steps
becomes a rollback, when to give up) sits in one place. Each repair is announced (``WarningEvent``).

- Out of memory in a step (``out_of_memory``): the caller already dropped the gradients and rewound the RNG;
  the micro-batch is halved and the step retried, with accumulation grown to match, so the effective batch
  and the data order are unchanged (the data position counts configured micro-batches of ``batch_size``
  examples; a smaller micro-batch splits each of them). In the optimizer update (``out_of_memory_in_update``)
  the update may be half-applied, so the run also rolls back. At micro-batch 1, or sharded (one rank cannot
  retry alone): ``OutOfMemory``. In evaluation only the evaluation batch shrinks (``eval_out_of_memory``).
- A NaN/Inf loss or gradient norm (``skipped``): the update was skipped (the data moves on); ``nan_max_skips``
  skips within ``NAN_WINDOW`` steps roll back to the last good checkpoint (``restore``, supplied by the worker)
  with the learning rate scaled by ``nan_lr_factor``; past ``nan_max_rollbacks``: ``TrainingDiverged``.
  Non-finite weights at a checkpoint (``non_finite_weights``) are never saved: the same rollback.
- fp16 (``retry_overflow``): a step whose gradients overflowed reruns at the halved scale, up to
  ``MAX_OVERFLOWS`` in a row; after that it counts as a real NaN/Inf.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch

from core.distributed import Lockstep
from core.errors import OutOfMemory, TrainingDiverged
from core.hybrid.engine import HybridEngine
from core.memory import memory_snapshot
from core.precision import Precision
from core.state import STICKY, TrainState
from trainbox.config import TrainingConfig

NAN_WINDOW = 25  # skipped steps count towards a rollback for this many steps
MAX_OVERFLOWS = 30  # fp16 overflows in a row (the scale halved each time) before it counts as a real NaN/Inf
NAN_LOG = 20  # non-finite steps remembered for the diagnosis


class Repairable(Protocol):
    """What recovery uses of ``core.train.Trainer``: its state (replaced by a rollback, so always read anew),
    its sizes and settings, and how it announces a repair."""

    @property
    def state(self) -> TrainState: ...
    @property
    def cfg(self) -> TrainingConfig: ...
    @property
    def device(self) -> torch.device: ...
    @property
    def precision(self) -> Precision: ...
    @property
    def ranks(self) -> Lockstep: ...
    @property
    def micro_batch_size(self) -> int: ...
    @property
    def accum_steps(self) -> int: ...
    @property
    def effective_batch(self) -> int: ...
    @property
    def hybrid(self) -> HybridEngine | None: ...

    def lr(self) -> float: ...
    def warn(self, kind: str, message: str, **data: Any) -> None: ...


class Recovery:
    def __init__(self, trainer: Repairable) -> None:
        self.trainer = trainer
        # back to the newest complete checkpoint (or the initial weights); set per run by the worker. Without
        # it a rollback fails the job.
        self.restore: Callable[[], None] | None = None

    # --- out of memory ------------------------------------------------------------------------------

    def out_of_memory(self, error: str, step: int) -> None:
        """Halve the micro-batch after an OOM in step ``step`` (accumulation grows to keep the effective batch)."""
        t = self.trainer
        s, old = t.state, t.micro_batch_size
        if old <= 1 or not t.ranks.can_back_off:
            raise self._oom_failure(error, step, "training", old)
        s.micro_size, s.ooms = max(1, old // 2), s.ooms + 1
        t.warn(
            "oom_backoff",
            f"out of memory at micro-batch {old} in step {step}: retrying with micro-batch {t.micro_batch_size} "
            f"x {t.accum_steps} accumulation (effective batch {t.effective_batch} unchanged)",
            error=error,
            from_micro_batch=old,
            micro_batch=t.micro_batch_size,
            grad_accum=t.accum_steps,
            effective_batch=t.effective_batch,
        )

    def out_of_memory_in_update(self, error: str, step: int) -> None:
        """The update may be half-applied: back off, then start again from the last checkpoint."""
        self.out_of_memory(error, step)
        self.rollback(f"out of memory in the optimizer update of step {step}")

    def eval_out_of_memory(self, error: str) -> None:
        """Halve only the evaluation batch; training is unchanged."""
        t = self.trainer
        s = t.state
        size = s.eval_size or t.cfg.batch_size
        if size <= 1 or not t.ranks.can_back_off:
            raise self._oom_failure(error, s.step, "evaluating", size)
        s.eval_size = size // 2
        t.warn(
            "eval_oom_backoff",
            f"out of memory evaluating at batch {size}: retrying with batch {s.eval_size} (training unchanged)",
            error=error,
            from_eval_batch=size,
            eval_batch=s.eval_size,
        )

    def _oom_failure(self, error: str, step: int, phase: str, size: int) -> OutOfMemory:
        t = self.trainer
        cfg, sharded = t.cfg, not t.ranks.can_back_off
        where = "evaluation batch" if phase == "evaluating" else "micro-batch"
        # sharded, one rank cannot retry alone (the others wait inside FSDP's collectives): no back-off
        at = f"at {where} {size} with sharding 'fsdp' (no back-off)" if sharded else f"even at {where} {size}"
        return OutOfMemory(
            f"out of memory in {phase} at step {step} {at} with max_length {cfg.max_length}",
            evidence={
                "error": error,
                "phase": phase,
                "step": step,
                "micro_batch": t.micro_batch_size,
                "eval_batch": t.state.eval_size or cfg.batch_size,
                "max_length": cfg.max_length,
                "device": str(t.device),
                "bf16": t.precision.bf16,
                **memory_snapshot(t.device),
            },
            fix=(
                f"lower max_length (now {cfg.max_length}) or batch_size, set gradient_checkpointing = true, "
                "shard across more processes (nproc), or free the GPU of other processes"
                if sharded
                else f"lower max_length (now {cfg.max_length}), use LoRA or a smaller model, "
                "or free the GPU of other processes"
            ),
        )

    # --- non-finite values --------------------------------------------------------------------------

    def retry_overflow(self) -> bool:
        """An fp16 overflow (the scaler already halved its scale): rerun the step, unless there were too many in
        a row; then it is treated as a real NaN/Inf."""
        s = self.trainer.state
        s.overflows += 1
        return s.overflows <= MAX_OVERFLOWS

    def skipped(self, step: int, loss: float, grad_norm: float, lr: float) -> None:
        """Step ``step``'s update was skipped (non-finite); too many of those within the window: roll back."""
        t = self.trainer
        s = t.state
        s.skipped = [*[x for x in s.skipped if x > step - NAN_WINDOW], step]
        entry = {"step": step, "loss": str(loss), "grad_norm": str(grad_norm), "lr": lr}
        s.nan_log = [*s.nan_log, entry][-NAN_LOG:]
        recent = [x for x in s.skipped if x > max(s.step - NAN_WINDOW, s.skips_since)]
        if len(recent) >= t.cfg.nan_max_skips:
            self._nan_rollback(f"{t.cfg.nan_max_skips} non-finite steps within {NAN_WINDOW}")

    def non_finite_weights(self) -> None:
        """The weights at a checkpoint boundary are not finite: never saved; rolled back instead."""
        t = self.trainer
        t.warn("non_finite", f"step {t.state.step}: non-finite weights; not saved")
        self._nan_rollback(f"non-finite weights at step {t.state.step}")

    def _nan_rollback(self, reason: str) -> None:
        t = self.trainer
        s, cfg = t.state, t.cfg
        if s.rollbacks >= cfg.nan_max_rollbacks:
            raise TrainingDiverged(
                f"training diverged: {reason}, after {s.rollbacks} rollback(s) with the learning rate "
                f"scaled to {s.lr_scale:g}x",
                evidence={
                    "step": s.step,
                    "rollbacks": s.rollbacks,
                    "lr_scale": s.lr_scale,
                    "lr": t.lr(),
                    "peak_lr": cfg.learning_rate,
                    "non_finite_steps": s.nan_log,
                    "recent_losses": s.recent_losses,
                },
                fix=f"lower learning_rate (peak {cfg.learning_rate:g}), check the data for degenerate or extremely "
                "long examples, or use precision = 'fp32'",
            )
        s.rollbacks += 1
        s.lr_scale *= cfg.nan_lr_factor
        self.rollback(reason)

    # --- rollback -----------------------------------------------------------------------------------

    def rollback(self, reason: str) -> None:
        """Back to the last good checkpoint (or the start), keeping what was learnt about the machine and the
        instability (``STICKY``)."""
        t = self.trainer
        s = t.state
        if self.restore is None:
            raise TrainingDiverged(
                f"{reason}; no way to roll back",
                evidence={"step": s.step, "non_finite_steps": s.nan_log},
                fix="lower learning_rate",
            )
        sticky = {k: getattr(s, k) for k in STICKY}
        from_step = s.step
        self.restore()
        for k, v in sticky.items():
            setattr(t.state, k, v)
        t.state.skips_since = t.state.step
        if t.hybrid is not None:
            t.hybrid.after_rollback()
        t.warn(
            "rollback",
            f"{reason}: rolled back from step {from_step} to step {t.state.step}, "
            f"learning rate now {t.state.lr_scale:g}x",
            from_step=from_step,
            to_step=t.state.step,
            lr_scale=t.state.lr_scale,
            rollbacks=t.state.rollbacks,
        )
