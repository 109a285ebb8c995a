"""The optimizer (AdamW) and its learning-rate schedules: linear warmup, then cosine decay to a floor; and the
hybrid engine's warmup-stable-decay (``wsd_lr_at``), whose decay starts where its curve model says.

The schedule is a pure function of the step (nanoGPT's ``get_lr``), so there is no scheduler object whose
state could drift from the step counter: resuming at step k gives exactly the lr of step k.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from trainbox.config import TrainingConfig


def make_optimizer(model: torch.nn.Module, cfg: TrainingConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on biases and norm gains); fused when possible."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    kwargs: dict[str, Any] = {"lr": cfg.learning_rate, "betas": (cfg.beta1, cfg.beta2)}
    if device.type in ("cuda", "cpu"):
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except (RuntimeError, TypeError):
            pass
    return torch.optim.AdamW(groups, foreach=True, **kwargs)


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


def wsd_lr_at(
    step: int, total_steps: int, peak: float, warmup_ratio: float, min_lr_ratio: float, decay: tuple[int, int] | None
) -> float:
    """Warmup-stable-decay (Hu et al. 2024, MiniCPM): the same warmup, then the peak until ``decay = (start,
    steps)`` begins, then a linear decay to the floor over ``steps`` (held there after). ``None``: no decay yet."""
    warmup = warmup_steps(total_steps, warmup_ratio)
    if step < warmup:
        return peak * (step + 1) / (warmup + 1)
    if decay is None or step < decay[0]:
        return peak
    floor = peak * min_lr_ratio
    progress = min(1.0, (step - decay[0] + 1) / max(decay[1], 1))
    return peak - progress * (peak - floor)
