"""The disk guard: before a save, make sure it fits, or stop cleanly without writing anything.

A checkpoint is expected to be as big as the previous one (or, for the first, weights plus AdamW's
two moments plus the tokenizer's few MB, which the margin covers). When free space is short, this
run's older checkpoints go first (never the newest complete one: it is what a resume needs); if
still short, ``DiskFull`` is raised before any byte is written.
"""

from __future__ import annotations

import errno
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from core import checkpoint
from core.errors import DiskFull
from core.faults import Faults
from core.folders import folder_size

DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT)  # an OSError that means the disk is full, not a fault of the run


def weights_bytes(model: Any) -> int:
    """Bytes of the model's tensors as save_pretrained writes them (tied tensors once; for a LoRA
    model, the adapter only)."""
    if hasattr(model, "peft_config"):
        return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    seen, total = set(), 0
    for t in model.state_dict().values():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def optimizer_bytes(optimizer: Any) -> int:
    return sum(
        v.numel() * v.element_size()
        for state in optimizer.state.values()
        for v in state.values()
        if hasattr(v, "numel") and v.dim() > 0
    )


def estimate_checkpoint_bytes(run_dir: Path, model: Any, optimizer: Any) -> int:
    """The previous checkpoint's size when there is one, else weights + optimizer state."""
    latest = checkpoint.latest_complete(run_dir)
    if latest is not None:
        try:
            size = int(checkpoint.read_meta(latest.path).get("size_bytes", 0))
            if size > 0:
                return size
        except (OSError, ValueError):
            pass
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return weights_bytes(model) + max(optimizer_bytes(optimizer), 2 * 4 * params)


class DiskGuard:
    """``ensure(what, needed, step)`` before each save; ``prune(keep)`` is the run's own retention.

    Test-only faults (core.faults): ``diskfull@K`` makes the check of a save at step K or later see
    0 bytes free; ``diskfree=BYTES`` makes every check see BYTES plus what this guard deleted."""

    def __init__(
        self,
        run_dir: Path,
        margin_bytes: int,
        faults: Faults | None = None,
        on_deleted: Callable[[list[checkpoint.CheckpointInfo]], None] | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.margin = margin_bytes
        self.faults = faults or Faults()
        self.on_deleted = on_deleted
        self.deleted_bytes = 0
        self._full = False

    def free(self) -> int:
        if self._full:
            return 0
        if self.faults.disk_free is not None:
            return self.faults.disk_free + self.deleted_bytes
        root = self.run_dir
        while not root.exists():
            root = root.parent
        return int(shutil.disk_usage(root).free)

    def prune(self, keep: int) -> list[checkpoint.CheckpointInfo]:
        """Delete this run's complete checkpoints beyond the newest ``keep``."""
        sizes = {c.path: folder_size(c.path) for c in checkpoint.complete_checkpoints(self.run_dir)}
        deleted = checkpoint.prune(self.run_dir, keep)
        self.deleted_bytes += sum(sizes.get(c.path, 0) for c in deleted)
        if deleted and self.on_deleted is not None:
            self.on_deleted(deleted)
        return deleted

    def ensure(self, what: str, needed: int, step: int) -> None:
        """Return when ``needed`` bytes plus the margin are free, deleting older checkpoints (never the
        newest: a resume needs it) if that is what it takes; else raise ``DiskFull``, nothing written."""
        self._full = self.faults.fire("diskfull", step)
        try:
            if self.free() >= needed + self.margin:
                return
            self.prune(keep=1)
            free = self.free()
            if free < needed + self.margin:
                raise DiskFull(what, needed, free, str(self.run_dir), self.margin)
        finally:
            self._full = False
