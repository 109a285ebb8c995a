"""``run_dir/metrics.jsonl``: one JSON object per line, appended as training goes.

Train lines: {"kind": "train", "step", "loss", "lr", "grad_norm", "tokens_per_s", "epoch", "time"}.
Eval lines:  {"kind": "eval", "step", "val_loss", "time"}.
Warning lines: {"kind": "warning", "step", "warning" (loss_spike, grad_spike, non_finite, overfitting,
lr_near_zero, oom_backoff, eval_oom_backoff, rollback, preflight, ...), "message", "time", + numbers}.
Timing lines: {"kind": "timing", "step", "loop_s", "data_s", "forward_backward_s", "optimizer_s", "eval_s",
"checkpoint_s", "other_s", "time" (+ "device_timed": true on CUDA)}: the training loop's seconds per phase since
the previous timing line, at a log_every step 10 s or more after the previous one and at the loop's end
(core/step_timing.py).
A skipped (non-finite) step's train line has "skipped": true and null loss / grad_norm.
A resumed run first cuts the file back to its checkpoint's step, so the steps it repeats are not
duplicated and the file reads as one continuous run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, TextIO

from trainbox.atomic import atomic_write_text

METRICS = "metrics.jsonl"


def truncate_to_step(path: Path, step: int, keep_kinds: tuple[str, ...] = ()) -> int:
    """Keep only well-formed lines with ``step <= step`` (all lines go when step < 0), and any line of
    ``keep_kinds``; returns how many were kept."""
    if not path.exists():
        return 0
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by a crash mid-write
        if not isinstance(obj, dict) or not isinstance(obj.get("step"), int):
            continue
        if obj["step"] <= step or obj.get("kind") in keep_kinds:
            kept.append(line)
    atomic_write_text(path, "".join(f"{line}\n" for line in kept))
    return len(kept)


class MetricsLog:
    """Appends lines, flushed at once, so a reader (or a crash) sees every finished line."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: TextIO = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def truncate(self, step: int) -> None:
        """Cut the file back to ``step`` (a rollback) and go on appending. Warning lines stay: they
        say why the steps after ``step`` are trained again."""
        self.close()
        truncate_to_step(self.path, step, keep_kinds=("warning",))
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, sort_keys=True) + "\n")
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
