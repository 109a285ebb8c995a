"""A step's loss and gradient norm read one step late, so the host does not wait on the device every step.

On a GPU the host queues a step's kernels and goes on; reading a number back (``.tolist()``) makes it wait until
the device has finished everything queued so far. Reading each step's loss and gradient norm as soon as the step
is queued leaves the device idle while the host then prepares and queues the next step. So the loop holds a
step's two numbers on the device (``Held``) and reads them after the next step is queued, when the device is busy
with that one, or at a boundary (evaluation, checkpoint, the end, a stop), so a checkpoint never holds a step
whose numbers were not seen. The step's records (its metrics line, the loss history, the health checks, a
skipped step's count towards a rollback) are made when it is read, in order, with the step number it had.

What needs the numbers before the next step cannot wait for them, so it is done on the device: a step whose loss
or gradient norm is not finite is masked inside the fused AdamW kernel (``found_inf``, the flag torch's gradient
scaler uses: no weight, moment or step count changes), which is what the host-side skip did; the skip is then
counted when the step is read, and a run of them rolls back to the last checkpoint as before. Where the decision
must be taken on the host at once, the step is read at once, as before: fp16's gradient scaler (an overflowed
step reruns), the hybrid engine (its next move depends on the loss), an optimizer without the fused kernel.
On the CPU nothing runs ahead of the host, so this changes no time there; it runs anyway, so the tests cover the
path a GPU takes, and the numbers are bitwise those of reading at once (``found_inf`` = 0 changes nothing).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from core.state import StepResult


@dataclass(frozen=True)
class Pending:
    """A queued step's [loss, gradient norm] on the device, and its real tokens (known on the host)."""

    values: torch.Tensor
    tokens: int

    def read(self) -> StepResult:
        """The one host sync of the step."""
        loss, norm = self.values.tolist()
        return StepResult(loss, norm, self.tokens, skipped=not (math.isfinite(loss) and math.isfinite(norm)))


@dataclass(frozen=True)
class Held:
    """What the step's event needs, taken when the step ran; its numbers read later (``result``)."""

    step: int
    lr: float
    dt: float
    epoch: float
    elapsed: float
    micro_batch: int
    grad_accum: int
    engine_phase: str
    outcome: StepResult | Pending

    def result(self) -> StepResult:
        return self.outcome.read()


def can_mask(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step()`` honours ``found_inf`` (torch's fused Adam/AdamW kernels do)."""
    return bool(optimizer.defaults.get("fused")) and isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW)


@contextlib.contextmanager
def masked_if_not_finite(optimizer: torch.optim.Optimizer, values: torch.Tensor) -> Iterator[None]:
    """Inside, ``optimizer.step()`` applies nothing when any of ``values`` is NaN or infinite: the flag stays
    on the device, no sync."""
    optimizer.found_inf = (~torch.isfinite(values).all()).float()  # type: ignore[attr-defined]
    try:
        yield
    finally:
        del optimizer.found_inf  # type: ignore[attr-defined]
