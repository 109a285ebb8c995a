"""The training loss, defined once: the loop trains on it and ``management/evaluate.py`` scores model versions
with it (``mean_loss``), so a version's evaluation number is the same quantity as a job's validation loss."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F

from core.data import model_inputs
from core.encode import IGNORE, Example


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over trained positions (labels are aligned with inputs). The labels
    are shifted, not the logits: slicing the logits (batch x length x vocab, the largest activation) would
    copy them, and again in backward (measured: 131 vs 82 ms per micro-batch of 4 x 64 on SmolLM2)."""
    vocab = logits.shape[-1]
    shifted = F.pad(labels[:, 1:], (0, 1), value=IGNORE)
    return F.cross_entropy(logits.reshape(-1, vocab).float(), shifted.reshape(-1), ignore_index=IGNORE, reduction="sum")


def trained_positions(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != IGNORE).sum())


def example_trained(e: Example) -> int:
    """``trained_positions`` of one example, without collating it."""
    return sum(1 for label in e.labels[1:] if label != IGNORE)


@torch.no_grad()
def mean_loss(
    model: Any,
    batches: Iterable[dict[str, torch.Tensor]],
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
) -> float:
    """Mean loss per trained token over collated batches, no gradient (evaluation, the hybrid probe, the
    eval gate); the model is left in the mode it was in."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        with autocast():
            logits = model(**model_inputs(batch, device)).logits
        total += float(token_loss_sum(logits, batch["labels"].to(device)))
        count += trained_positions(batch["labels"])
    model.train(was_training)
    return total / max(count, 1)
