"""Validation split, shuffled micro-batches, and the data position that makes resume exact.

Everything here is a pure function of (records, seed, epoch): the split depends only on the seed,
epoch e's order only on seed + e. So a run that restarts from a checkpoint holding the data position
(epoch, micro-batch index) sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from core.encode import IGNORE, Example
from core.errors import DataError
from trainbox.records import LineError, Record, iter_lines

T = TypeVar("T")


def read_records(path: Path, tick: Callable[[], None] | None = None, lines: list[int] | None = None) -> list[Record]:
    """Every record of a file that must be valid (admission checked it; the worker re-checks it while
    streaming, by the same rules): the first bad line raises, named. ``tick`` is called after each
    record, so reading millions of them keeps the worker's heartbeat (core.heartbeat.Progress). ``lines``
    gets each record's line number (the job report names lines)."""
    out = []
    for n, item in iter_lines(path):
        if isinstance(item, LineError):  # a line that no longer validates
            raise DataError(
                f"{Path(path).name}: {item}", fix="fix or remove the line named, then submit the file again"
            )
        out.append(item)
        if lines is not None:
            lines.append(n)
        if tick is not None:
            tick()
    return out


def heldout_count(n: int, fraction: float, cap: int) -> int:
    """How many of n records to hold out: at least one when there are two or more, never all."""
    if n < 2 or fraction <= 0:
        return 0
    return max(1, min(round(n * fraction), cap, n - 1))


def split_heldout(items: Sequence[T], fraction: float, cap: int, seed: int) -> tuple[list[T], list[T]]:
    """(train, validation), the validation items chosen by a seeded shuffle, both in file order."""
    k = heldout_count(len(items), fraction, cap)
    chosen = set(random.Random(seed).sample(range(len(items)), k))
    train = [x for i, x in enumerate(items) if i not in chosen]
    val = [x for i, x in enumerate(items) if i in chosen]
    return train, val


@dataclass(frozen=True)
class DataPosition:
    """The next micro-batch to read: micro-batch ``index`` of epoch ``epoch``'s permutation."""

    epoch: int = 0
    index: int = 0


class Batches:
    """Micro-batches of example indices, reshuffled each epoch, addressed by DataPosition."""

    def __init__(self, n_examples: int, batch_size: int, seed: int) -> None:
        if n_examples < 1:
            raise ValueError("no training examples")
        self.n = n_examples
        self.batch_size = batch_size
        self.seed = seed
        self.per_epoch = math.ceil(n_examples / batch_size)
        self._cached: tuple[int, list[int]] | None = None

    def order(self, epoch: int) -> list[int]:
        if self._cached is None or self._cached[0] != epoch:
            perm = list(range(self.n))
            random.Random(self.seed + epoch).shuffle(perm)
            self._cached = (epoch, perm)
        return self._cached[1]

    def take(self, pos: DataPosition) -> tuple[list[int], DataPosition]:
        """The indices of the micro-batch at ``pos`` and the position after it."""
        start = pos.index * self.batch_size
        indices = self.order(pos.epoch)[start : start + self.batch_size]
        nxt = DataPosition(pos.epoch, pos.index + 1)
        if nxt.index >= self.per_epoch:
            nxt = DataPosition(pos.epoch + 1, 0)
        return indices, nxt


def total_steps(max_steps: int, epochs: float, micro_batches_per_epoch: int, grad_accum: int) -> int:
    if max_steps > 0:
        return max_steps
    return max(1, math.ceil(epochs * micro_batches_per_epoch / grad_accum))


def collate(examples: Sequence[Example], pad_id: int, packed: bool = False) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example in the batch; padding is masked from attention and loss.

    ``packed``: one padding-free row instead (``pack``)."""
    if packed:
        return pack(examples)
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids, dtype=torch.long)
        labels[row, :n] = torch.tensor(e.labels, dtype=torch.long)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pack(examples: Sequence[Example]) -> dict[str, torch.Tensor]:
    """The examples end to end in one row, no padding: position ids restart at 0 for each example, and
    with no attention mask transformers reads the boundaries from them (``find_packed_sequence_indices``)
    and builds a block-diagonal causal mask, so no token attends across examples. The first label of
    every example is ignored: it would be predicted from the previous example's last token. So the loss
    and gradients equal the padded batch's, with no compute spent on padding."""
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for e in examples:
        ids += e.input_ids
        labels += [IGNORE, *e.labels[1:]]
        positions += range(len(e.input_ids))
    return {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "position_ids": torch.tensor([positions], dtype=torch.long),
        "labels": torch.tensor([labels], dtype=torch.long),
    }


MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")


def model_inputs(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, Any]:
    """The model's keyword arguments for a collated batch (not the labels), on ``device``. No KV cache:
    training never reuses it, and with a cache transformers ignores packed position ids (attention would
    then cross examples)."""
    return {"use_cache": False, **{k: batch[k].to(device, non_blocking=True) for k in MODEL_INPUTS if k in batch}}


def real_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens of the batch that are not padding."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()
