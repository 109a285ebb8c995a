"""One job's training in its own process: ``python -m core.worker --run-dir DIR``.

The daemon writes ``DIR/job.json`` (a JobSpec) and spawns this module; the worker reads the spec,
resumes from the newest complete checkpoint in ``DIR/checkpoints/`` if there is one, runs the
preflight checks (core.preflight), trains, and reports through ``DIR/metrics.jsonl``, the status
file, the model DB and its log (stdout/stderr). Its last act is ``DIR/result.json`` (a
WorkerResult), and the exit code says the same:
  0   completed: ``DIR/final/`` holds the trained model and tokenizer (an early stop on
      overfitting is completed too; the message says why)
  75  interrupted: SIGTERM/SIGINT (the newest checkpoint holds the progress; rerun to resume), or
      the disk is too full for the next save (``pause_reason = "disk full"``, ``failure_class =
      "disk"``, evidence needed vs free; nothing partial was written; rerun once there is space)
  1   failed: the traceback is on stderr; result.json has the message, the exception type and
      ``failure_class`` (bad_input, preflight, oom, nan, disk, crash), ``evidence`` and ``fix``
Every result carries ``micro_batch`` and ``grad_accum``: what the run ended with after any OOM
back-off (the effective batch, batch_size x grad_accum of the settings, never changes).

Signal handlers only set a flag; the training loop looks at it at every step boundary.

With ``training.nproc > 1`` the daemon starts this module under ``torchrun`` (core.distributed): every
rank trains its share of each global batch, the ranks agree on stopping at each step boundary, and rank 0
alone writes the status file, metrics, DB rows, checkpoints, result.json and the final model. With
``sharding = "fsdp"`` the model is sharded (core.sharding) and every save starts with a gather on every rank.

Test-only hooks, never set in production (inactive unless the variable is set):
- ``TRAINBOX_TEST_STEP_SLEEP`` (seconds, float) sleeps after every optimizer step so tests can
  catch a run in the middle.
- ``TRAINBOX_TEST_FAULT`` injects real failures at chosen steps: ``oom@5``, ``oom@5x3``, ``nan@7``,
  ``nanweight@8``, ``evaloom@10``, ``diskfull@20``, ``diskfree=BYTES``, ``hang@loading``,
  ``hang@training:5``, ``hang@evaluating:10``, ``hang@checkpointing:10``, comma-separated. See
  ``core/faults.py`` for the exact meaning of each.
"""

from __future__ import annotations

import argparse
import errno
import logging
import math
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from core import checkpoint, distributed, lora, rng, sharding
from core.data import read_records, split_heldout
from core.disk import DiskGuard, estimate_checkpoint_bytes, weights_bytes
from core.embedded import ensure_embedded_model
from core.encode import Example, encode_all, prepare_tokenizer
from core.errors import DataError, DiskFull, JobFailure, PreflightError, TrainingDiverged
from core.faults import Faults
from core.folders import publish_folder
from core.hybrid.engine import HybridEngine
from core.hybrid.events import JumpEvent, RollbackEvent
from core.metrics import METRICS, MetricsLog, truncate_to_step
from core.microbatch import CACHE_FILE, MicroBatchCache, cache_key
from core.preflight import check_lora_setup, check_lora_targets, check_sharding, raise_fatal, run_preflight
from core.reporting import JobDB, LoadingBeat, Progress, StatusReporter
from core.train import (
    CheckpointEvent,
    EvalEvent,
    Event,
    PhaseEvent,
    StepEvent,
    Trainer,
    WarningEvent,
    enable_gradient_checkpointing,
)
from trainbox.config import TrainingConfig, auto_learning_rate
from trainbox.jobspec import JobSpec, WorkerResult
from trainbox.states import EXIT_COMPLETED, EXIT_FAILED, EXIT_INTERRUPTED, WorkerOutcome

log = logging.getLogger("core.worker")

FINAL = "final"
STEP_SLEEP_ENV = "TRAINBOX_TEST_STEP_SLEEP"  # test-only, see module docstring
# Settings that may differ between the run that wrote a checkpoint and the one resuming it: how the
# machine runs and reports, not what is trained. Every other key comes from the checkpoint.
RUNTIME_KEYS = (
    "threads",
    "device",
    "precision",
    "log_every",
    "eval_every",
    "checkpoint_every",
    "keep_checkpoints",
    "disk_margin_mb",
    "gradient_checkpointing",  # the same numbers, less memory
    "nproc",  # the global batch is split across processes: the same run with any number of them
    "sharding",  # the same numbers and checkpoint format sharded or not (core.sharding)
)
LOG_PROGRESS_EVERY_S = 10.0
FINAL_EXTRA_BYTES = 16 * 1024**2  # tokenizer and config beside the weights
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


# --- process set-up -------------------------------------------------------------------------------


class StopFlag:
    """Set by SIGTERM/SIGINT; the handler does nothing else (no I/O, no locks)."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()


def thread_count(configured: int) -> int:
    """``training.threads``; 0 means $OMP_NUM_THREADS when set, else half the cores."""
    if configured > 0:
        return configured
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, (os.cpu_count() or 2) // 2)


def pick_device(cfg: TrainingConfig) -> torch.device:
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def describe_device(device: torch.device, threads: int) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.current_device()} ({torch.cuda.get_device_name()})"
    return f"cpu ({threads} thread{'s' if threads != 1 else ''})"


def resolve_config(spec_cfg: TrainingConfig, saved: dict[str, Any] | None) -> TrainingConfig:
    """A resumed run trains with its checkpoint's settings (exact continuation), except runtime keys."""
    if saved is None:
        return spec_cfg
    saved_cfg = TrainingConfig.model_validate(saved)
    cfg = saved_cfg.model_copy(update={k: getattr(spec_cfg, k) for k in RUNTIME_KEYS})
    changed = [
        k
        for k in TrainingConfig.model_fields
        if getattr(cfg, k) != getattr(spec_cfg, k) and not (k == "learning_rate" and spec_cfg.learning_rate == 0)
    ]
    if changed:
        log.warning("resuming with the checkpoint's settings; job.json differs in: %s", ", ".join(changed))
    return cfg


class RankStatus(StatusReporter):
    """A rank other than 0 keeps its status in memory only: rank 0 alone writes the status file."""

    def _write(self, now: float) -> None:
        pass


class RankDB(JobDB):
    """A rank other than 0 writes no DB rows."""

    def __init__(self, url: str, job_id: int) -> None:
        self.job_id, self.db = job_id, None


class RankMetrics(MetricsLog):
    """A rank other than 0 writes no metrics lines."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def truncate(self, step: int) -> None:
        pass

    def write(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


# --- loading --------------------------------------------------------------------------------------


def load_model(source: Path, device: torch.device, four_bit: bool = False) -> tuple[Any, Any]:
    """Model (fp32 master weights; bf16 happens in autocast) and tokenizer from a local folder. An
    adapter folder (a LoRA version) loads as its base with the adapter merged (core.lora). ``four_bit``:
    the QLoRA base, NF4 on the GPU (untested without a GPU)."""
    tokenizer = AutoTokenizer.from_pretrained(source)
    changes = prepare_tokenizer(tokenizer)
    if changes:
        log.info("tokenizer: %s", "; ".join(changes))
    if four_bit:
        if lora.is_adapter_folder(source):
            raise PreflightError(
                f"lora_4bit cannot quantize {source}: it is an adapter version, not a full model",
                evidence={"model": str(source)},
                fix="export it as a full model (trainbox models export V --out DIR) and set model = DIR",
            )
        model: Any = lora.load_4bit(source, device)
    else:
        model = lora.load_causal_lm(source, dtype=torch.float32).to(device)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


@dataclass
class DataSets:
    train: list[Example]
    val: list[Example]


def load_data(spec: JobSpec, cfg: TrainingConfig, tokenizer: Any, progress: Progress | None = None) -> DataSets:
    """Read, re-validate and encode the job's data. ``progress`` reports each stage with a heartbeat at
    a bounded interval: a file of millions of lines takes minutes here, longer than the watchdog's
    loading floor, and a worker that advances must not be judged hung."""
    progress = progress if progress is not None else Progress(None)
    progress.stage(f"reading {Path(spec.data_file).name}")
    records = read_records(Path(spec.data_file), progress.tick)
    if spec.eval_file:
        train_records = records
        progress.stage(f"reading {Path(spec.eval_file).name}")
        val_records = read_records(Path(spec.eval_file), progress.tick)[: cfg.eval_max_examples]
    else:
        train_records, val_records = split_heldout(records, cfg.eval_fraction, cfg.eval_max_examples, cfg.seed)
    progress.stage("encoding", len(train_records) + len(val_records))
    train = encode_all(tokenizer, train_records, cfg.max_length, progress.tick)
    val = encode_all(tokenizer, val_records, cfg.max_length, progress.tick)
    if train.dropped or val.dropped:
        log.warning(
            "dropped %d training and %d validation examples with nothing to train within max_length=%d",
            train.dropped,
            val.dropped,
            cfg.max_length,
        )
    if not train.examples:
        raise DataError(
            f"no training example has a trained token within max_length={cfg.max_length} "
            f"({train.dropped} dropped): raise max_length or shorten the prompts",
            evidence={"max_length": cfg.max_length, "dropped": train.dropped, "n_records": len(train_records)},
            fix=f"raise max_length (now {cfg.max_length}) or shorten the prompts so completions fit",
            failure_class="preflight",
        )
    log.info("data: %d training, %d validation examples", len(train.examples), len(val.examples))
    return DataSets(train.examples, val.examples)


def weights_finite(model: Any) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def full_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Any Hugging Face folder's weights as full CPU tensors by name (an adapter folder: merged on its base)."""
    if lora.is_adapter_folder(folder):
        return dict(lora.load_causal_lm(folder, dtype=torch.float32).state_dict())
    if any(Path(folder).glob("*.safetensors")):
        return checkpoint.read_weights(folder)
    return dict(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict())


def load_weights(model: Any, folder: Path) -> None:
    """Put a saved model's weights back into ``model`` (a rollback); any Hugging Face folder, or an
    adapter folder (into a LoRA model: the adapter; into a full one: the merged model). A sharded model:
    every rank reads the full weights and keeps its shard (a collective)."""
    if lora.is_adapter_folder(folder) and lora.is_peft(model):
        lora.load_adapter_folder(model, folder)
        return
    weights = full_weights(folder)
    if sharding.is_sharded(model):
        sharding.load_weights(model, weights)
    else:
        checkpoint.apply_weights(model, weights, folder)


def save_final(run_dir: Path, model: Any, tokenizer: Any) -> Path:
    if not weights_finite(model):
        raise TrainingDiverged(
            "the final weights are not finite; refusing to save them as a model",
            fix="lower learning_rate or check the data",
        )

    def fill(tmp: Path) -> None:
        extra = {"save_embedding_layers": False} if lora.is_peft(model) else {}  # as in core.checkpoint
        model.save_pretrained(tmp, safe_serialization=True, **extra)
        tokenizer.save_pretrained(tmp)

    return publish_folder(run_dir / FINAL, fill, tmp_prefix=".tmp-")


def load_job_model(
    cfg: TrainingConfig, base: Path, source: Path, resuming: bool, device: torch.device, shard: bool
) -> tuple[Any, Any, dict[str, torch.Tensor] | None]:
    """(model, tokenizer, a LoRA run's initial adapter: its rollback target at step 0) of a job: from
    ``source`` (the base, or the checkpoint a resumed run continues from). One opaque stretch of
    loading: the caller keeps the heartbeat (LoadingBeat)."""
    if not cfg.lora:  # sharded: the full weights go to the CPU; wrapping moves each rank's shard to the device
        model, tokenizer = load_model(source, torch.device("cpu") if shard else device)
        return model, tokenizer, None
    raise_fatal(check_lora_setup(cfg, device.type == "cuda", lora.bitsandbytes_available()))
    model, tokenizer = load_model(base, device, four_bit=cfg.lora_4bit)
    model, initial_adapter = apply_lora(model, cfg, base)
    if resuming:
        lora.load_adapter_folder(model, source)
    return model, tokenizer, initial_adapter


def apply_lora(model: Any, cfg: TrainingConfig, base: Path) -> tuple[Any, dict[str, torch.Tensor]]:
    """The model wrapped with fresh LoRA adapters (after checking the targets exist) and a copy of
    their initial weights."""
    targets = lora.resolve_targets(cfg, model)
    missing = lora.missing_targets(model, targets)
    raise_fatal(check_lora_targets(cfg.lora_targets, missing, lora.linear_layer_names(model)))
    model = lora.wrap(model, cfg, base, targets)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info(
        "LoRA r=%d alpha=%g on %s: %d of %d parameters train",
        cfg.lora_r,
        cfg.lora_alpha,
        targets,
        trainable,
        total,
    )
    return model, lora.adapter_state(model)


# --- wiring engine events to reports --------------------------------------------------------------


class Reporter:
    """Turns engine events into metrics lines, status updates and log lines."""

    def __init__(
        self,
        cfg: TrainingConfig,
        status: StatusReporter,
        metrics: MetricsLog,
        start_step: int,
        db: JobDB | None = None,
        on_micro_batch: Any = None,
    ) -> None:
        self.cfg, self.status, self.metrics, self.db = cfg, status, metrics, db
        self.start_step = start_step
        self.smoothed: float | None = None
        self.step_sleep = float(os.environ.get(STEP_SLEEP_ENV) or 0)
        self._last_log = 0.0
        self.on_micro_batch = on_micro_batch  # called with the micro-batch of each step that trained
        self.engine_phase = ""  # the hybrid engine's phase of the last real step

    def __call__(self, ev: Event) -> None:
        try:
            self._dispatch(ev)
        except Exception as e:  # boundary: reporting never fails a job; checkpoints hold the progress
            log.warning("could not report %s: %s", type(ev).__name__, e)
        if isinstance(ev, StepEvent) and self.step_sleep > 0:
            time.sleep(self.step_sleep)

    def _dispatch(self, ev: Event) -> None:
        now = time.time()
        if isinstance(ev, StepEvent):
            self._on_step(ev, now)
        elif isinstance(ev, EvalEvent):
            self.metrics.write({"kind": "eval", "step": ev.step, "val_loss": ev.val_loss, "time": now})
            self.status.update(force=True, val_loss=ev.val_loss)
            log.info("eval step %d: val_loss %.4f", ev.step, ev.val_loss)
        elif isinstance(ev, CheckpointEvent):
            self.status.update(force=True, message=f"checkpoint at step {ev.step}")
            log.info("checkpoint step %d: %s", ev.step, ev.path)
        elif isinstance(ev, PhaseEvent):
            self.status.phase(ev.phase)
            log.info("phase %s at step %d", ev.phase, ev.step)
        elif isinstance(ev, WarningEvent):
            self.warning(ev)
        elif isinstance(ev, JumpEvent):
            self._on_jump(ev, now)
        elif isinstance(ev, RollbackEvent):
            self._on_hybrid_rollback(ev)

    def warning(self, ev: WarningEvent) -> None:
        """An early warning or a repair: a metrics line, a DB event, the status message, the log."""
        data = json_safe(ev.data)
        self.metrics.write(
            {**data, "kind": "warning", "step": ev.step, "warning": ev.kind, "message": ev.message, "time": time.time()}
        )
        if self.db is not None:
            self.db.event("warning", ev.message, step=ev.step, warning=ev.kind, **data)
        self.status.update(force=True, message=ev.message)
        log.warning("%s: %s", ev.kind, ev.message)

    def _on_step(self, ev: StepEvent, now: float) -> None:
        engine = self._on_engine(ev) if ev.phase else {}
        if ev.predicted:  # a hybrid jump: every one gets a line (the dashboard marks them)
            self.metrics.write(
                {
                    "kind": "train",
                    "step": ev.step,
                    "loss": ev.loss,  # the probe loss after the jump
                    "lr": ev.lr,
                    "grad_norm": None,
                    "tokens_per_s": None,
                    "epoch": ev.epoch,
                    "time": now,
                    "advanced": ev.advanced,
                    **engine,
                }
            )
            self.status.update(step=ev.step, total_steps=ev.total_steps, learning_rate=ev.lr)
            return
        if ev.skipped:
            if ev.step % self.cfg.log_every == 0:
                self.metrics.write(
                    {
                        "kind": "train",
                        "step": ev.step,
                        "loss": None,
                        "lr": ev.lr,
                        "grad_norm": None,
                        "tokens_per_s": ev.tokens_per_s,
                        "epoch": ev.epoch,
                        "time": now,
                        "skipped": True,
                        **engine,
                    }
                )
            self.status.update(step=ev.step, total_steps=ev.total_steps, learning_rate=ev.lr)
            return
        if self.on_micro_batch is not None and ev.micro_batch:
            self.on_micro_batch(ev.micro_batch)
        self.smoothed = ev.loss if self.smoothed is None else 0.9 * self.smoothed + 0.1 * ev.loss
        if ev.step % self.cfg.log_every == 0:
            self.metrics.write(
                {
                    "kind": "train",
                    "step": ev.step,
                    "loss": ev.loss,
                    "lr": ev.lr,
                    "grad_norm": ev.grad_norm,
                    "tokens_per_s": ev.tokens_per_s,
                    "epoch": ev.epoch,
                    "time": now,
                    **engine,
                }
            )
        done_here = ev.step - self.start_step
        eta = (ev.total_steps - ev.step) * ev.elapsed / done_here if done_here > 0 else None
        self.status.update(
            step=ev.step,
            total_steps=ev.total_steps,
            epoch=int(ev.epoch),
            loss=self.smoothed,
            learning_rate=ev.lr,
            grad_norm=ev.grad_norm,
            tokens_per_s=ev.tokens_per_s,
            eta_s=eta,
        )
        if now - self._last_log >= LOG_PROGRESS_EVERY_S or ev.step == ev.total_steps:
            self._last_log = now
            log.info(
                "step %d/%d loss %.4f lr %.2e grad_norm %.3f %.0f tok/s",
                ev.step,
                ev.total_steps,
                ev.loss,
                ev.lr,
                ev.grad_norm,
                ev.tokens_per_s,
            )

    def _on_engine(self, ev: StepEvent) -> dict[str, Any]:
        """A hybrid step: status fields, a DB event when the phase of real steps changes; returns the
        fields of its metrics line."""
        if not ev.predicted and ev.phase != self.engine_phase:
            message = f"hybrid engine phase {ev.phase} from step {ev.step}"
            if self.db is not None:
                self.db.event("phase_change", message, step=ev.step, engine_phase=ev.phase, previous=self.engine_phase)
            log.info("%s", message)
            self.engine_phase = ev.phase
        fields: dict[str, Any] = {
            "speedup_estimate": ev.speedup_estimate,
            "backward_skipped": ev.backward_skipped,
            "time_saved_s": ev.time_saved_s,
        }
        self.status.update(engine_phase=ev.phase, **fields)
        return {"phase": ev.phase, "predicted": ev.predicted, **fields}

    def _on_jump(self, ev: JumpEvent, now: float) -> None:
        """One jump attempt: a metrics line and a DB event with its numbers."""
        record = json_safe(ev.as_record())
        self.metrics.write({**record, "time": now})
        verdict = f"accepted, {ev.advanced} steps advanced" if ev.accepted else f"rejected ({ev.reason}), rolled back"
        message = (
            f"hybrid jump at step {ev.step - ev.advanced}: H={ev.horizon:g} x{ev.scale:g}, probe loss "
            f"{ev.probe_before:.4f} -> {ev.probe_after:.4f}, earned {ev.earned_steps:.1f} steps: {verdict}"
        )
        if self.db is not None:
            self.db.event("hybrid_jump", message, **{k: v for k, v in record.items() if k != "kind"})
        log.info("%s", message)

    def _on_hybrid_rollback(self, ev: RollbackEvent) -> None:
        message = (
            f"hybrid engine: {ev.reason} at step {ev.step}; restored the weights and optimizer state of real "
            f"step {ev.restored_real_step}"
        )
        data = {"reason": ev.reason, "restored_real_step": ev.restored_real_step}
        if self.db is not None:
            self.db.event("hybrid_rollback", message, step=ev.step, **data)
        self.warning(WarningEvent(ev.step, "hybrid_rollback", message, data))


def json_safe(data: dict[str, Any]) -> dict[str, Any]:
    """NaN/Inf are not JSON: they become strings (the API and the dashboard parse these lines)."""

    def fix(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return str(v)
        if isinstance(v, dict):
            return {str(k): fix(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [fix(x) for x in v]
        return v

    return {k: fix(v) for k, v in data.items()}


# --- the job --------------------------------------------------------------------------------------


@dataclass
class RunInfo:
    """What the failure path needs from a job that got far enough to have a trainer."""

    trainer: Trainer | None = None


def sizes(trainer: Trainer | None) -> dict[str, Any]:
    if trainer is None:
        return {}
    return {"micro_batch": trainer.micro_batch_size, "grad_accum": trainer.accum_steps}


def train_job(
    spec: JobSpec, stop: StopFlag, status: StatusReporter, db: JobDB, info: RunInfo | None = None
) -> WorkerResult:
    info = info if info is not None else RunInfo()
    faults = Faults.from_env()
    run_dir = Path(spec.run_dir)
    main_rank = distributed.from_env().is_main  # rank 0 alone writes files, rows and the status
    status.phase("loading")
    faults.hang("loading")
    if main_rank:
        checkpoint.remove_partial(run_dir)
    latest = checkpoint.latest_complete(run_dir)
    saved = None
    if latest is not None:
        with LoadingBeat(status, f"loading the training state of {latest.path.name}"):
            saved = checkpoint.load_state(latest.path)
    cfg = resolve_config(spec.training, saved["config"] if saved else None)

    threads = thread_count(cfg.threads)
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)  # tiny models hit denormals; without this CPU steps crawl
    device = pick_device(cfg)
    # base: the folder the job started from. Built before joining the process group: inside one,
    # transformers' save_pretrained writes on rank 0 only, and another rank could publish an empty folder.
    base = Path(spec.init_model) if spec.init_model else ensure_embedded_model(Path(spec.embedded_model_dir))
    ranks = distributed.init(device.type)
    if ranks.active:
        log.info("rank %d of %d (%s)", ranks.rank, ranks.world, "nccl" if device.type == "cuda" else "gloo")
    raise_fatal(check_sharding(cfg, ranks.world))
    shard = cfg.sharding == "fsdp" and ranks.active  # FSDP (core.sharding); one process shards nothing
    status.update(force=True, device=describe_device(device, threads), engine=cfg.engine)
    rng.seed_all(cfg.seed)

    # source: where the weights come from now
    source = latest.path / checkpoint.MODEL if latest else base
    log.info("job %d (%s): model %s on %s", spec.job_id, spec.job_name, source, status.status.device)
    with LoadingBeat(status, f"loading the model {source.name or source}"):
        model, tokenizer, initial_adapter = load_job_model(cfg, base, source, bool(latest), device, shard)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
        log.info("gradient checkpointing on (activations recomputed in the backward pass)")
    if cfg.learning_rate == 0:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        adapted = sum(p.numel() for p in model.parameters() if not p.requires_grad) if cfg.lora else 0
        cfg = cfg.model_copy(update={"learning_rate": auto_learning_rate(trainable, adapted)})
        log.info("learning rate: %.1e (automatic for %d trainable parameters)", cfg.learning_rate, trainable)
    data = load_data(spec, cfg, tokenizer, Progress(status))
    if shard:  # after the weights, before the optimizer; every rank read the same files, so no broadcast
        layers = sharding.wrap(model, device, ranks.world)
        log.info("fsdp: %d decoder layers and the root sharded across %d ranks", layers, ranks.world)
    else:
        ranks.broadcast_params(model)

    trainer = Trainer(model, cfg, data.train, data.val, tokenizer.pad_token_id, device, faults, ranks)
    info.trainer = trainer
    preflight = run_preflight(cfg, model, device, len(data.train), len(data.val), bool(spec.eval_file), trainer.half)
    log.info("preflight: micro-batch %d fits (%s)", preflight.micro_batch, preflight.estimate)
    if saved is not None:
        trainer.load_state_dict(saved)

    n_params = sum(p.numel() for p in model.parameters())
    cache = MicroBatchCache(Path(spec.embedded_model_dir).parent / CACHE_FILE)
    key = cache_key(status.status.device, model.config, n_params, cfg.max_length, trainer.half)
    starting_hint = ""
    if saved is None:  # a resumed run keeps its checkpoint's micro-batch: the same run, exactly
        cached = cache.get(key)
        start = min(cfg.batch_size, preflight.micro_batch, cached or cfg.batch_size)
        if start < cfg.batch_size:
            trainer.set_micro_batch(start)
            why = "it worked before for this model and max_length" if start == cached else "the memory estimate"
            starting_hint = (
                f"starting at micro-batch {start} x {trainer.accum_steps} accumulation ({why}); "
                f"effective batch {trainer.effective_batch}"
            )
    s = trainer.state
    if main_rank:
        truncate_to_step(run_dir / METRICS, s.step if latest else -1)
    status.update(force=True, step=s.step, total_steps=trainer.total_steps, val_loss=s.last_val_loss, message="")

    def result(outcome: WorkerOutcome, **fields: Any) -> WorkerResult:
        st = trainer.state
        return WorkerResult(
            outcome=outcome,
            step=st.step,
            total_steps=trainer.total_steps,
            train_loss=st.train_loss,
            val_loss=st.last_val_loss,
            first_val_loss=st.first_val_loss,
            **sizes(trainer),
            base_model=str(base),
            adapter=cfg.lora,
            **fields,
        )

    def should_stop() -> bool:  # every rank stops at the same step boundary
        return ranks.any_flag(stop.is_set())

    if should_stop():
        log.info("stop requested before training started")
        return result(WorkerOutcome.INTERRUPTED, message="stopped before training started")

    def deleted(found: list[checkpoint.CheckpointInfo]) -> None:
        db.checkpoints_deleted([c.path for c in found])

    guard = DiskGuard(run_dir, cfg.disk_margin_mb * 1024**2, faults, on_deleted=deleted)

    def save_checkpoint() -> Path:
        st = trainer.state
        # sharded, gathering the full weights and optimizer state is a collective: every rank takes part
        to_save, state = (sharding.gather(model), trainer.state_dict()) if shard else (model, None)
        if not main_rank:
            return checkpoint.checkpoints_dir(run_dir) / checkpoint.step_name(st.step)
        needed = estimate_checkpoint_bytes(run_dir, to_save, trainer.optimizer)
        guard.ensure("checkpoint", needed, st.step)
        meta = {
            "job_id": spec.job_id,
            "total_steps": trainer.total_steps,
            "train_loss": st.train_loss,
            "val_loss": st.last_val_loss,
            "best_val_loss": st.best_val_loss,
            "first_val_loss": st.first_val_loss,
            "micro_batch": trainer.micro_batch_size,
            "grad_accum": trainer.accum_steps,
        }
        try:
            saved_info = checkpoint.save(
                run_dir,
                st.step,
                to_save,
                tokenizer,
                state if state is not None else trainer.state_dict(),
                cfg.model_dump(mode="json"),
                meta,
            )
        except OSError as e:  # the estimate was short: the partial folder is gone, the last one stands
            if e.errno in DISK_ERRNOS:
                raise DiskFull("checkpoint", needed, guard.free(), str(run_dir), guard.margin) from e
            raise
        guard.prune(cfg.keep_checkpoints)
        db.checkpoint_saved(saved_info.step, saved_info.path, checkpoint.read_meta(saved_info.path))
        db.event("checkpoint", f"checkpoint at step {saved_info.step}", step=saved_info.step, path=str(saved_info.path))
        return saved_info.path

    metrics = MetricsLog(run_dir / METRICS) if main_rank else RankMetrics(run_dir / METRICS)
    recorded = {"micro": trainer.micro_batch_size}

    def micro_batch_worked(micro: int) -> None:
        if main_rank and micro != recorded["micro"]:  # back-off found one that trains: the next job starts there
            recorded["micro"] = micro
            cache.record(key, micro, max_length=cfg.max_length, model=str(spec.init_model or "embedded"))

    reporter = Reporter(cfg, status, metrics, s.step, db, micro_batch_worked)

    def restore() -> None:
        """Rollback target: the newest complete checkpoint, or the initial weights at step 0."""
        found = checkpoint.latest_complete(run_dir)
        if found is not None:
            load_weights(model, found.path / checkpoint.MODEL)
            trainer.load_state_dict(checkpoint.load_state(found.path))
        else:
            if initial_adapter is not None:
                lora.load_adapter_state(model, initial_adapter)
            else:
                load_weights(model, source)
            trainer.reset()
        metrics.truncate(trainer.state.step if found is not None else -1)
        reporter.smoothed = None
        status.update(force=True, step=trainer.state.step, val_loss=trainer.state.last_val_loss)

    what = f"resuming at step {s.step}" if latest else "starting"
    log.info("%s: %d steps in all", what, trainer.total_steps)
    db.event("training_started", f"worker {what}", step=s.step, total_steps=trainer.total_steps, pid=os.getpid())
    try:
        for p in preflight.warnings:
            reporter.warning(WarningEvent(s.step, "preflight", p.message, {"check": p.code, **p.evidence}))
        if starting_hint:
            reporter.warning(WarningEvent(s.step, "micro_batch", starting_hint, sizes(trainer)))
        try:
            outcome = trainer.run(reporter, should_stop, save_checkpoint, restore)
            final: Path | None = None
            # sharded, the full weights are gathered on every rank (a collective) for rank 0 to write
            to_save = sharding.gather(model) if shard and outcome == "completed" else model
            if outcome == "completed" and not main_rank:
                final = run_dir / FINAL
            elif outcome == "completed":
                status.update(force=True, message="saving the final model")
                guard.ensure("final model", weights_bytes(to_save) + FINAL_EXTRA_BYTES, trainer.state.step)
                try:
                    final = save_final(run_dir, to_save, tokenizer)
                except OSError as e:
                    if e.errno in DISK_ERRNOS:
                        raise DiskFull("final model", weights_bytes(to_save), guard.free(), str(run_dir), 0) from e
                    raise
        except DiskFull as e:
            last = checkpoint.latest_complete(run_dir)
            resume_step = last.step if last else 0
            log.warning("%s; pausing (resumes from step %d)", e, resume_step)
            return result(
                WorkerOutcome.INTERRUPTED,
                message=f"disk full: {e}; the job resumes from step {resume_step} once there is space",
                pause_reason="disk full",
                failure_class="disk",
                evidence={**e.evidence, "step": trainer.state.step, "resume_step": resume_step},
                fix=f"free at least {(e.needed + e.margin - e.free) / 1e6:.0f} MB on the disk holding {run_dir} "
                "(or lower keep_checkpoints)",
            )
    finally:
        metrics.close()
        if trainer.hybrid is not None:
            record_hybrid_summary(trainer.hybrid, trainer.state.step, db)
    s = trainer.state
    if outcome == "interrupted":
        return result(
            WorkerOutcome.INTERRUPTED,
            message=f"interrupted at step {s.step}"
            + ("; checkpoint saved" if s.last_checkpoint_step == s.step else "; no step done, no checkpoint"),
        )
    log.info("final model: %s", final)
    extra: dict[str, Any] = {}
    if s.stop_reason:
        extra = {"message": s.stop_reason, "evidence": {"stopped_early": s.stop_reason, "step": s.step}}
    return result(WorkerOutcome.COMPLETED, final_model=str(final), **extra)


def record_hybrid_summary(engine: HybridEngine, step: int, db: JobDB) -> None:
    """What the hybrid engine did and cost, as a DB event whenever a worker's run ends (completed, paused,
    interrupted, failed). Its counters ride in checkpoints, so each event holds the job's totals so far: the
    last one is the job's."""
    summary = engine.summary()
    saved = summary["time_saved_s"]
    message = (
        f"hybrid engine: {summary['accepted']}/{summary['attempts']} jumps accepted, "
        f"{summary['backward_skipped']} backward passes skipped, "
        + ("time saved -" if saved is None else f"time saved {saved:+.1f} s")
    )
    try:
        db.event("hybrid_summary", message, step=step, **summary)
    except Exception as e:  # a lost summary must not hide how the run ended
        log.warning("could not record the hybrid summary: %s", e)


def classify(e: BaseException) -> tuple[str, dict[str, Any], str]:
    """(failure class, evidence, fix) of an exception that ended a job; see trainbox.states.FailureClass."""
    if isinstance(e, JobFailure):
        return e.failure_class, e.evidence, e.fix
    if isinstance(e, DataError):
        return e.failure_class, e.evidence, e.fix or "fix the data as the message says, then submit it again"
    if isinstance(e, torch.OutOfMemoryError):
        return (
            "oom",
            {"error": str(e).splitlines()[0] if str(e) else ""},
            ("lower max_length or batch_size, use LoRA or a smaller model, or free the GPU"),
        )
    if isinstance(e, OSError) and e.errno in DISK_ERRNOS:
        return "disk", {"error": str(e)}, "free space on the disk holding the home"
    return (
        "crash",
        {"error_type": type(e).__name__},
        "see the worker log (runs/job-N/worker.log); the job may be retried",
    )


def finish(result: WorkerResult, run_dir: Path, status: StatusReporter | None, db: JobDB | None) -> int:
    phase = {
        WorkerOutcome.COMPLETED: "finished",
        WorkerOutcome.INTERRUPTED: "interrupted",
        WorkerOutcome.FAILED: "failed",
    }[result.outcome]
    if status is not None:
        status.update(force=True, phase=phase, message=result.message, step=result.step or status.status.step)
    if db is not None:
        db.event(
            f"training_{result.outcome.value}",
            result.message or phase,
            step=result.step,
            train_loss=result.train_loss,
            val_loss=result.val_loss,
        )
        db.close()
    if distributed.from_env().is_main:
        result.save(run_dir)  # the last act: the daemon reads it after the exit
    log.info("%s at step %d/%d", result.outcome.value, result.step, result.total_steps)
    return {
        WorkerOutcome.COMPLETED: EXIT_COMPLETED,
        WorkerOutcome.INTERRUPTED: EXIT_INTERRUPTED,
        WorkerOutcome.FAILED: EXIT_FAILED,
    }[result.outcome]


def failed_result(e: Exception, status: StatusReporter | None, info: RunInfo) -> WorkerResult:
    """The result a failed run leaves for the daemon: its class, evidence and fix, and how far it got."""
    failure_class, evidence, fix = classify(e)
    return WorkerResult(
        outcome=WorkerOutcome.FAILED,
        message=str(e) or type(e).__name__,
        error_type=type(e).__name__,
        step=status.status.step if status else 0,
        total_steps=status.status.total_steps if status else 0,
        failure_class=failure_class,
        evidence=json_safe(evidence),
        fix=fix,
        **sizes(info.trainer),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m core.worker", description="Train one trainbox job.")
    parser.add_argument("--run-dir", required=True, type=Path, help="run folder holding job.json")
    args = parser.parse_args(argv)
    ranks = distributed.from_env()
    rank_tag = f" rank{ranks.rank}" if ranks.active else ""
    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format=f"%(asctime)s %(name)s{rank_tag} %(levelname)s %(message)s"
    )
    stop = StopFlag()
    stop.install()
    hf_logging.disable_progress_bar()  # progress bars are noise in a log file
    run_dir: Path = args.run_dir.resolve()
    status: StatusReporter | None = None
    db: JobDB | None = None
    info = RunInfo()
    try:
        spec = JobSpec.load(run_dir)
        reporter_cls, db_cls = (StatusReporter, JobDB) if ranks.is_main else (RankStatus, RankDB)
        status = reporter_cls(Path(spec.status_file), spec.job_id, spec.job_name)
        if ranks.active:  # the process the daemon spawned (and the watchdog watches) is the torchrun agent
            status.status.pid = os.getppid()
        db = db_cls(spec.db_url, spec.job_id)
        result = train_job(spec, stop, status, db, info)
    except Exception as e:  # boundary: any failure becomes a result the daemon can read
        traceback.print_exc()
        sys.stderr.flush()
        result = failed_result(e, status, info)
    try:
        return finish(result, run_dir, status, db)
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
