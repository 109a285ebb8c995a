"""Per-example losses from the training forward pass: which example each loss position belongs to.

The step's loss is a sum over positions (``core.loss.staged_loss_sum``); with ``per_token`` it also hands back each
position's loss, detached, at no extra pass. This module maps those positions back to the pass's examples: in a
padded batch row ``r`` is example ``r``; in packed rows (``core.packing``) the examples lie end to end in the order
``place`` gives, so the map is rebuilt from the same placement. The plain loss gives one value per position of the
shifted labels; the chunked loss one per trained position (``core.loss.stage``'s order), the same positions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from core.encode import IGNORE, Example
from core.packing import place


def owners(examples: Sequence[Example], labels: torch.Tensor, packed: bool) -> torch.Tensor:
    """For each position of the shifted, flattened labels, the index (in ``examples``) of the example whose loss it
    is, -1 where no loss is taken."""
    owner = torch.full(labels.shape, -1, dtype=torch.long)
    if packed:
        lengths = [len(e.input_ids) for e in examples]
        for r, members in enumerate(place(lengths, labels.shape[1])):
            at = 0
            for i in members:
                owner[r, at : at + lengths[i]] = i
                at += lengths[i]
    else:
        owner[:] = torch.arange(labels.shape[0])[:, None]
    shifted_labels = F.pad(labels[:, 1:], (0, 1), value=IGNORE)
    shifted = F.pad(owner[:, 1:], (0, 1), value=-1)
    return torch.where(shifted_labels != IGNORE, shifted, -1).reshape(-1)


def example_losses(per_token: torch.Tensor, owner: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed loss, trained positions) per example from one pass's per-position losses. ``per_token`` holds one
    value per position of ``owner`` (the plain loss) or per trained position only (the chunked loss)."""
    trained = owner >= 0
    idx = owner if per_token.numel() == owner.numel() else owner[trained]
    keep = idx >= 0
    values = per_token.float()[keep.to(per_token.device)]
    sums = torch.zeros(n, dtype=torch.float32, device=per_token.device).index_add_(
        0, idx[keep].to(values.device), values
    )
    counts = torch.bincount(owner[trained], minlength=n)
    return sums, counts
