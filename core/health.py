"""Early warnings: a pure detector fed the numbers of each step and evaluation.

It returns ``Alert``s and keeps only plain numbers, so its state goes into checkpoints. Each kind
but non_finite (every skipped step is told) warns at most once per ``cooldown`` steps, so a bad
stretch is one warning, not a flood.
  loss_spike     a step's loss above ``loss_spike_factor`` x its moving average
  grad_spike     a gradient norm above ``grad_spike_factor`` x its moving average
  non_finite     a NaN/Inf loss or gradient norm (the step was skipped)
  overfitting    validation loss rose for ``patience`` evaluations in a row while train loss fell
  lr_near_zero   the learning rate is below ``lr_floor_ratio`` of the peak with steps remaining
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Alert:
    kind: str
    step: int
    message: str
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class HealthState:
    loss_avg: float | None = None
    grad_avg: float | None = None
    finite_steps: int = 0
    evals: list[list[float]] = field(default_factory=list)  # [step, val_loss, train_loss] per evaluation
    last_alert: dict[str, int] = field(default_factory=dict)


class HealthMonitor:
    def __init__(
        self,
        patience: int = 3,
        loss_spike_factor: float = 2.0,
        grad_spike_factor: float = 10.0,
        lr_floor_ratio: float = 1e-3,
        warmup: int = 10,
        smoothing: float = 0.1,
        cooldown: int = 50,
    ) -> None:
        self.patience, self.loss_spike_factor, self.grad_spike_factor = patience, loss_spike_factor, grad_spike_factor
        self.lr_floor_ratio, self.warmup, self.smoothing, self.cooldown = lr_floor_ratio, warmup, smoothing, cooldown
        self.state = HealthState()

    def state_dict(self) -> dict[str, Any]:
        return asdict(self.state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = HealthState(**state)

    def _alert(self, kind: str, step: int, message: str, **data: Any) -> list[Alert]:
        last = self.state.last_alert.get(kind)
        if kind != "non_finite" and last is not None and 0 <= step - last < self.cooldown:
            return []
        self.state.last_alert[kind] = step
        return [Alert(kind, step, message, data)]

    def on_step(
        self,
        step: int,
        total_steps: int,
        loss: float,
        grad_norm: float,
        lr: float,
        peak_lr: float,
        warmup_done: bool = True,
    ) -> list[Alert]:
        """After each optimizer step (``step`` counts from 1). Non-finite alerts are never held back."""
        s, out = self.state, []
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return self._alert(
                "non_finite",
                step,
                f"step {step}: loss {loss}, gradient norm {grad_norm}: step skipped",
                loss=_num(loss),
                grad_norm=_num(grad_norm),
                lr=lr,
            )
        if s.finite_steps >= self.warmup and s.loss_avg is not None and loss > self.loss_spike_factor * s.loss_avg:
            out += self._alert(
                "loss_spike",
                step,
                f"step {step}: loss {loss:.4g} is {loss / s.loss_avg:.1f}x its average {s.loss_avg:.4g}",
                loss=loss,
                average=s.loss_avg,
            )
        if (
            s.finite_steps >= self.warmup
            and s.grad_avg is not None
            and s.grad_avg > 0
            and grad_norm > self.grad_spike_factor * s.grad_avg
        ):
            out += self._alert(
                "grad_spike",
                step,
                f"step {step}: gradient norm {grad_norm:.4g} is {grad_norm / s.grad_avg:.1f}x "
                f"its average {s.grad_avg:.4g}",
                grad_norm=grad_norm,
                average=s.grad_avg,
            )
        remaining = total_steps - step
        if warmup_done and peak_lr > 0 and lr < self.lr_floor_ratio * peak_lr and remaining > 0.1 * total_steps:
            out += self._alert(
                "lr_near_zero",
                step,
                f"step {step}: learning rate {lr:.3g} is near zero with {remaining} steps left",
                lr=lr,
                peak_lr=peak_lr,
                remaining_steps=remaining,
            )
        a = self.smoothing
        s.loss_avg = loss if s.loss_avg is None else (1 - a) * s.loss_avg + a * loss
        s.grad_avg = grad_norm if s.grad_avg is None else (1 - a) * s.grad_avg + a * grad_norm
        s.finite_steps += 1
        return out

    def on_eval(self, step: int, val_loss: float, train_loss: float | None) -> list[Alert]:
        """Overfitting: the last ``patience`` evaluations each raised val loss while train loss fell."""
        s = self.state
        s.evals = [*s.evals, [step, val_loss, math.nan if train_loss is None else train_loss]][-(self.patience + 1) :]
        if len(s.evals) <= self.patience:
            return []
        pairs = list(zip(s.evals, s.evals[1:], strict=False))
        val_rising = all(b[1] > a[1] for a, b in pairs)
        train_falling = all(b[2] < a[2] for a, b in pairs)  # False when any train loss is unknown (NaN)
        if not (val_rising and train_falling):
            return []
        first, last = s.evals[0], s.evals[-1]
        return self._alert(
            "overfitting",
            step,
            f"validation loss rose for {self.patience} evaluations ({first[1]:.4g} at step {int(first[0])} -> "
            f"{last[1]:.4g} at step {step}) while train loss fell ({first[2]:.4g} -> {last[2]:.4g})",
            val_losses=[e[1] for e in s.evals],
            train_losses=[e[2] for e in s.evals],
            steps=[int(e[0]) for e in s.evals],
        )


def _num(x: float) -> float | str:
    """JSON-safe: NaN/Inf become strings."""
    return x if math.isfinite(x) else str(x)
