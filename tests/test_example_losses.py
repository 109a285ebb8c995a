"""The worker's per-example losses for the job report (core/example_losses.py), on a stand-in model
whose predictions are known: each row's loss is the training loss of that example alone, padding
changes nothing, and the examples far above the median are named by their lines."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

from core.data import collate
from core.encode import IGNORE, Example
from core.example_losses import per_example, score
from core.loss import mean_loss

VOCAB = 8


class Confident(torch.nn.Module):
    """Predicts token 1 everywhere, strongly: examples whose targets are 1 are learned, others not."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = torch.nn.Parameter(torch.tensor([0.0, 6.0] + [0.0] * (VOCAB - 2)))

    def forward(self, input_ids: torch.Tensor, **_: Any) -> SimpleNamespace:
        return SimpleNamespace(logits=self.bias.expand(*input_ids.shape, VOCAB))


def example(target: int, n: int) -> Example:
    return Example([0] + [target] * n, [IGNORE] + [target] * n)


def test_per_example_loss_is_each_examples_training_loss_with_padding_ignored() -> None:
    model, cpu = Confident(), torch.device("cpu")
    learned, unlearned = example(1, 3), example(2, 6)
    both = per_example(model, collate([learned, unlearned], pad_id=0), cpu)
    alone = [mean_loss(model, [collate([e], pad_id=0)], cpu) for e in (learned, unlearned)]
    assert both == pytest.approx(alone, rel=1e-4)  # float32 sums in another order
    assert both[0] < 0.05 and both[1] > 5


def test_score_names_the_lines_never_learned() -> None:
    model = Confident()
    examples = [example(1, 4) for _ in range(17)] + [example(3, 4) for _ in range(3)]
    lines = [10 + i for i in range(20)]
    beats: list[tuple[int, int]] = []
    out = score(model, examples, lines, 0, torch.device("cpu"), 8, lambda d, n: beats.append((d, n)))
    assert out.scored == 20 and [e.line for e in out.never_learned] == [27, 28, 29]
    assert out.threshold == pytest.approx(max(out.p75 + 3 * (out.p75 - out.p25), out.median + 1.5), abs=1e-3)
    assert beats == [(8, 20), (16, 20), (20, 20)] and model.training  # its mode restored
