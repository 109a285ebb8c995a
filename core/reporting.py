"""Where a job's training is reported besides stdout: the status file, the model DB and ``metrics.jsonl``.

``Reporter`` is the one object rank 0 reports through, over three sinks: the status file and its loading
heartbeats (core.heartbeat), DB rows and events (core.jobdb) and, once training starts, metrics lines
(core.metrics); each of the engine's events becomes a metrics line, a status update, a DB event and a log line
as it calls for. Any other rank gets a ``NullReporter``: the same methods doing nothing, since rank 0 reports
for the whole job.

Reporting must never fail a job (a full disk for the status file, a locked DB): every write catches, logs and
carries on. Training progress is safe in checkpoints regardless.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from core.events import CheckpointEvent, EvalEvent, Event, PhaseEvent, StepEvent, TimingEvent, WarningEvent
from core.heartbeat import LoadingBeat, Progress, StatusFile
from core.hybrid.engine import HybridEngine
from core.hybrid.events import CorrectionEvent, CurveEvent, RollbackEvent
from core.jobdb import JobDB
from core.metrics import MetricsLog, truncate_to_step
from core.tracking import Tracking
from trainbox.jobspec import WorkerResult
from trainbox.states import WorkerOutcome

log = logging.getLogger("core.worker")

LOG_PROGRESS_EVERY_S = 10.0


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


class Reporter:
    """Rank 0's reports on one job (see the module docstring). Built before the job's settings are known
    (``main``); ``start`` adds what the engine's events need once training is about to begin."""

    def __init__(self, status: StatusFile, db: JobDB, metrics_path: Path, tracking: Tracking | None = None) -> None:
        self.status, self.db, self.metrics_path = status, db, metrics_path
        self.tracking = tracking or Tracking([])  # TensorBoard and the like (core/tracking.py); never fails a job
        self.metrics: MetricsLog | None = None  # open from start() to close_metrics()
        self.log_every = 1
        self.start_step = 0
        self.smoothed: float | None = None
        self._last_log = 0.0
        self.on_micro_batch: Callable[[int], None] | None = None  # the micro-batch of each step that trained
        self.engine_phase = ""  # the hybrid engine's phase of the last real step
        self.tokens_trained = 0  # tokens of the updates this process applied (the run's end event carries it)

    # --- the status file --------------------------------------------------------------------------

    def phase(self, phase: str, message: str = "") -> None:
        self.status.phase(phase, message)

    def update(self, force: bool = False, **fields: Any) -> None:
        self.status.update(force, **fields)

    def loading(self, what: str) -> contextlib.AbstractContextManager[Any]:
        """Heartbeats through one long call that reports nothing itself (a model load)."""
        return LoadingBeat(self.status, what)

    def progress(self) -> Progress:
        return Progress(self.status)

    def reached(self) -> tuple[int, int] | None:
        """(step, total steps) as last reported: how far a failed run got."""
        return self.status.status.step, self.status.status.total_steps

    # --- the DB -----------------------------------------------------------------------------------

    def event(self, kind: str, message: str, **data: Any) -> None:
        self.db.event(kind, message, **data)

    def checkpoint_saved(self, step: int, path: Path, meta: dict[str, Any]) -> None:
        self.db.checkpoint_saved(step, path, meta)
        self.db.event("checkpoint", f"checkpoint at step {step}", step=step, path=str(path))

    def checkpoints_deleted(self, paths: list[Path]) -> None:
        self.db.checkpoints_deleted(paths)

    def hybrid_summary(self, engine: HybridEngine, step: int, lines: Sequence[int] = ()) -> None:
        """What the hybrid engine did and cost, as a DB event whenever a worker's run ends (completed, paused,
        interrupted, failed). Its counters ride in checkpoints, so each event holds the job's totals so far: the
        last one is the job's. ``lines``: each training example's line in the job's file."""
        summary = engine.summary(lines)
        saved = summary["time_saved_s"]
        message = (
            f"hybrid engine: {summary['examples_skipped']} examples skipped ({summary['skipped_share']:.0%}), "
            f"{summary['came_back']} of {summary['remeasured']} re-measured came back, "
            f"{summary['rollbacks']} rollbacks; {summary['stopped']}; "
            + ("time saved -" if saved is None else f"time saved {saved:+.1f} s (estimated)")
        )
        try:
            self.db.event("hybrid_summary", message, step=step, **summary)
        except Exception as e:  # a lost summary must not hide how the run ended
            log.warning("could not record the hybrid summary: %s", e)

    # --- training ---------------------------------------------------------------------------------

    def resumed_at(self, step: int, total_steps: int, val_loss: float | None, resumed: bool) -> None:
        """Where training (re)starts: the metrics file cut back to the checkpoint's step (all of it on a fresh
        start), so no step appears twice; the status and the run's row say the same."""
        truncate_to_step(self.metrics_path, step if resumed else -1)
        self.db.run_started(step)
        self.status.update(force=True, step=step, total_steps=total_steps, val_loss=val_loss, message="")

    def start(self, log_every: int, start_step: int, on_micro_batch: Callable[[int], None] | None = None) -> None:
        self.metrics = MetricsLog(self.metrics_path)
        self.log_every, self.start_step, self.on_micro_batch = log_every, start_step, on_micro_batch
        self.tracking.start(start_step, log_every)

    def rolled_back(self, step: int, val_loss: float | None, to_checkpoint: bool) -> None:
        """The trainer went back to a checkpoint (or the start): the steps after it will be trained again."""
        if self.metrics is not None:
            self.metrics.truncate(step if to_checkpoint else -1)
        self.smoothed = None
        self.status.update(force=True, step=step, val_loss=val_loss)

    def close_metrics(self) -> None:
        if self.metrics is not None:
            self.metrics.close()

    def finish(self, result: WorkerResult) -> None:
        """How the run ended, in the status file and the DB; the DB is closed."""
        phase = {
            WorkerOutcome.COMPLETED: "finished",
            WorkerOutcome.INTERRUPTED: "interrupted",
            WorkerOutcome.FAILED: "failed",
        }[result.outcome]
        self.status.update(force=True, phase=phase, message=result.message, step=result.step or self.status.status.step)
        self.db.event(
            f"training_{result.outcome.value}",
            result.message or phase,
            step=result.step,
            train_loss=result.train_loss,
            val_loss=result.val_loss,
            # Prometheus' counters sum these (monitoring/prometheus_history.py); 0 if training never began
            steps_trained=max(0, (result.step or 0) - self.start_step) if self.metrics is not None else 0,
            tokens=self.tokens_trained,
        )
        self.tracking.close(result.outcome.value)
        self.db.close()

    # --- the engine's events ----------------------------------------------------------------------

    def __call__(self, ev: Event) -> None:
        try:
            self._dispatch(ev)
        except Exception as e:  # boundary: reporting never fails a job; checkpoints hold the progress
            log.warning("could not report %s: %s", type(ev).__name__, e)
        self.tracking(ev)

    def _dispatch(self, ev: Event) -> None:
        now = time.time()
        if isinstance(ev, StepEvent):
            self._on_step(ev, now)
        elif isinstance(ev, EvalEvent):
            self._line({"kind": "eval", "step": ev.step, "val_loss": ev.val_loss, "time": now})
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
        elif isinstance(ev, TimingEvent):  # where the loop's time went, for the job report
            self._line({**ev.as_record(), "time": now})
        elif isinstance(ev, CorrectionEvent | CurveEvent):
            self._on_hybrid(ev, now)
        elif isinstance(ev, RollbackEvent):
            self._on_hybrid_rollback(ev)

    def _line(self, record: dict[str, Any]) -> None:
        if self.metrics is not None:
            self.metrics.write(record)

    def warning(self, ev: WarningEvent) -> None:
        """An early warning or a repair: a metrics line, a DB event, the status message, the log."""
        data = json_safe(ev.data)
        self._line(
            {**data, "kind": "warning", "step": ev.step, "warning": ev.kind, "message": ev.message, "time": time.time()}
        )
        self.db.event("warning", ev.message, step=ev.step, warning=ev.kind, **data)
        self.status.update(force=True, message=ev.message)
        log.warning("%s: %s", ev.kind, ev.message)

    def _on_step(self, ev: StepEvent, now: float) -> None:
        engine = self._on_engine(ev) if ev.phase else {}
        if ev.skipped:  # a skipped update
            if ev.step % self.log_every == 0:
                self._line(self._train_line(ev, now, engine))
            self.status.update(step=ev.step, total_steps=ev.total_steps, learning_rate=ev.lr)
            return
        if self.on_micro_batch is not None and ev.micro_batch:
            self.on_micro_batch(ev.micro_batch)
        self.tokens_trained += ev.tokens
        self.smoothed = ev.loss if self.smoothed is None else 0.9 * self.smoothed + 0.1 * ev.loss
        if ev.step % self.log_every == 0:
            self._line(self._train_line(ev, now, engine))
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

    @staticmethod
    def _train_line(ev: StepEvent, now: float, engine: dict[str, Any]) -> dict[str, Any]:
        """A step's metrics line; a skipped step has no loss or gradient norm (they were not finite)."""
        line: dict[str, Any] = {
            "kind": "train",
            "step": ev.step,
            "loss": None if ev.skipped else ev.loss,
            "lr": ev.lr,
            "grad_norm": None if ev.skipped else ev.grad_norm,
            "tokens_per_s": ev.tokens_per_s,
            "epoch": ev.epoch,
            "time": now,
        }
        if ev.skipped:
            line["skipped"] = True
        return {**line, **engine}

    def _on_engine(self, ev: StepEvent) -> dict[str, Any]:
        """A hybrid step: status fields, a DB event when the phase of real steps changes; returns the
        fields of its metrics line."""
        if ev.phase != self.engine_phase:
            message = f"hybrid engine phase {ev.phase} from step {ev.step}"
            self.db.event("phase_change", message, step=ev.step, engine_phase=ev.phase, previous=self.engine_phase)
            log.info("%s", message)
            self.engine_phase = ev.phase
        fields: dict[str, Any] = {
            "skipped_share": ev.skipped_share,
            "speedup_estimate": ev.speedup_estimate,
            "backward_skipped": ev.backward_skipped,
            "time_saved_s": ev.time_saved_s,
        }
        self.status.update(engine_phase=ev.phase, **fields)
        return {"phase": ev.phase, **fields}

    def _on_hybrid(self, ev: CorrectionEvent | CurveEvent, now: float) -> None:
        """A correction (skipped examples re-measured) or a curve fit after an evaluation: a metrics line and a DB
        event with its numbers."""
        record = json_safe(ev.as_record())
        self._line({**record, "time": now})
        if isinstance(ev, CorrectionEvent):
            message = (
                f"hybrid correction at step {ev.step}: {ev.examples} skipped examples re-measured, mean loss "
                f"{ev.mean_before:.4f} -> {ev.mean_after:.4f}, {ev.came_back} came back"
            )
        else:
            self.status.update(force=True, predicted_final=ev.predicted_final, expected_stop=ev.stop_step)
            final = "-" if ev.predicted_final is None else f"{ev.predicted_final:.4f}"
            message = (
                f"hybrid curve at step {ev.step}: val {ev.val_loss:.4f}, predicted final {final}, expected stop "
                f"{ev.stop_step if ev.stop_step is not None else '-'}, keep share {ev.keep_share:g}"
            )
        self.db.event(str(record["kind"]), message, **{k: v for k, v in record.items() if k not in ("kind", "curve")})
        log.info("%s", message)

    def _on_hybrid_rollback(self, ev: RollbackEvent) -> None:
        message = (
            f"hybrid engine: {ev.reason} at step {ev.step}; restored the weights and optimizer state of step "
            f"{ev.restored_step}"
        )
        data = {"reason": ev.reason, "restored_step": ev.restored_step}
        self.db.event("hybrid_rollback", message, step=ev.step, **data)
        self.warning(WarningEvent(ev.step, "hybrid_rollback", message, data))


class NullReporter:
    """A rank other than 0: ``Reporter``'s methods, doing nothing (rank 0 reports for the whole job)."""

    def phase(self, phase: str, message: str = "") -> None:
        pass

    def update(self, force: bool = False, **fields: Any) -> None:
        pass

    def loading(self, what: str) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()

    def progress(self) -> Progress:
        return Progress(None)

    def reached(self) -> tuple[int, int] | None:
        return None

    def event(self, kind: str, message: str, **data: Any) -> None:
        pass

    def checkpoint_saved(self, step: int, path: Path, meta: dict[str, Any]) -> None:
        pass

    def checkpoints_deleted(self, paths: list[Path]) -> None:
        pass

    def hybrid_summary(self, engine: HybridEngine, step: int, lines: Sequence[int] = ()) -> None:
        pass

    def resumed_at(self, step: int, total_steps: int, val_loss: float | None, resumed: bool) -> None:
        pass

    def start(self, log_every: int, start_step: int, on_micro_batch: Callable[[int], None] | None = None) -> None:
        pass

    def rolled_back(self, step: int, val_loss: float | None, to_checkpoint: bool) -> None:
        pass

    def close_metrics(self) -> None:
        pass

    def finish(self, result: WorkerResult) -> None:
        pass

    def __call__(self, ev: Event) -> None:
        pass

    def warning(self, ev: WarningEvent) -> None:
        pass


Report = Reporter | NullReporter
