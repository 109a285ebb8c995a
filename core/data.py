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

from core.balance import balanced, even_parts
from core.encode import IGNORE, Example
from core.errors import DataError
from core.packing import pack_rows
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
    """Micro-batches of example indices, reshuffled each epoch, addressed by DataPosition.

    With ``lengths`` (``training.group_by_length``) each epoch's order is length-grouped (``group_by_length``):
    still a pure function of (seed, epoch), with the same number of micro-batches of the same size, so the
    data position, resume and the step count are unchanged. With ``balance`` (tokens per example;
    ``training.balance_tokens``) the plain shuffled order is cut into micro-batches of near-equal tokens
    (core.balance): the same number of micro-batches, of varying example counts."""

    def __init__(
        self,
        n_examples: int,
        batch_size: int,
        seed: int,
        lengths: Sequence[int] | None = None,
        balance: Sequence[int] | None = None,
    ) -> None:
        if n_examples < 1:
            raise ValueError("no training examples")
        if any(x is not None and len(x) != n_examples for x in (lengths, balance)):
            raise ValueError("one length per example")
        if lengths is not None and balance is not None:
            raise ValueError("length grouping and token balancing are two orders: one at a time")
        self.n = n_examples
        self.batch_size = batch_size
        self.seed = seed
        self.lengths = lengths
        self.balance = balance
        self.per_epoch = math.ceil(n_examples / batch_size)
        self._cached: tuple[int, list[int]] | None = None
        self._cuts: tuple[int, list[list[int]]] | None = None

    @property
    def order_kind(self) -> str:
        if self.balance is not None:
            return "token_balanced"
        return "random" if self.lengths is None else "length_grouped"

    def ungroup(self) -> None:
        """Back to plain shuffled order (a checkpoint made before length grouping or token balancing existed)."""
        self.lengths, self.balance, self._cached, self._cuts = None, None, None, None

    def order(self, epoch: int) -> list[int]:
        if self._cached is None or self._cached[0] != epoch:
            perm = list(range(self.n))
            random.Random(self.seed + epoch).shuffle(perm)
            if self.lengths is not None:
                perm = group_by_length(perm, self.lengths, self.batch_size, random.Random(self.seed + epoch + 1))
            self._cached = (epoch, perm)
        return self._cached[1]

    def take(self, pos: DataPosition) -> tuple[list[int], DataPosition]:
        """The indices of the micro-batch at ``pos`` and the position after it."""
        if self.balance is not None:
            if self._cuts is None or self._cuts[0] != pos.epoch:
                self._cuts = (pos.epoch, balanced(self.order(pos.epoch), self.balance, self.batch_size))
            indices = self._cuts[1][pos.index]
        else:
            start = pos.index * self.batch_size
            indices = self.order(pos.epoch)[start : start + self.batch_size]
        nxt = DataPosition(pos.epoch, pos.index + 1)
        if nxt.index >= self.per_epoch:
            nxt = DataPosition(pos.epoch + 1, 0)
        return indices, nxt

    def passes(self, indices: list[int], micro: int) -> list[list[int]]:
        """One micro-batch's (or a rank's share's) forward passes at ``micro`` examples per pass: consecutive
        runs of ``micro``; token-balanced, as many even runs as ``batch_size / micro`` (a balanced micro-batch of
        short examples holds more than ``batch_size``: still one pass until an out-of-memory back-off)."""
        if self.balance is not None:
            return even_parts(indices, math.ceil(self.batch_size / micro))
        return [indices[i : i + micro] for i in range(0, len(indices), micro)]

    def pass_count(self, n: int, micro: int) -> int:
        """How many forward passes ``passes`` makes of ``n`` examples (FSDP pads every rank to rank 0's)."""
        return len(self.passes(list(range(n)), micro))


MEGA_BATCH = 50  # micro-batches per length group: Hugging Face's LengthGroupedSampler's mega_batch_mult


def group_by_length(perm: list[int], lengths: Sequence[int], batch_size: int, rng: random.Random) -> list[int]:
    """``perm`` regrouped (HF's ``get_length_grouped_indices``): cut into mega-batches of ``MEGA_BATCH``
    micro-batches, each sorted longest first and split into micro-batches; the micro-batches are then
    shuffled, and the one holding the longest example goes first, so an out-of-memory error shows at the
    first step (where the back-off is cheapest). A short last micro-batch stays last, so every other one is
    full. Why not a token budget per micro-batch: it would change how many examples a step trains and the
    number of steps, the schedule, the per-rank split and the back-off, all counted in examples."""
    mega = batch_size * MEGA_BATCH
    groups: list[list[int]] = []
    for start in range(0, len(perm), mega):
        part = sorted(perm[start : start + mega], key=lambda i: -lengths[i])  # stable: ties keep the shuffle
        groups += [part[k : k + batch_size] for k in range(0, len(part), batch_size)]
    tail = [groups.pop()] if len(groups[-1]) < batch_size else []
    rng.shuffle(groups)
    if groups:
        longest = max(range(len(groups)), key=lambda g: lengths[groups[g][0]])
        groups.insert(0, groups.pop(longest))
    return [i for g in groups + tail for i in g]


def total_steps(max_steps: int, epochs: float, micro_batches_per_epoch: int, grad_accum: int) -> int:
    if max_steps > 0:
        return max_steps
    return max(1, math.ceil(epochs * micro_batches_per_epoch / grad_accum))


def collate(examples: Sequence[Example], pad_id: int, packed: bool = False) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example in the batch; padding is masked from attention and loss.

    ``packed``: padding-free rows instead (``core.packing.pack_rows``)."""
    if packed:
        return pack_rows(examples, pad_id)
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


MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")


def model_inputs(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, Any]:
    """The model's keyword arguments for a collated batch (not the labels), on ``device``. No KV cache:
    training never reuses it, and with a cache transformers ignores packed position ids (attention would
    then cross examples)."""
    return {"use_cache": False, **{k: batch[k].to(device, non_blocking=True) for k in MODEL_INPUTS if k in batch}}


def real_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens of the batch that are not padding."""
    if "tokens" in batch:  # packed rows: their filler is not counted
        return int(batch["tokens"])
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()
