"""The training loop: nanoGPT's order (lr, eval/checkpoint, step, log), readable in one sitting.

The engine knows nothing of files, the DB or HTTP. It reports through ``emit`` (events below),
asks ``should_stop()`` at every step boundary, and saves through a ``save_checkpoint()`` callable
the worker supplies. Everything a resumed run needs to continue bit for bit (step, data position,
optimizer, RNG, losses, micro-batch) is in ``Trainer.state_dict()``; the lr is a pure function of the step.

When things go wrong the loop repairs what it can and says so (``WarningEvent``):
- out of memory in a step: gradients dropped, RNG rewound, the micro-batch halved and the step
  retried; accumulation grows to match, so the effective batch and the data order are unchanged
  (the data position counts configured micro-batches of ``batch_size`` examples; a smaller
  micro-batch splits each of them). At micro-batch 1: ``OutOfMemory``. In evaluation only the
  evaluation batch shrinks.
- a NaN/Inf loss or gradient norm: the update is skipped (the data moves on); ``nan_max_skips``
  skips within ``NAN_WINDOW`` steps roll back to the last good checkpoint (``restore()``, supplied by
  the worker) with the learning rate scaled by ``nan_lr_factor``; past ``nan_max_rollbacks``:
  ``TrainingDiverged``. Weights are checked before every checkpoint: non-finite ones are never saved.

``engine = "hybrid"`` adds ``core.hybrid.HybridEngine`` (``self.hybrid``): at a step boundary it may
take a verified weight-extrapolation jump in place of the step (accepted jumps advance the step
counter, so evaluation and checkpoints fall due when the step crosses a multiple, not only on it);
after each applied step it snapshots and checks. Its state is part of ``state_dict()``.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from core import rng, sharding
from core.data import Batches, DataPosition, collate, model_inputs, real_tokens, total_steps
from core.distributed import Dist
from core.encode import IGNORE, Example
from core.errors import CheckpointError, OutOfMemory, TrainingDiverged
from core.faults import Faults
from core.health import Alert, HealthMonitor
from core.hybrid.engine import HybridEngine
from core.hybrid.events import JumpEvent, RollbackEvent
from core.preflight import free_memory, memory_snapshot
from core.schedule import lr_at, warmup_steps
from trainbox.config import TrainingConfig

RECENT_LOSSES = 10  # the final train loss is the mean of this many last step losses
NAN_WINDOW = 25  # skipped steps count towards a rollback for this many steps
MAX_OVERFLOWS = 30  # fp16 overflows in a row (the scale halved each time) before it counts as a real NaN/Inf
NAN_LOG = 20  # non-finite steps remembered for the diagnosis
INJECTED_OOM = "CUDA out of memory (injected by TRAINBOX_TEST_FAULT)"

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
    skipped: bool = False  # non-finite loss or gradient: the update was not applied
    micro_batch: int = 0  # examples per forward pass this step ran with
    grad_accum: int = 0  # forward passes per optimizer step
    # the hybrid engine ("" / defaults with the plain one)
    phase: str = ""  # engine phase the step ran in: warmup, full, predict, plain
    predicted: bool = False  # a jump: `advanced` steps with no backward pass; loss is the probe loss
    advanced: int = 1  # schedule steps this event covers
    backward_skipped: int = 0  # backward passes skipped so far
    speedup_estimate: float | None = None  # running estimate over plain steps (HybridEngine.speedup_estimate)
    time_saved_s: float | None = None  # estimated seconds saved so far, negative when lost (HybridEngine)


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


@dataclass(frozen=True)
class WarningEvent:
    """Something a person should know: an early warning (core.health) or a repair the loop made
    (oom_backoff, eval_oom_backoff, rollback)."""

    step: int
    kind: str
    message: str
    data: dict[str, Any] = field(default_factory=dict)


Event = StepEvent | EvalEvent | CheckpointEvent | PhaseEvent | WarningEvent | JumpEvent | RollbackEvent
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
    micro_size: int = 0  # examples per forward pass; 0: batch_size. Halved on OOM (kept over rollbacks)
    eval_size: int = 0  # examples per evaluation forward pass; 0: batch_size. Halved on evaluation OOM
    lr_scale: float = 1.0  # multiplied by nan_lr_factor at each NaN rollback
    rollbacks: int = 0  # NaN rollbacks so far
    ooms: int = 0  # OOM back-offs so far
    skipped: list[int] = field(default_factory=list)  # recent steps whose update was skipped (non-finite)
    skips_since: int = 0  # only skips after this step count towards a rollback (the last rollback's step)
    nan_log: list[dict[str, Any]] = field(default_factory=list)  # non-finite steps, for the diagnosis
    overflows: int = 0  # fp16 gradient overflows in a row (each halves the loss scale and reruns the step)
    stop_reason: str = ""  # set when training ends early on purpose (overfitting)

    @property
    def position(self) -> DataPosition:
        return DataPosition(self.epoch, self.micro_batch)

    @property
    def train_loss(self) -> float | None:
        return sum(self.recent_losses) / len(self.recent_losses) if self.recent_losses else None


# Survive a rollback: what the run learnt about the machine and the instability, not the weights' timeline.
STICKY = ("micro_size", "eval_size", "lr_scale", "rollbacks", "ooms", "nan_log")


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


def enable_gradient_checkpointing(model: Any) -> None:
    """Hugging Face gradient checkpointing (non-reentrant: correct with frozen inputs and under DDP). A
    LoRA model's embeddings are frozen, so their output is made to require grad, as peft does."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    model.config.use_cache = False


def autocast_dtype(precision: str, device_type: str, bf16_supported: bool) -> torch.dtype | None:
    """The autocast dtype (None: fp32). auto: bf16 on a GPU that has it; fp16 on one that does not (before
    Ampere), where a gradient scaler keeps small gradients from flushing to zero; fp32 on the CPU, where
    half precision is slower. An explicit fp16 is honoured anywhere (the CPU too: it tests the scaler path)."""
    if precision == "fp16":
        return torch.float16
    if device_type != "cuda" or precision == "fp32":
        return None
    if bf16_supported:
        return torch.bfloat16
    return torch.float16 if precision == "auto" else None  # bf16 asked where missing: preflight refuses


def amp_dtype(cfg: TrainingConfig, device: torch.device) -> torch.dtype | None:
    bf16_supported = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return autocast_dtype(cfg.precision, device.type, bf16_supported)


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over trained positions (labels are aligned with inputs). The labels
    are shifted, not the logits: slicing the logits (batch x length x vocab, the largest activation) would
    copy them, and again in backward (measured: 131 vs 82 ms per micro-batch of 4 x 64 on SmolLM2)."""
    vocab = logits.shape[-1]
    shifted = F.pad(labels[:, 1:], (0, 1), value=IGNORE)
    return F.cross_entropy(logits.reshape(-1, vocab).float(), shifted.reshape(-1), ignore_index=IGNORE, reduction="sum")


def trained_positions(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != IGNORE).sum())


def example_trained(e: Example) -> int:
    """``trained_positions`` of one example, without collating it."""
    return sum(1 for label in e.labels[1:] if label != IGNORE)


def torch_rng() -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The generators a forward/backward pass can draw from (dropout): rewound for a retried step."""
    return torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []


def set_torch_rng(state: tuple[torch.Tensor, list[torch.Tensor]]) -> None:
    torch.set_rng_state(state[0])
    if state[1]:
        torch.cuda.set_rng_state_all(state[1])


def chunks(items: Sequence[int], size: int) -> list[list[int]]:
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def crossed(step: int, last: int, every: int) -> bool:
    """Whether a multiple of ``every`` lies in (last, step]: with steps of 1, the same as step % every == 0."""
    return every > 0 and step // every > max(last, 0) // every


def first_line(e: BaseException) -> str:
    text = str(e)
    return text.splitlines()[0] if text else type(e).__name__


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
        faults: Faults | None = None,
        dist: Dist | None = None,
    ) -> None:
        self.model, self.cfg, self.train_set, self.val_set = model, cfg, train, val
        self.dist = dist or Dist()  # several processes: each trains its share of every global step
        self.sharded = sharding.is_sharded(model)  # FSDP (core.sharding): collectives inside every forward
        self.pad_id, self.device = pad_id, device
        self.batches = Batches(len(train), cfg.batch_size, cfg.seed)
        self.total_steps = total_steps(cfg.max_steps, cfg.epochs, self.batches.per_epoch, cfg.grad_accum)
        self.optimizer = make_optimizer(model, cfg, device)
        self.amp_dtype = amp_dtype(cfg, device)
        self.bf16 = self.amp_dtype == torch.bfloat16
        self.half = self.amp_dtype is not None  # 16-bit activations (the memory estimate)
        self.scaler = self._make_scaler()
        self._unscaled = False  # the scaler unscaled this step's gradients and awaits its update
        self.state = TrainState()
        self.health = HealthMonitor(patience=cfg.overfit_patience)
        self.faults = faults or Faults()
        self.restore: Callable[[], None] | None = None  # set by run(): back to the last good checkpoint
        self._emit: Callable[[Event], None] = lambda e: None
        self._phase = ""
        self.hybrid = self._make_hybrid()

    def _make_scaler(self) -> torch.amp.GradScaler | None:
        """fp16 only: the loss is scaled up before backward so small gradients survive in fp16, and a step
        whose gradients overflowed is run again at a halved scale (``_optimizer_step``)."""
        return torch.amp.GradScaler(self.device.type) if self.amp_dtype == torch.float16 else None

    def _make_hybrid(self) -> HybridEngine | None:
        if self.cfg.engine != "hybrid":
            return None
        n = min(len(self.train_set), self.cfg.hybrid.probe_examples)
        probe = random.Random(self.cfg.seed).sample(self.train_set, n)  # fixed training examples
        return HybridEngine(self, self.cfg.hybrid, probe)

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

    def lr(self) -> float:
        s, cfg = self.state, self.cfg
        return lr_at(s.step, self.total_steps, cfg.learning_rate, cfg.warmup_ratio, cfg.min_lr_ratio) * s.lr_scale

    # resume
    def state_dict(self) -> dict[str, Any]:
        """Sharded, the optimizer's full state is gathered (unsharded format): every rank must call this."""
        return {
            "trainer": asdict(self.state),
            "optimizer": (
                sharding.full_optimizer_state(self.model, self.optimizer)
                if self.sharded
                else self.optimizer.state_dict()
            ),
            "rng": rng.capture(),
            "schedule": {"kind": "warmup_cosine", "total_steps": self.total_steps},
            "data": self._data_shape(),
            "health": self.health.state_dict(),
            **({"hybrid": self.hybrid.state_dict()} if self.hybrid is not None else {}),
            **({"scaler": self.scaler.state_dict()} if self.scaler is not None else {}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state_dict()``; refuses a state whose data or schedule differ from this run's."""
        saved = {**state["data"], "total_steps": state["schedule"]["total_steps"]}
        mine = {**self._data_shape(), "total_steps": self.total_steps}
        if saved != mine:
            raise CheckpointError(f"checkpoint was made for {saved}, this run has {mine}: data or settings changed")
        self.state = TrainState(**state["trainer"])
        if self.sharded:  # the full (unsharded-format) state on every rank; each keeps its shard
            sharding.load_optimizer_state(self.model, self.optimizer, state["optimizer"])
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        rng.restore(state["rng"])
        if "health" in state:
            self.health.load_state_dict(state["health"])
        if self.hybrid is not None and "hybrid" in state:
            self.hybrid.load_state_dict(state["hybrid"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    def reset(self) -> None:
        """Back to step 0 (the caller reloads the initial weights): fresh optimizer, counters, RNG."""
        self.optimizer = make_optimizer(self.model, self.cfg, self.device)
        self.state = TrainState()
        self.health = HealthMonitor(patience=self.cfg.overfit_patience)
        self.hybrid = self._make_hybrid()
        self.scaler = self._make_scaler()
        rng.seed_all(self.cfg.seed)

    def _data_shape(self) -> dict[str, int]:
        return {"n_train": len(self.train_set), "n_val": len(self.val_set), "batch_size": self.cfg.batch_size}

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
        s = self.state
        self._emit, self.restore = emit, restore
        started = time.time()
        while True:
            s = self.state  # a rollback replaces it
            # 1. learning rate of the step about to run
            lr = self.lr()
            # 2. evaluate and checkpoint at this step boundary
            if self._eval_due():
                self._evaluate(emit)
            if self._checkpoint_due() and not self._checkpoint(emit, save_checkpoint):
                continue  # refused (non-finite weights) and rolled back
            if s.step >= self.total_steps or s.stop_reason:
                return "completed"
            if should_stop():
                if s.step > 0 and s.last_checkpoint_step != s.step:
                    self._checkpoint(emit, save_checkpoint)
                return "interrupted"
            # 3. one optimizer step, or a hybrid jump in its place
            self._set_phase(emit, "training")
            if self.hybrid is not None and self.hybrid.wants_jump():
                self._jump(emit, lr, started)
                continue
            engine_phase = self.hybrid.phase if self.hybrid is not None else ""
            self.faults.hang("training", s.step + 1)
            t0 = time.time()
            result = self._optimizer_step(lr)
            if result is None:
                continue  # out of memory: backed off (and maybe rolled back); the step runs again
            loss, grad_norm, tokens, skipped = result
            # the hybrid engine compares its overhead with this: on a GPU, wait for the step's queued kernels
            dt = max((self.hybrid.clock() if self.hybrid is not None else time.time()) - t0, 1e-9)
            s.step += 1
            s.tokens_seen += tokens
            if skipped:
                self._on_skipped(s.step, loss, grad_norm, lr)
            else:
                s.recent_losses = [*s.recent_losses, loss][-RECENT_LOSSES:]
                if self.hybrid is not None:
                    self.hybrid.after_real_step(loss, grad_norm, dt, emit)
            # 4. log
            epoch = s.epoch + s.micro_batch / self.batches.per_epoch
            emit(
                StepEvent(
                    s.step,
                    self.total_steps,
                    loss,
                    lr,
                    grad_norm,
                    tokens,
                    tokens / dt,
                    epoch,
                    time.time() - started,
                    skipped,
                    self.micro_batch_size,
                    self.accum_steps,
                    **self._engine_fields(engine_phase, predicted=False, advanced=1),
                )
            )
            warmup_done = s.step > warmup_steps(self.total_steps, self.cfg.warmup_ratio)
            self._warn(
                self.health.on_step(s.step, self.total_steps, loss, grad_norm, lr, self.cfg.learning_rate, warmup_done)
            )
            if skipped and self._too_many_skips():
                self._nan_rollback(f"{self.cfg.nan_max_skips} non-finite steps within {NAN_WINDOW}")

    def _jump(self, emit: Callable[[Event], None], lr: float, started: float) -> None:
        """A hybrid jump at this step boundary; an accepted one advances the step by what it earned (the data
        position stays: no batch was trained)."""
        assert self.hybrid is not None
        s = self.state
        jump = self.hybrid.jump(emit)
        if jump.advanced <= 0:
            return
        s.step += jump.advanced
        emit(
            StepEvent(
                s.step,
                self.total_steps,
                jump.probe_after,
                lr,
                0.0,
                0,
                0.0,
                s.epoch + s.micro_batch / self.batches.per_epoch,
                time.time() - started,
                **self._engine_fields("predict", predicted=True, advanced=jump.advanced),
            )
        )

    def _engine_fields(self, phase: str, predicted: bool, advanced: int) -> dict[str, Any]:
        if self.hybrid is None:
            return {}
        return {
            "phase": phase,
            "predicted": predicted,
            "advanced": advanced,
            "backward_skipped": self.hybrid.counters.backward_skipped,
            "speedup_estimate": self.hybrid.speedup_estimate(),
            "time_saved_s": self.hybrid.time_saved_s(),
        }

    def _optimizer_step(self, lr: float) -> tuple[float, float, int, bool] | None:
        """One optimizer step over grad_accum configured micro-batches, each split into forward passes
        of ``micro_batch_size``; loss normalised by all trained tokens of the step. Returns (loss,
        grad norm, tokens, skipped), or None after an out-of-memory back-off (nothing applied)."""
        s, model = self.state, self.model
        step = s.step + 1
        model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        micro, pos, n_trained, padding = [], s.position, 0, 0
        for _ in range(self.cfg.grad_accum):
            indices, pos = self.batches.take(pos)
            if self.dist.active:  # the whole global step's tokens normalise the loss on every rank
                n_trained += sum(example_trained(self.train_set[i]) for i in indices)
            for part in chunks(self.dist.shard(indices), self.micro_batch_size):
                micro.append(collate([self.train_set[i] for i in part], self.pad_id, self.cfg.packing))
            if self.sharded:  # FSDP's collectives need the same forward passes on every rank
                padding += sharding.padding(len(indices), self.dist.world, self.dist.rank, self.micro_batch_size)
        if padding:  # real forward+backward passes (FSDP's gathers and reduce-scatters run in them) on one of the
            # step's examples with every label ignored: they add nothing to the loss, gradients or token count
            dummy = collate([self.train_set[indices[0]]], self.pad_id, self.cfg.packing)
            micro += [sharding.zero_loss(dummy)] * padding
        if not self.dist.active:
            n_trained = sum(trained_positions(b["labels"]) for b in micro)
        inject_oom, inject_nan = self.faults.fire("oom", step), self.faults.fire("nan", step)
        rng_before = torch_rng()
        oom = ""
        try:
            loss_value, norm_value, tokens = self._accumulate(micro, n_trained, inject_oom, inject_nan, padding)
        except torch.OutOfMemoryError as e:
            oom = first_line(e)  # keep no reference: the traceback holds the activations
        if oom:
            self._scaler_update()
            self.optimizer.zero_grad(set_to_none=True)
            free_memory(self.device)
            set_torch_rng(rng_before)
            self._back_off(oom, step)
            return None
        if self._overflowed(loss_value, norm_value):
            self.optimizer.zero_grad(set_to_none=True)
            set_torch_rng(rng_before)
            return None  # fp16 overflow: the scaler halved its scale; the same step runs again
        if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
            self._scaler_update()
            self.optimizer.zero_grad(set_to_none=True)  # never reaches the weights
            s.epoch, s.micro_batch = pos.epoch, pos.index
            return loss_value, norm_value, tokens, True
        try:
            if self.scaler is not None:
                self.scaler.step(self.optimizer)  # the gradients are finite: it steps
                self._scaler_update()
                s.overflows = 0
            else:
                self.optimizer.step()
        except torch.OutOfMemoryError as e:
            oom = first_line(e)
        if self.dist.any_flag(bool(oom)) and not oom:
            oom = "out of memory on another rank"
        if oom:  # the update may be half-applied: back off, then start again from the last checkpoint
            self._scaler_update()
            self.optimizer.zero_grad(set_to_none=True)
            free_memory(self.device)
            self._back_off(oom, step)
            self._rollback(f"out of memory in the optimizer update of step {step}")
            return None
        self.optimizer.zero_grad(set_to_none=True)
        if self.faults.fire("nanweight", step):
            with torch.no_grad():
                sharding.local(next(model.parameters())).view(-1)[0] = math.nan
        s.epoch, s.micro_batch = pos.epoch, pos.index
        return loss_value, norm_value, tokens, False

    def _accumulate(
        self,
        micro: list[dict[str, torch.Tensor]],
        n_trained: int,
        inject_oom: bool,
        inject_nan: bool,
        padding: int = 0,
    ) -> tuple[float, float, int]:
        """Forward and backward over the step's forward passes, the last ``padding`` of them zero-loss ones
        (sharded: see core.sharding); returns (loss, grad norm, tokens)."""
        loss_sum = torch.zeros((), device=self.device)
        tokens = 0
        oom = ""  # with several ranks an OOM is agreed on before the gradients are summed
        try:
            if inject_oom and not micro:
                raise torch.cuda.OutOfMemoryError(INJECTED_OOM)
            for i, batch in enumerate(micro):
                if inject_oom and i == min(1, len(micro) - 1):  # after a backward when there is one
                    raise torch.cuda.OutOfMemoryError(INJECTED_OOM)
                with self._autocast():
                    logits = self.model(**model_inputs(batch, self.device)).logits
                loss = token_loss_sum(logits, batch["labels"].to(self.device)) / n_trained
                del logits  # not held through backward and into the next forward pass
                if inject_nan and i == 0:
                    loss = loss * math.nan
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
                loss_sum += loss.detach()
                if i < len(micro) - padding:
                    tokens += real_tokens(batch)
        except torch.OutOfMemoryError as e:
            if not self.dist.active or self.sharded:  # sharded: the other ranks wait inside a collective
                raise
            oom = first_line(e)
        if self.dist.active:  # one all-reduce per optimizer step, after all the accumulation
            if self.dist.any_flag(bool(oom)):
                raise torch.cuda.OutOfMemoryError(oom or "out of memory on another rank")
            if not self.sharded:  # FSDP already summed them (reduce-scatter after each backward)
                self.dist.sum_grads(self.model.parameters())
            loss_total, tokens_total = self.dist.sum_values([float(loss_sum), float(tokens)])
            loss_sum, tokens = torch.tensor(loss_total, device=self.device), int(tokens_total)
        if self.scaler is not None:  # the true gradients, before clipping and the norm
            self.scaler.unscale_(self.optimizer)
            self._unscaled = True
        params = [p for p in self.model.parameters() if p.grad is not None]
        grads = [p.grad for p in params if p.grad is not None]
        if self.cfg.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm(grads)
        return float(loss_sum), float(sharding.full(norm)), tokens

    def evaluate(self) -> float:
        """Mean loss per trained token over the whole validation set."""
        size = self.state.eval_size or self.cfg.batch_size
        if self.faults.fire("evaloom", self.state.step) and self.val_set:
            raise torch.cuda.OutOfMemoryError(INJECTED_OOM)
        packed, n = self.cfg.packing, len(self.val_set)
        batches = (collate(self.val_set[i : i + size], self.pad_id, packed) for i in range(0, n, size))
        loss = self.mean_loss(batches)
        self.model.train()
        return loss

    @torch.no_grad()
    def mean_loss(self, batches: Iterable[dict[str, torch.Tensor]]) -> float:
        """Mean loss per trained token over collated batches, no gradient (evaluation, the hybrid probe)."""
        was_training = self.model.training
        self.model.eval()
        total, count = 0.0, 0
        for batch in batches:
            with self._autocast():
                logits = self.model(**model_inputs(batch, self.device)).logits
            total += float(token_loss_sum(logits, batch["labels"].to(self.device)))
            count += trained_positions(batch["labels"])
        self.model.train(was_training)
        return total / max(count, 1)

    # repairs
    def _back_off(self, error: str, step: int) -> None:
        """Halve the micro-batch after an OOM (accumulation grows to keep the effective batch)."""
        s, old = self.state, self.micro_batch_size
        if old <= 1 or self.sharded:
            raise self._oom_failure(error, step, "training", old)
        s.micro_size, s.ooms = max(1, old // 2), s.ooms + 1
        self._warn_one(
            "oom_backoff",
            f"out of memory at micro-batch {old} in step {step}: retrying with micro-batch {self.micro_batch_size} "
            f"x {self.accum_steps} accumulation (effective batch {self.effective_batch} unchanged)",
            error=error,
            from_micro_batch=old,
            micro_batch=self.micro_batch_size,
            grad_accum=self.accum_steps,
            effective_batch=self.effective_batch,
        )

    def _oom_failure(self, error: str, step: int, phase: str, size: int) -> OutOfMemory:
        where = "evaluation batch" if phase == "evaluating" else "micro-batch"
        # sharded, one rank cannot retry alone (the others wait inside FSDP's collectives): no back-off
        at = f"at {where} {size} with sharding 'fsdp' (no back-off)" if self.sharded else f"even at {where} {size}"
        return OutOfMemory(
            f"out of memory in {phase} at step {step} {at} with max_length {self.cfg.max_length}",
            evidence={
                "error": error,
                "phase": phase,
                "step": step,
                "micro_batch": self.micro_batch_size,
                "eval_batch": self.state.eval_size or self.cfg.batch_size,
                "max_length": self.cfg.max_length,
                "device": str(self.device),
                "bf16": self.bf16,
                **memory_snapshot(self.device),
            },
            fix=(
                f"lower max_length (now {self.cfg.max_length}) or batch_size, set gradient_checkpointing = true, "
                "shard across more processes (nproc), or free the GPU of other processes"
                if self.sharded
                else f"lower max_length (now {self.cfg.max_length}), use LoRA or a smaller model, "
                "or free the GPU of other processes"
            ),
        )

    def _on_skipped(self, step: int, loss: float, grad_norm: float, lr: float) -> None:
        s = self.state
        s.skipped = [*[x for x in s.skipped if x > step - NAN_WINDOW], step]
        entry = {"step": step, "loss": str(loss), "grad_norm": str(grad_norm), "lr": lr}
        s.nan_log = [*s.nan_log, entry][-NAN_LOG:]

    def _too_many_skips(self) -> bool:
        s = self.state
        recent = [x for x in s.skipped if x > max(s.step - NAN_WINDOW, s.skips_since)]
        return len(recent) >= self.cfg.nan_max_skips

    def _nan_rollback(self, reason: str) -> None:
        s, cfg = self.state, self.cfg
        if s.rollbacks >= cfg.nan_max_rollbacks:
            raise TrainingDiverged(
                f"training diverged: {reason}, after {s.rollbacks} rollback(s) with the learning rate "
                f"scaled to {s.lr_scale:g}x",
                evidence={
                    "step": s.step,
                    "rollbacks": s.rollbacks,
                    "lr_scale": s.lr_scale,
                    "lr": self.lr(),
                    "peak_lr": cfg.learning_rate,
                    "non_finite_steps": s.nan_log,
                    "recent_losses": s.recent_losses,
                },
                fix=f"lower learning_rate (peak {cfg.learning_rate:g}), check the data for degenerate or extremely "
                "long examples, or use precision = 'fp32'",
            )
        s.rollbacks += 1
        s.lr_scale *= cfg.nan_lr_factor
        self._rollback(reason)

    def _rollback(self, reason: str) -> None:
        """Back to the last good checkpoint (or the start), keeping what was learnt about the machine
        and the instability (``STICKY``)."""
        s = self.state
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
            setattr(self.state, k, v)
        self.state.skips_since = self.state.step
        if self.hybrid is not None:
            self.hybrid.reset_trajectory()
        self._warn_one(
            "rollback",
            f"{reason}: rolled back from step {from_step} to step {self.state.step}, "
            f"learning rate now {self.state.lr_scale:g}x",
            from_step=from_step,
            to_step=self.state.step,
            lr_scale=self.state.lr_scale,
            rollbacks=self.state.rollbacks,
        )

    def _weights_finite(self) -> bool:
        """Sharded, each rank checks its shards and the ranks agree (a collective)."""
        flags = [torch.isfinite(sharding.local(p)).all() for p in self.model.parameters()]
        finite = bool(torch.stack(flags).all()) if flags else True
        return not self.dist.any_flag(not finite) if self.sharded else finite

    # boundaries: "crossed a multiple of every since the last one", since a hybrid jump advances several steps
    def _eval_due(self) -> bool:
        s, every = self.state, self.cfg.eval_every
        if not self.val_set or s.last_eval_step == s.step:
            return False
        return s.step == 0 or s.step >= self.total_steps or crossed(s.step, s.last_eval_step, every)

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
            size = s.eval_size or self.cfg.batch_size
            if size <= 1 or self.sharded:
                raise self._oom_failure(oom, s.step, "evaluating", size)
            s.eval_size = size // 2
            self._warn_one(
                "eval_oom_backoff",
                f"out of memory evaluating at batch {size}: retrying with batch {s.eval_size} (training unchanged)",
                error=oom,
                from_eval_batch=size,
                eval_batch=s.eval_size,
            )
        s.last_eval_step, s.last_val_loss = s.step, val
        if s.step == 0:
            s.first_val_loss = val
        if s.best_val_loss is None or val < s.best_val_loss:
            s.best_val_loss = val
        emit(EvalEvent(s.step, val))
        if s.step > 0:
            alerts = self.health.on_eval(s.step, val, s.train_loss)
            self._warn(alerts)
            if self.cfg.early_stop_on_overfit and any(a.kind == "overfitting" for a in alerts):
                s.stop_reason = f"stopped early at step {s.step}: " + next(
                    a.message for a in alerts if a.kind == "overfitting"
                )

    def _checkpoint(self, emit: Callable[[Event], None], save_checkpoint: Callable[[], Path]) -> bool:
        """Save at this boundary; False when the weights are not finite (then rolled back instead)."""
        self._set_phase(emit, "checkpointing")
        if not self._weights_finite():
            self._warn_one("non_finite", f"step {self.state.step}: non-finite weights; not saved")
            self._nan_rollback(f"non-finite weights at step {self.state.step}")
            return False
        self.faults.hang("checkpointing", self.state.step)
        self.state.last_checkpoint_step = self.state.step  # recorded inside the checkpoint itself
        path = save_checkpoint()
        emit(CheckpointEvent(self.state.step, path))
        return True

    def _warn(self, alerts: list[Alert]) -> None:
        for a in alerts:
            self._emit(WarningEvent(a.step, a.kind, a.message, a.data))

    def _warn_one(self, kind: str, message: str, **data: Any) -> None:
        self._emit(WarningEvent(self.state.step, kind, message, data))

    def _set_phase(self, emit: Callable[[Event], None], phase: str) -> None:
        if phase != self._phase:
            self._phase = phase
            emit(PhaseEvent(phase, self.state.step))

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.amp_dtype is not None:
            return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)
        return contextlib.nullcontext()

    def _overflowed(self, loss: float, norm: float) -> bool:
        """fp16: a finite loss with non-finite gradients is the scale's fault, not the model's; the scaler
        halves it. Only after MAX_OVERFLOWS in a row is the step treated as a real NaN/Inf (skip, rollback)."""
        if self.scaler is None or not math.isfinite(loss) or math.isfinite(norm):
            return False
        self._scaler_update()
        self.state.overflows += 1
        return self.state.overflows <= MAX_OVERFLOWS

    def _scaler_update(self) -> None:
        """End the scaler's step (it adjusts the scale) once its gradients were unscaled, whatever became of
        the step: the next step's unscale_ refuses to run before it."""
        if self.scaler is not None and self._unscaled:
            self.scaler.update()
            self._unscaled = False
