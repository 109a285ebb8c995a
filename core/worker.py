"""One job's training in its own process: ``python -m core.worker --run-dir DIR``.

The daemon writes ``DIR/job.json`` (a JobSpec) and spawns this module; the worker reads the spec,
resumes from the newest complete checkpoint in ``DIR/checkpoints/`` if there is one, trains, and
reports through ``DIR/metrics.jsonl``, the status file, the model DB and its log (stdout/stderr).
Its last act is ``DIR/result.json`` (a WorkerResult), and the exit code says the same:
  0   completed: ``DIR/final/`` holds the trained model and tokenizer
  75  interrupted (SIGTERM/SIGINT): the newest checkpoint holds the progress; rerun to resume
  1   failed: the traceback is on stderr, the message and exception type in result.json

Signal handlers only set a flag; the training loop looks at it at every step boundary.

Test-only hook: ``TRAINBOX_TEST_STEP_SLEEP`` (seconds, float) sleeps after every optimizer step so
tests can catch a run in the middle. Never set it in production.
"""

from __future__ import annotations

import argparse
import logging
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

from core import checkpoint, rng
from core.data import split_heldout
from core.embedded import ensure_embedded_model
from core.encode import Example, encode_all, prepare_tokenizer
from core.errors import DataError
from core.folders import publish_folder
from core.metrics import METRICS, MetricsLog, truncate_to_step
from core.reporting import JobDB, StatusReporter
from core.train import CheckpointEvent, EvalEvent, Event, PhaseEvent, StepEvent, Trainer
from trainbox.config import TrainingConfig, auto_learning_rate
from trainbox.jobspec import JobSpec, WorkerResult
from trainbox.records import Record, load_records
from trainbox.states import EXIT_COMPLETED, EXIT_FAILED, EXIT_INTERRUPTED, WorkerOutcome

log = logging.getLogger("core.worker")

FINAL = "final"
STEP_SLEEP_ENV = "TRAINBOX_TEST_STEP_SLEEP"  # test-only, see module docstring
# Settings that may differ between the run that wrote a checkpoint and the one resuming it: how the
# machine runs and reports, not what is trained. Every other key comes from the checkpoint.
RUNTIME_KEYS = ("threads", "device", "precision", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints")
LOG_PROGRESS_EVERY_S = 10.0


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


# --- loading --------------------------------------------------------------------------------------


def load_model(source: Path, device: torch.device) -> tuple[Any, Any]:
    """Model (fp32 master weights; bf16 happens in autocast) and tokenizer from a local folder."""
    tokenizer = AutoTokenizer.from_pretrained(source)
    changes = prepare_tokenizer(tokenizer)
    if changes:
        log.info("tokenizer: %s", "; ".join(changes))
    model: Any = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    model = model.to(device)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


@dataclass
class DataSets:
    train: list[Example]
    val: list[Example]


def load_data(spec: JobSpec, cfg: TrainingConfig, tokenizer: Any) -> DataSets:
    records: list[Record] = load_records(Path(spec.data_file))
    if spec.eval_file:
        train_records = records
        val_records = load_records(Path(spec.eval_file))[: cfg.eval_max_examples]
    else:
        train_records, val_records = split_heldout(records, cfg.eval_fraction, cfg.eval_max_examples, cfg.seed)
    train = encode_all(tokenizer, train_records, cfg.max_length)
    val = encode_all(tokenizer, val_records, cfg.max_length)
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
            f"({train.dropped} dropped): raise max_length or shorten the prompts"
        )
    log.info("data: %d training, %d validation examples", len(train.examples), len(val.examples))
    return DataSets(train.examples, val.examples)


def save_final(run_dir: Path, model: Any, tokenizer: Any) -> Path:
    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    return publish_folder(run_dir / FINAL, fill, tmp_prefix=".tmp-")


# --- wiring engine events to reports --------------------------------------------------------------


class Reporter:
    """Turns engine events into metrics lines, status updates and log lines."""

    def __init__(self, cfg: TrainingConfig, status: StatusReporter, metrics: MetricsLog, start_step: int) -> None:
        self.cfg, self.status, self.metrics = cfg, status, metrics
        self.start_step = start_step
        self.smoothed: float | None = None
        self.step_sleep = float(os.environ.get(STEP_SLEEP_ENV) or 0)
        self._last_log = 0.0

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

    def _on_step(self, ev: StepEvent, now: float) -> None:
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


# --- the job --------------------------------------------------------------------------------------


def train_job(spec: JobSpec, stop: StopFlag, status: StatusReporter, db: JobDB) -> WorkerResult:
    run_dir = Path(spec.run_dir)
    status.phase("loading")
    checkpoint.remove_partial(run_dir)
    latest = checkpoint.latest_complete(run_dir)
    saved = checkpoint.load_state(latest.path) if latest else None
    cfg = resolve_config(spec.training, saved["config"] if saved else None)

    threads = thread_count(cfg.threads)
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)  # tiny models hit denormals; without this CPU steps crawl
    device = pick_device(cfg)
    status.update(force=True, device=describe_device(device, threads))
    rng.seed_all(cfg.seed)

    if latest:
        source = latest.path / checkpoint.MODEL
    elif spec.init_model:
        source = Path(spec.init_model)
    else:
        source = ensure_embedded_model(Path(spec.embedded_model_dir))
    log.info("job %d (%s): model %s on %s", spec.job_id, spec.job_name, source, status.status.device)
    model, tokenizer = load_model(source, device)
    if cfg.learning_rate == 0:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        cfg = cfg.model_copy(update={"learning_rate": auto_learning_rate(trainable)})
        log.info("learning rate: %.1e (automatic for %d trainable parameters)", cfg.learning_rate, trainable)
    data = load_data(spec, cfg, tokenizer)

    trainer = Trainer(model, cfg, data.train, data.val, tokenizer.pad_token_id, device)
    if saved is not None:
        trainer.load_state_dict(saved)
    s = trainer.state
    truncate_to_step(run_dir / METRICS, s.step if latest else -1)
    status.update(force=True, step=s.step, total_steps=trainer.total_steps, val_loss=s.last_val_loss)
    if stop.is_set():
        log.info("stop requested before training started")
        return WorkerResult(
            outcome=WorkerOutcome.INTERRUPTED,
            step=s.step,
            total_steps=trainer.total_steps,
            message="stopped before training started",
        )

    def save_checkpoint() -> Path:
        meta = {
            "job_id": spec.job_id,
            "total_steps": trainer.total_steps,
            "train_loss": s.train_loss,
            "val_loss": s.last_val_loss,
            "best_val_loss": s.best_val_loss,
            "first_val_loss": s.first_val_loss,
        }
        info = checkpoint.save(
            run_dir, s.step, model, tokenizer, trainer.state_dict(), cfg.model_dump(mode="json"), meta
        )
        deleted = checkpoint.prune(run_dir, cfg.keep_checkpoints)
        db.checkpoint_saved(info.step, info.path, checkpoint.read_meta(info.path))
        db.checkpoints_deleted([c.path for c in deleted])
        db.event("checkpoint", f"checkpoint at step {info.step}", step=info.step, path=str(info.path))
        return info.path

    what = f"resuming at step {s.step}" if latest else "starting"
    log.info("%s: %d steps in all", what, trainer.total_steps)
    db.event("training_started", f"worker {what}", step=s.step, total_steps=trainer.total_steps, pid=os.getpid())
    metrics = MetricsLog(run_dir / METRICS)
    try:
        outcome = trainer.run(Reporter(cfg, status, metrics, s.step), stop.is_set, save_checkpoint)
    finally:
        metrics.close()

    if outcome == "interrupted":
        return WorkerResult(
            outcome=WorkerOutcome.INTERRUPTED,
            step=s.step,
            total_steps=trainer.total_steps,
            train_loss=s.train_loss,
            val_loss=s.last_val_loss,
            first_val_loss=s.first_val_loss,
            message=f"interrupted at step {s.step}"
            + ("; checkpoint saved" if s.last_checkpoint_step == s.step else "; no step done, no checkpoint"),
        )
    status.update(force=True, message="saving the final model")
    final = save_final(run_dir, model, tokenizer)
    log.info("final model: %s", final)
    return WorkerResult(
        outcome=WorkerOutcome.COMPLETED,
        step=s.step,
        total_steps=trainer.total_steps,
        final_model=str(final),
        train_loss=s.train_loss,
        val_loss=s.last_val_loss,
        first_val_loss=s.first_val_loss,
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
    result.save(run_dir)  # the last act: the daemon reads it after the exit
    log.info("%s at step %d/%d", result.outcome.value, result.step, result.total_steps)
    return {
        WorkerOutcome.COMPLETED: EXIT_COMPLETED,
        WorkerOutcome.INTERRUPTED: EXIT_INTERRUPTED,
        WorkerOutcome.FAILED: EXIT_FAILED,
    }[result.outcome]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m core.worker", description="Train one trainbox job.")
    parser.add_argument("--run-dir", required=True, type=Path, help="run folder holding job.json")
    args = parser.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    stop = StopFlag()
    stop.install()
    hf_logging.disable_progress_bar()  # progress bars are noise in a log file
    run_dir: Path = args.run_dir.resolve()
    status: StatusReporter | None = None
    db: JobDB | None = None
    try:
        spec = JobSpec.load(run_dir)
        status = StatusReporter(Path(spec.status_file), spec.job_id, spec.job_name)
        db = JobDB(spec.db_url, spec.job_id)
        result = train_job(spec, stop, status, db)
    except Exception as e:  # boundary: any failure becomes a result the daemon can read
        traceback.print_exc()
        sys.stderr.flush()
        result = WorkerResult(
            outcome=WorkerOutcome.FAILED,
            message=str(e) or type(e).__name__,
            error_type=type(e).__name__,
            step=status.status.step if status else 0,
            total_steps=status.status.total_steps if status else 0,
        )
    return finish(result, run_dir, status, db)


if __name__ == "__main__":
    sys.exit(main())
