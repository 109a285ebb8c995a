"""The one weights-finite check (``core/weights.py``)."""

from __future__ import annotations

import torch

from core.weights import local_weights_finite


def test_local_weights_finite() -> None:
    model = torch.nn.Linear(3, 2)
    assert local_weights_finite(model)
    with torch.no_grad():
        model.weight[0, 1] = float("nan")
    assert not local_weights_finite(model)
    assert local_weights_finite(torch.nn.Sequential())
