"""The learning-rate schedule: linear warmup, then cosine decay to a floor.

A pure function of the step (nanoGPT's ``get_lr``), so there is no scheduler object whose state
could drift from the step counter: resuming at step k gives exactly the lr of step k.
"""

from __future__ import annotations

import math


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    return math.ceil(total_steps * warmup_ratio)


def lr_at(step: int, total_steps: int, peak: float, warmup_ratio: float, min_lr_ratio: float) -> float:
    """Learning rate for optimizer step ``step`` (0-based) of ``total_steps``."""
    warmup = warmup_steps(total_steps, warmup_ratio)
    if step < warmup:
        return peak * (step + 1) / (warmup + 1)
    floor = peak * min_lr_ratio
    decay_steps = max(1, total_steps - warmup)
    progress = min(1.0, (step - warmup) / decay_steps)
    return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (peak - floor)
