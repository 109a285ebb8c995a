"""The training loop: nanoGPT's order (lr, eval/checkpoint, step, log), readable in one sitting.

The engine knows nothing of files, the DB or HTTP. It reports through ``emit`` (events below),
asks ``should_stop()`` at every step boundary, and saves through a ``save_checkpoint()`` callable
the worker supplies. Everything a resumed run needs to continue bit for bit (step, data position,
optimizer, RNG, losses) is in ``Trainer.state_dict()``; the lr is a pure function of the step.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from core import rng
from core.data import Batches, DataPosition, collate, total_steps
from core.encode import IGNORE, Example
from core.errors import CheckpointError, TrainingDiverged
from core.schedule import lr_at
from trainbox.config import TrainingConfig

RECENT_LOSSES = 10  # the final train loss is the mean of this many last step losses

# --- events ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepEvent:
    step: int  # optimizer steps done
    total_steps: int
    loss: float  # mean loss per trained token over the whole (accumulated) step
    lr: float
    grad_norm: float  # before clipping
    tokens: int  # non-padding tokens processed in the step
    tokens_per_s: float
    epoch: float  # fractional epochs done
    elapsed: float  # seconds since this process started training


@dataclass(frozen=True)
class EvalEvent:
    step: int
    val_loss: float


@dataclass(frozen=True)
class CheckpointEvent:
    step: int
    path: Path


@dataclass(frozen=True)
class PhaseEvent:
    phase: str  # training, evaluating, checkpointing
    step: int


Event = StepEvent | EvalEvent | CheckpointEvent | PhaseEvent
Outcome = Literal["completed", "interrupted"]


# --- state ----------------------------------------------------------------------------------------


@dataclass
class TrainState:
    """The loop's counters and running results; plain values so it serializes as a dict."""

    step: int = 0
    epoch: int = 0  # data position: next micro-batch is `micro_batch` of epoch `epoch`
    micro_batch: int = 0
    tokens_seen: int = 0
    first_val_loss: float | None = None
    last_val_loss: float | None = None
    best_val_loss: float | None = None
    last_eval_step: int = -1
    last_checkpoint_step: int = -1
    recent_losses: list[float] = field(default_factory=list)

    @property
    def position(self) -> DataPosition:
        return DataPosition(self.epoch, self.micro_batch)

    @property
    def train_loss(self) -> float | None:
        return sum(self.recent_losses) / len(self.recent_losses) if self.recent_losses else None


# --- helpers --------------------------------------------------------------------------------------


def make_optimizer(model: torch.nn.Module, cfg: TrainingConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on biases and norm gains); fused when possible."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    kwargs: dict[str, Any] = {"lr": cfg.learning_rate, "betas": (cfg.beta1, cfg.beta2)}
    if device.type in ("cuda", "cpu"):
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except (RuntimeError, TypeError):
            pass
    return torch.optim.AdamW(groups, foreach=True, **kwargs)


def use_bf16(cfg: TrainingConfig, device: torch.device) -> bool:
    """bf16 autocast only on CUDA that supports it; CPU always trains in fp32."""
    return device.type == "cuda" and cfg.precision in ("auto", "bf16") and torch.cuda.is_bf16_supported()


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over trained positions (labels are aligned with inputs)."""
    vocab = logits.shape[-1]
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, vocab).float(),
        labels[:, 1:].reshape(-1),
        ignore_index=IGNORE,
        reduction="sum",
    )


def trained_positions(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != IGNORE).sum())


# --- the trainer ----------------------------------------------------------------------------------


class Trainer:
    def __init__(
        self,
        model: torch.nn.Module,
        cfg: TrainingConfig,
        train: list[Example],
        val: list[Example],
        pad_id: int,
        device: torch.device,
    ) -> None:
        self.model, self.cfg, self.train_set, self.val_set = model, cfg, train, val
        self.pad_id, self.device = pad_id, device
        self.batches = Batches(len(train), cfg.batch_size, cfg.seed)
        self.total_steps = total_steps(cfg.max_steps, cfg.epochs, self.batches.per_epoch, cfg.grad_accum)
        self.optimizer = make_optimizer(model, cfg, device)
        self.bf16 = use_bf16(cfg, device)
        self.state = TrainState()
        self._phase = ""

    # resume
    def state_dict(self) -> dict[str, Any]:
        return {
            "trainer": asdict(self.state),
            "optimizer": self.optimizer.state_dict(),
            "rng": rng.capture(),
            "schedule": {"kind": "warmup_cosine", "total_steps": self.total_steps},
            "data": self._data_shape(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state_dict()``; refuses a state whose data or schedule differ from this run's."""
        saved = {**state["data"], "total_steps": state["schedule"]["total_steps"]}
        mine = {**self._data_shape(), "total_steps": self.total_steps}
        if saved != mine:
            raise CheckpointError(f"checkpoint was made for {saved}, this run has {mine}: data or settings changed")
        self.state = TrainState(**state["trainer"])
        self.optimizer.load_state_dict(state["optimizer"])
        rng.restore(state["rng"])

    def _data_shape(self) -> dict[str, int]:
        return {"n_train": len(self.train_set), "n_val": len(self.val_set), "batch_size": self.cfg.batch_size}

    # the loop
    def run(
        self,
        emit: Callable[[Event], None],
        should_stop: Callable[[], bool],
        save_checkpoint: Callable[[], Path],
    ) -> Outcome:
        s, cfg = self.state, self.cfg
        started = time.time()
        while True:
            # 1. learning rate of the step about to run
            lr = lr_at(s.step, self.total_steps, cfg.learning_rate, cfg.warmup_ratio, cfg.min_lr_ratio)
            # 2. evaluate and checkpoint at this step boundary
            if self._eval_due():
                self._evaluate(emit)
            if self._checkpoint_due():
                self._checkpoint(emit, save_checkpoint)
            if s.step >= self.total_steps:
                return "completed"
            if should_stop():
                if s.step > 0 and s.last_checkpoint_step != s.step:
                    self._checkpoint(emit, save_checkpoint)
                return "interrupted"
            # 3. one optimizer step
            self._set_phase(emit, "training")
            t0 = time.time()
            loss, grad_norm, tokens = self._optimizer_step(lr)
            dt = max(time.time() - t0, 1e-9)
            s.step += 1
            s.tokens_seen += tokens
            s.recent_losses = [*s.recent_losses, loss][-RECENT_LOSSES:]
            # 4. log
            epoch = s.epoch + s.micro_batch / self.batches.per_epoch
            emit(
                StepEvent(
                    s.step, self.total_steps, loss, lr, grad_norm, tokens, tokens / dt, epoch, time.time() - started
                )
            )

    def _optimizer_step(self, lr: float) -> tuple[float, float, int]:
        """One optimizer step over grad_accum micro-batches; loss normalised by all trained tokens."""
        s, model = self.state, self.model
        model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        micro, pos = [], s.position
        for _ in range(self.cfg.grad_accum):
            indices, pos = self.batches.take(pos)
            micro.append(collate([self.train_set[i] for i in indices], self.pad_id))
        n_trained = sum(trained_positions(b["labels"]) for b in micro)
        loss_sum = torch.zeros((), device=self.device)
        tokens = 0
        for batch in micro:
            b = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            with self._autocast():
                logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            loss = token_loss_sum(logits, b["labels"]) / n_trained
            loss.backward()
            loss_sum += loss.detach()
            tokens += int(batch["attention_mask"].sum())
        params = [p for p in model.parameters() if p.grad is not None]
        grads = [p.grad for p in params if p.grad is not None]
        if self.cfg.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm(grads)
        loss_value, norm_value = float(loss_sum), float(norm)
        if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
            raise TrainingDiverged(
                f"step {s.step + 1}: loss {loss_value}, gradient norm {norm_value}; "
                "lower learning_rate or check the data"
            )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        s.epoch, s.micro_batch = pos.epoch, pos.index
        return loss_value, norm_value, tokens

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss per trained token over the whole validation set."""
        self.model.eval()
        total, count = 0.0, 0
        size = self.cfg.batch_size
        for i in range(0, len(self.val_set), size):
            batch = collate(self.val_set[i : i + size], self.pad_id)
            b = {k: v.to(self.device) for k, v in batch.items()}
            with self._autocast():
                logits = self.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            total += float(token_loss_sum(logits, b["labels"]))
            count += trained_positions(batch["labels"])
        self.model.train()
        return total / max(count, 1)

    # boundaries
    def _eval_due(self) -> bool:
        s, every = self.state, self.cfg.eval_every
        if not self.val_set or s.last_eval_step == s.step:
            return False
        return s.step == 0 or s.step >= self.total_steps or (every > 0 and s.step % every == 0)

    def _checkpoint_due(self) -> bool:
        s, every = self.state, self.cfg.checkpoint_every
        if s.step == 0 or s.last_checkpoint_step == s.step:
            return False
        return s.step >= self.total_steps or (every > 0 and s.step % every == 0)

    def _evaluate(self, emit: Callable[[Event], None]) -> None:
        s = self.state
        self._set_phase(emit, "evaluating")
        val = self.evaluate()
        s.last_eval_step, s.last_val_loss = s.step, val
        if s.step == 0:
            s.first_val_loss = val
        if s.best_val_loss is None or val < s.best_val_loss:
            s.best_val_loss = val
        emit(EvalEvent(s.step, val))

    def _checkpoint(self, emit: Callable[[Event], None], save_checkpoint: Callable[[], Path]) -> None:
        self._set_phase(emit, "checkpointing")
        self.state.last_checkpoint_step = self.state.step  # recorded inside the checkpoint itself
        path = save_checkpoint()
        emit(CheckpointEvent(self.state.step, path))

    def _set_phase(self, emit: Callable[[Event], None], phase: str) -> None:
        if phase != self._phase:
            self._phase = phase
            emit(PhaseEvent(phase, self.state.step))

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.bf16:
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()
