"""Which training examples still teach the model something: the per-example loss table and the selection rule.

``LossTable`` holds, per training example (its index in the training set), the last loss measured on it (mean per
trained token, from the training forward pass or a forward-only re-measurement), the step it was measured at, and
how often it was measured and skipped. Nothing here runs a model: the engine records what the step already computed.

``select`` is Selective-Backprop's rule (Jiang et al. 2019) on that table, used before the forward pass (its
"stale" variant): an example is kept with probability ``max(floor, F(loss) ** beta)``, ``F`` the share of the
table's losses at or below its predicted loss, so the hardest examples are always trained and the learned ones
(low loss) mostly skipped; ``beta = 1 / keep_share - 1`` makes the expected kept share ``keep_share`` when the
losses are spread (a uniform ``F``). Examples never measured, or last measured more than ``max_stale`` steps ago, are
always kept: a skipped example's loss is a prediction, and it is trusted only while recent; so is one whose
re-measured loss rose (``force``, set by the correct phase) until it is trained. With ``learned_below`` only
examples whose predicted loss is below that share of the table's mean loss may be skipped at all: the rank rule
alone skips its share of the lowest losses even where nothing is learned yet (a model trained from scratch). The
mean, not the median: where most of a file was learned before (a continual job repeating an earlier file), the
median is a learned example's loss. The draw is seeded by (seed, step, draw), so a resumed run selects exactly what
an uninterrupted one did.

The predicted loss of an example is its last measured loss grown by the measured forgetting rate for the steps
since (``forget_rate``, per step, from the correct phase's re-measurements: ``calibrate``), so a predictor that
finds skipped examples creeping back up keeps more of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

FIELDS = ("loss", "step", "seen", "skips", "first_skip", "last_skip", "force")


@dataclass(frozen=True)
class Selection:
    kept: list[int]  # example indices that get the forward and backward pass, in the step's order
    skipped: list[int]  # predicted learned: no pass at all this step


class LossTable:
    """Per-example last loss, the step it was measured at, and counts; plain arrays, checkpointed as tensors."""

    def __init__(self, n: int) -> None:
        self.loss = np.full(n, np.nan)  # mean loss per trained token, last measured
        self.step = np.full(n, -1, dtype=np.int64)  # step it was measured at (-1: never)
        self.seen = np.zeros(n, dtype=np.int64)  # times measured
        self.skips = np.zeros(n, dtype=np.int64)  # times skipped as learned
        self.first_skip = np.full(n, -1, dtype=np.int64)  # step it was first skipped (-1: never)
        self.last_skip = np.full(n, -1, dtype=np.int64)  # step it was last skipped (-1: never)
        self.force = np.zeros(n, dtype=bool)  # trained at its next turn (its re-measured loss rose)

    def __len__(self) -> int:
        return len(self.loss)

    def record(self, ids: list[int], losses: list[float], step: int) -> None:
        """Losses measured at ``step`` (non-finite ones are not recorded: they say nothing about the example)."""
        for i, value in zip(ids, losses, strict=True):
            if math.isfinite(value):
                self.loss[i], self.step[i] = value, step
                self.seen[i] += 1

    def trained(self, ids: list[int]) -> None:
        """These examples got their forward and backward pass: a pending ``force`` is served."""
        if ids:
            self.force[np.asarray(ids, dtype=np.int64)] = False

    def mark_skipped(self, ids: list[int], step: int) -> None:
        if ids:
            idx = np.asarray(ids, dtype=np.int64)
            self.skips[idx] += 1
            first = idx[self.first_skip[idx] < 0]
            self.first_skip[first] = step
            self.last_skip[idx] = step

    def skipped_since_measured(self) -> np.ndarray:
        """Indices of the examples skipped since their loss was last measured: what a correction re-measures."""
        return np.flatnonzero(self.last_skip > self.step)

    def coverage(self) -> float:
        """Share of the examples measured at least once."""
        return float(np.isfinite(self.loss).mean()) if len(self.loss) else 0.0

    def predicted(self, step: int, forget_rate: float = 0.0) -> np.ndarray:
        """Each example's predicted loss now: the last measured one, grown by ``forget_rate`` per step since (NaN
        where never measured)."""
        age = np.maximum(step - self.step, 0)
        return self.loss * np.exp(forget_rate * age) if forget_rate else self.loss.copy()

    def most_skipped(self, k: int) -> list[tuple[int, int, int]]:
        """(index, times skipped, first skipped step) of the ``k`` examples skipped most: learned early."""
        order = np.lexsort((self.first_skip, -self.skips))
        return [(int(i), int(self.skips[i]), int(self.first_skip[i])) for i in order[:k] if self.skips[i] > 0]

    def highest_loss(self, k: int) -> list[tuple[int, float]]:
        """(index, last loss) of the ``k`` examples with the highest last loss: never learned, often bad data."""
        finite = np.flatnonzero(np.isfinite(self.loss))
        order = finite[np.argsort(-self.loss[finite], kind="stable")]
        return [(int(i), float(self.loss[i])) for i in order[:k]]

    def state_dict(self) -> dict[str, Any]:
        return {name: torch.from_numpy(getattr(self, name).copy()) for name in FIELDS}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["loss"]) != len(self.loss):
            raise ValueError(f"loss table of {len(state['loss'])} examples, this run has {len(self.loss)}")
        for name in FIELDS:
            setattr(self, name, state[name].numpy().copy())


@dataclass(frozen=True)
class Rule:
    """The selection rule's knobs (``HybridConfig``: keep_share from the bandit, the rest configured)."""

    keep_share: float  # expected share of examples kept (1: keep everything)
    floor: float  # least keep probability of any example (every learned one is still trained now and then)
    max_stale: int  # steps after which a measured loss is no longer trusted: the example is kept
    forget_rate: float = 0.0  # per-step growth of a skipped example's loss, measured (``calibrate``)
    learned_below: float = 0.0  # only predicted losses below this share of the table's mean may be skipped (0: off)


def keep_probability(predicted: np.ndarray, reference: np.ndarray, keep_share: float, floor: float) -> np.ndarray:
    """``max(floor, F(x) ** beta)`` per predicted loss ``x``; ``reference`` is the sorted losses ``F`` counts in."""
    if keep_share >= 1.0 or len(reference) == 0:
        return np.ones(len(predicted))
    beta = 1.0 / max(keep_share, 1e-6) - 1.0
    cdf = np.searchsorted(reference, predicted, side="right") / len(reference)
    return np.maximum(floor, cdf**beta)


def select(
    ids: list[int], table: LossTable, step: int, seed: int, rule: Rule, at_least: int = 1, draw: int = 0
) -> Selection:
    """The examples of a micro-batch (``ids``) to train, and those predicted learned; at least ``at_least`` kept
    (the highest predicted losses), so every step trains something and the optimizer's step count stays the
    schedule's. A pure function of the table, the step, the seed and ``draw`` (which micro-batch of the step read
    it: each gets its own draw, else their examples at the same place would be kept or skipped together)."""
    if rule.keep_share >= 1.0 or not ids:
        return Selection(list(ids), [])
    pred_all = table.predicted(step, rule.forget_rate)
    reference = np.sort(pred_all[np.isfinite(pred_all)])
    idx = np.asarray(ids, dtype=np.int64)
    pred = pred_all[idx]
    p = keep_probability(np.nan_to_num(pred, nan=np.inf), reference, rule.keep_share, rule.floor)
    must = ~np.isfinite(pred) | (step - table.step[idx] > rule.max_stale) | table.force[idx]
    if rule.learned_below > 0 and len(reference):  # an absolute "learned": not merely the lowest of the rest
        must |= ~(pred < rule.learned_below * float(reference.mean()))
    key = [seed, step] if draw == 0 else [seed, step, draw]
    u = np.random.Generator(np.random.PCG64(key)).random(len(ids))
    keep = must | (u < p)
    if keep.sum() < min(at_least, len(ids)):
        order = np.argsort(-np.nan_to_num(pred, nan=np.inf), kind="stable")
        keep[order[:at_least]] = True
    return Selection(
        [i for i, k in zip(ids, keep.tolist(), strict=True) if k],
        [i for i, k in zip(ids, keep.tolist(), strict=True) if not k],
    )


def calibrate(old: list[float], new: list[float], ages: list[int]) -> float | None:
    """The forgetting rate per step that re-measured skipped examples show: the median of ``log(new / old) / age``
    (None without a usable pair). Positive: skipped examples drift back up; negative: they keep improving."""
    rates = [
        math.log(n / o) / a
        for o, n, a in zip(old, new, ages, strict=True)
        if o > 0 and n > 0 and a > 0 and math.isfinite(n)
    ]
    return float(np.median(rates)) if rates else None
