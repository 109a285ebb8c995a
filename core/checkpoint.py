"""Checkpoints: self-describing folders that are either complete or absent.

``run_dir/checkpoints/step-00000050/`` holds
  model/      save_pretrained (safetensors) + tokenizer: loadable on its own with the Auto classes
  state.pt    trainer state (step, data position, losses), optimizer, RNG, the training config,
              format version; tensors and plain values only, so it loads with weights_only=True
  meta.json   step, losses, time, size: for people and the DB, without loading torch
  COMPLETE    written last
It is written into a ``.tmp-*`` folder, every file fsynced, then renamed into place and the parent
fsynced, so a crash at any moment leaves either the whole checkpoint or none. Readers also require the
marker, which guards against copies made by other tools.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from core.errors import CheckpointError
from core.folders import folder_size, fsync_tree, publish_folder
from trainbox import run_temp
from trainbox.atomic import fsync_dir
from trainbox.crashpoints import crash_point

log = logging.getLogger("core.worker")
FORMAT_VERSION = 1
CHECKPOINTS, COMPLETE = run_temp.CHECKPOINTS, run_temp.COMPLETE  # one naming, shared with the start-up sweep
MODEL = "model"
STATE = "state.pt"
META = "meta.json"
_NAME = re.compile(r"^step-(\d{8,})$")


@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    path: Path


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def complete_checkpoints(run_dir: Path) -> list[CheckpointInfo]:
    """Complete checkpoints of a run, oldest first; partial or foreign folders are ignored."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _NAME.match(child.name)
        if m and (child / COMPLETE).is_file():
            found.append(CheckpointInfo(int(m.group(1)), child))
    return sorted(found, key=lambda c: c.step)


def latest_complete(run_dir: Path) -> CheckpointInfo | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def remove_partial(run_dir: Path) -> list[Path]:
    """Sweep the temp folders a worker that died while saving left (the final model's and the
    checkpoints'; ``trainbox.run_temp``): removed, or, the only copy of a complete checkpoint, put back.
    Returns the temp folders found. Called by the worker holding the run folder's lock."""
    found = run_temp.sweep_run(run_dir)
    for leftover in found:
        log.info("leftover of an interrupted save %s: %s", leftover.action, leftover.path)
    return [leftover.path for leftover in found]


def save(
    run_dir: Path,
    step: int,
    model: Any,
    tokenizer: Any,
    state: dict[str, Any],
    config: dict[str, Any],
    meta: dict[str, Any],
) -> CheckpointInfo:
    """Write a complete checkpoint for ``step`` and return it (replacing one of the same step)."""
    final = checkpoints_dir(run_dir) / step_name(step)

    def fill(tmp: Path) -> None:
        # a LoRA model saves its adapter only (peft); no embedding layers: trainbox never resizes them
        extra = {"save_embedding_layers": False} if hasattr(model, "peft_config") else {}
        model.save_pretrained(tmp / MODEL, safe_serialization=True, **extra)
        crash_point("worker.checkpoint_saving")  # chaos tests: weights written, no state.pt, no COMPLETE
        tokenizer.save_pretrained(tmp / MODEL)
        torch.save({**state, "config": config, "format_version": FORMAT_VERSION, "step": step}, tmp / STATE)
        info = {**meta, "step": step, "time": time.time(), "format_version": FORMAT_VERSION}
        info["size_bytes"] = folder_size(tmp)
        (tmp / META).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        fsync_tree(tmp)  # everything durable before the marker that vouches for it
        (tmp / COMPLETE).write_text(f"{step}\n", encoding="utf-8")

    publish_folder(final, fill)
    return CheckpointInfo(step, final)


def prune(run_dir: Path, keep: int) -> list[CheckpointInfo]:
    """Delete complete checkpoints beyond the newest ``keep``; returns the deleted ones."""
    found = complete_checkpoints(run_dir)
    doomed = found[: max(0, len(found) - keep)]
    for c in doomed:
        # rename out of sight first: a crash mid-delete leaves only a .tmp-* folder to sweep up
        trash = c.path.with_name(f".tmp-deleted-{c.path.name}")
        os.rename(c.path, trash)
        shutil.rmtree(trash, ignore_errors=True)
    if doomed:
        fsync_dir(checkpoints_dir(run_dir))
    return doomed


def load_state(checkpoint: Path) -> dict[str, Any]:
    """The trainer state of a complete checkpoint (tensors and plain values only)."""
    if not (checkpoint / COMPLETE).is_file():
        raise CheckpointError(f"{checkpoint}: not a complete checkpoint (no {COMPLETE} marker)")
    state: dict[str, Any] = torch.load(checkpoint / STATE, map_location="cpu", weights_only=True)
    version = state.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{checkpoint}: checkpoint format {version}, this engine reads {FORMAT_VERSION}")
    return state


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """A save_pretrained folder's safetensors tensors by name (CPU)."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no safetensors weights to roll back to")
    loaded: dict[str, torch.Tensor] = {}
    for f in files:
        loaded.update(load_file(f))
    return loaded


def load_weights(model: Any, folder: Path) -> None:
    """Load a save_pretrained folder's safetensors into ``model`` in place (for a rollback: the model,
    its optimizer and device placement stay). Tied weights absent from the files are fine."""
    apply_weights(model, read_weights(folder), folder)


def apply_weights(model: Any, loaded: dict[str, torch.Tensor], folder: Path) -> None:
    """``loaded`` (full tensors by name, read from ``folder``) into ``model`` in place; a tied weight may be
    absent, any other missing or unexpected name is an error naming the folder."""
    missing, unexpected = model.load_state_dict(loaded, strict=False)
    mine = model.state_dict()
    loaded_ptrs = {mine[k].data_ptr() for k in loaded if k in mine}
    untied = [k for k in missing if mine[k].data_ptr() not in loaded_ptrs]
    if unexpected or untied:
        raise CheckpointError(f"{folder}: weights do not match the model (missing {untied}, unexpected {unexpected})")


def read_meta(checkpoint: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((checkpoint / META).read_text(encoding="utf-8"))
    return data
