"""One check of a model's weights, for every place that must never save or load non-finite ones
(``core.worker``'s load, the trainer's save): this rank's shards of a sharded model, or the whole
of a plain one. Agreeing across ranks is the caller's (a collective only it knows it is in).

Added for the core split to adopt: ``core.worker.weights_finite`` and ``Trainer._weights_finite``'s
local part are this check twice today."""

from __future__ import annotations

from typing import Any

import torch

from core import sharding


def local_weights_finite(model: Any) -> bool:
    """Whether every parameter (this rank's shard of a sharded one) is finite; a model without
    parameters is."""
    flags = [torch.isfinite(sharding.local(p)).all() for p in model.parameters()]
    return bool(torch.stack(flags).all()) if flags else True
