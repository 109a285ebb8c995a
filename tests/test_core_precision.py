"""Precision: which autocast dtype a job gets, and fp16 with its gradient scaler (run here on the CPU,
where torch autocasts to fp16 too; on a GPU without bf16 it is the automatic choice)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from core.encode import Example
from core.events import StepEvent
from core.precision import autocast_dtype
from tests.test_core_train import examples, make_trainer, model_dir  # noqa: F401 (fixtures)


@pytest.mark.parametrize(
    ("precision", "device", "bf16_supported", "expected"),
    [
        ("auto", "cuda", True, torch.bfloat16),
        ("auto", "cuda", False, torch.float16),  # before Ampere: fp16 with a scaler
        ("auto", "cpu", False, None),
        ("bf16", "cuda", True, torch.bfloat16),
        ("bf16", "cuda", False, None),  # preflight refuses it with the reason
        ("fp32", "cuda", True, None),
        ("fp16", "cuda", True, torch.float16),
        ("fp16", "cpu", False, torch.float16),
    ],
)
def test_autocast_dtype(precision: str, device: str, bf16_supported: bool, expected: torch.dtype | None) -> None:
    assert autocast_dtype(precision, device, bf16_supported) == expected


def run(trainer: Any) -> list[StepEvent]:
    events: list[Any] = []
    assert trainer.run(events.append, lambda: False, lambda: Path("/nonexistent")) == "completed"
    return [e for e in events if isinstance(e, StepEvent)]


def test_fp16_reruns_overflowing_steps_at_a_lower_scale(
    model_dir: Path,  # noqa: F811
    examples: tuple[list[Example], list[Example]],  # noqa: F811
) -> None:
    plain = run(make_trainer(model_dir, examples, max_steps=6, eval_every=0))
    t = make_trainer(model_dir, examples, max_steps=6, eval_every=0, precision="fp16")
    p = t.precision
    assert p.scaler is not None and p.dtype == torch.float16 and p.half and not p.bf16
    p.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)  # every early step overflows fp16
    steps = run(t)
    assert [e.step for e in steps] == list(range(1, 7)) and not any(e.skipped for e in steps)
    assert t.state.rollbacks == 0 and t.state.overflows == 0 and not t.state.skipped
    assert p.scaler.get_scale() < 2.0**20  # halved until the gradients fit, then the steps ran
    # the same training as fp32, to fp16's precision
    assert steps[0].loss == pytest.approx(plain[0].loss, rel=1e-2)
    assert steps[-1].loss == pytest.approx(plain[-1].loss, rel=5e-2) and steps[-1].loss < steps[0].loss
    state = t.state_dict()
    fresh = make_trainer(model_dir, examples, max_steps=6, eval_every=0, precision="fp16")
    fresh.load_state_dict(state)
    assert fresh.precision.scaler is not None and fresh.precision.scaler.get_scale() == p.scaler.get_scale()
