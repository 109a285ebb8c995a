"""Where a job's training lands: checkpoints at the boundaries the loop asks for, and the final model.

Each save goes behind the disk guard (core.disk: it fits, or ``DiskFull`` before a byte is written) and is
written by rank 0 alone; sharded, every rank first takes part in gathering the full weights (a collective), so
the files are the unsharded ones whatever the run. A save the estimate got wrong still ends as ``DiskFull``
(the partial folder is gone, the last complete one stands).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from core import checkpoint, lora, sharding
from core.disk import DISK_ERRNOS, DiskGuard, estimate_checkpoint_bytes, weights_bytes
from core.errors import DiskFull, TrainingDiverged
from core.faults import Faults
from core.folders import publish_folder
from core.loading import LoadedJob
from core.precision import weights_finite
from core.reporting import Report
from core.train import Trainer
from trainbox.crashpoints import crash_point

FINAL = "final"
FINAL_EXTRA_BYTES = 16 * 1024**2  # tokenizer and config beside the weights


def save_final(run_dir: Path, model: Any, tokenizer: Any) -> Path:
    """``run_dir/final``: the trained model and its tokenizer, published whole or not at all."""
    if not weights_finite(model):
        raise TrainingDiverged(
            "the final weights are not finite; refusing to save them as a model",
            fix="lower learning_rate or check the data",
        )

    def fill(tmp: Path) -> None:
        extra = {"save_embedding_layers": False} if lora.is_peft(model) else {}  # as in core.checkpoint
        model.save_pretrained(tmp, safe_serialization=True, **extra)
        crash_point("worker.final_saving")  # chaos tests: the weights are in the temp folder, not yet published
        tokenizer.save_pretrained(tmp)

    return publish_folder(run_dir / FINAL, fill, tmp_prefix=".tmp-")


class JobSaver:
    """A job's saves: ``checkpoint`` is the loop's ``save_checkpoint``, ``final_model`` ends a completed run."""

    def __init__(
        self, run_dir: Path, job_id: int, job: LoadedJob, trainer: Trainer, report: Report, faults: Faults
    ) -> None:
        self.run_dir, self.job_id, self.job, self.trainer, self.report = run_dir, job_id, job, trainer, report
        self.main = job.ranks.is_main
        self.guard = DiskGuard(run_dir, job.cfg.disk_margin_mb * 1024**2, faults, on_deleted=self._deleted)

    def _deleted(self, found: list[checkpoint.CheckpointInfo]) -> None:
        self.report.checkpoints_deleted([c.path for c in found])

    def checkpoint(self) -> Path:
        """A checkpoint of the current step; the older ones beyond ``keep_checkpoints`` go."""
        job, trainer, step = self.job, self.trainer, self.trainer.state.step
        # sharded, gathering the full weights and optimizer state is a collective: every rank takes part
        to_save, state = (sharding.gather(job.model), trainer.state_dict()) if job.shard else (job.model, None)
        if not self.main:
            return checkpoint.checkpoints_dir(self.run_dir) / checkpoint.step_name(step)
        needed = estimate_checkpoint_bytes(self.run_dir, to_save, trainer.optimizer)
        self.guard.ensure("checkpoint", needed, step)
        try:
            saved = checkpoint.save(
                self.run_dir,
                step,
                to_save,
                job.tokenizer,
                state if state is not None else trainer.state_dict(),
                job.cfg.model_dump(mode="json"),
                self._meta(),
            )
        except OSError as e:  # the estimate was short: the partial folder is gone, the last one stands
            if e.errno in DISK_ERRNOS:
                raise DiskFull("checkpoint", needed, self.guard.free(), str(self.run_dir), self.guard.margin) from e
            raise
        self.guard.prune(job.cfg.keep_checkpoints)
        self.report.checkpoint_saved(saved.step, saved.path, checkpoint.read_meta(saved.path))
        return saved.path

    def _meta(self) -> dict[str, Any]:
        t = self.trainer
        st = t.state
        return {
            "job_id": self.job_id,
            "total_steps": t.total_steps,
            "train_loss": st.train_loss,
            "val_loss": st.last_val_loss,
            "best_val_loss": st.best_val_loss,
            "first_val_loss": st.first_val_loss,
            "micro_batch": t.micro_batch_size,
            "grad_accum": t.accum_steps,
        }

    def final_model(self) -> Path:
        """The trained model in ``run_dir/final`` (sharded: gathered on every rank for rank 0 to write)."""
        to_save = sharding.gather(self.job.model) if self.job.shard else self.job.model
        if not self.main:
            return self.run_dir / FINAL
        self.report.update(force=True, message="saving the final model")
        self.guard.ensure("final model", weights_bytes(to_save) + FINAL_EXTRA_BYTES, self.trainer.state.step)
        try:
            return save_final(self.run_dir, to_save, self.job.tokenizer)
        except OSError as e:
            if e.errno in DISK_ERRNOS:
                raise DiskFull("final model", weights_bytes(to_save), self.guard.free(), str(self.run_dir), 0) from e
            raise
