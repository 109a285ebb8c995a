"""The one weights-finite check (``core.precision.weights_finite``), used before every save and after every
rollback."""

from __future__ import annotations

import torch

from core.precision import weights_finite


def test_weights_finite() -> None:
    model = torch.nn.Linear(3, 2)
    assert weights_finite(model)
    with torch.no_grad():
        model.weight[0, 1] = float("nan")
    assert not weights_finite(model)
    assert weights_finite(torch.nn.Sequential())
