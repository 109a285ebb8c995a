"""HybridEngine on the embedded model: it trains like the plain loop when no jump is accepted (bitwise),
restores weights and AdamW state on rollback, tags events with the phase, and round-trips its state."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from core.embedded import ensure_embedded_model
from core.encode import Example, encode_all
from core.hybrid import HybridConfig, HybridEngine
from core.hybrid.events import HybridStepEvent, JumpEvent, RollbackEvent
from core.train import EvalEvent, Trainer
from trainbox.config import TrainingConfig
from trainbox.records import Record

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_flush_denormal(True)
    return ensure_embedded_model(tmp_path_factory.getbasetemp() / "embedded-model-hybrid")


@pytest.fixture(scope="module")
def data(model_dir: Path) -> tuple[list[Example], list[Example]]:
    tok = AutoTokenizer.from_pretrained(model_dir)
    words = ["river", "bridge", "garden", "station", "market", "library", "winter", "morning"]
    recs = [
        Record(kind="text", text=f"The {words[i % 8]} is {i} steps from the {words[(i * 3) % 8]}.") for i in range(40)
    ]
    enc = encode_all(tok, recs, max_length=32)
    return enc.examples[:32], enc.examples[32:]


def trainer(model_dir: Path, data: Any, steps: int = 30) -> Trainer:
    cfg = TrainingConfig(max_steps=steps, batch_size=4, learning_rate=3e-3, eval_every=10, checkpoint_every=0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return Trainer(model, cfg, data[0], data[1], pad_id=0, device=CPU)


def small_cfg(**over: Any) -> HybridConfig:
    return HybridConfig(**{"warmup_steps": 4, "full_steps": 4, "snapshot_every": 2, "history": 3, **over})


def test_rejected_jumps_leave_training_bitwise_plain(model_dir: Path, data: Any) -> None:
    plain = trainer(model_dir, data)
    plain.run(lambda e: None, lambda: False, lambda: Path("."))
    hyb = trainer(model_dir, data)
    # no jump can earn 10^9 steps: every attempt is rolled back (weights and AdamW state)
    eng = HybridEngine(hyb, small_cfg(min_earned=1e9, fallback_after=100), data[0][:8])
    events: list[Any] = []
    eng.run(events.append, lambda: False)
    jumps = [e for e in events if isinstance(e, JumpEvent)]
    assert jumps and not any(j.accepted for j in jumps)
    assert eng.counters.rolled_back == len(jumps) and eng.counters.real_steps == 30
    for a, b in zip(plain.model.parameters(), hyb.model.parameters(), strict=True):
        assert torch.equal(a, b)
    steps = [e for e in events if isinstance(e, HybridStepEvent)]
    assert {e.phase for e in steps} == {"warmup", "full"}
    assert not any(e.predicted for e in steps)


def test_accepted_jumps_advance_the_schedule_and_are_tagged(model_dir: Path, data: Any) -> None:
    tr = trainer(model_dir, data, steps=40)
    eng = HybridEngine(tr, small_cfg(min_earned=0.0, min_rel_gain=-1.0, prediction_tol=10.0), data[0][:8])
    events: list[Any] = []
    eng.run(events.append, lambda: False)
    predicted = [e for e in events if isinstance(e, HybridStepEvent) and e.predicted]
    assert predicted and all(e.phase == "predict" and e.grad_norm == 0.0 for e in predicted)
    c = eng.counters
    assert c.accepted == len(predicted) and tr.state.step == 40
    assert c.real_steps + c.advanced_steps == 40 and c.backward_skipped == c.advanced_steps
    evals = [e for e in events if isinstance(e, EvalEvent)]
    assert evals[-1].step == 40 and math.isfinite(evals[-1].val_loss)


def test_divergence_restores_weights_and_optimizer(model_dir: Path, data: Any) -> None:
    tr = trainer(model_dir, data, steps=12)
    eng = HybridEngine(tr, small_cfg(), data[0][:8])
    events: list[Any] = []
    calls = {"n": 0}
    real_step = tr._optimizer_step

    def poisoned(lr: float) -> Any:
        calls["n"] += 1
        if calls["n"] == 7:  # corrupt the weights and report a NaN loss, as a real blow-up would
            with torch.no_grad():
                for p in eng.params:
                    p.add_(1e3)
            return math.nan, math.nan, 0
        return real_step(lr)

    tr._optimizer_step = poisoned  # type: ignore[method-assign,assignment]
    eng.run(events.append, lambda: False)
    rollbacks = [e for e in events if isinstance(e, RollbackEvent)]
    assert len(rollbacks) == 1 and rollbacks[0].reason == "not_finite"
    assert eng.counters.divergence_rollbacks == 1
    assert all(p.abs().max() < 100 for p in eng.params)
    assert eng.machine.phase in ("plain", "full")


def test_state_dict_round_trip(model_dir: Path, data: Any) -> None:
    tr = trainer(model_dir, data, steps=20)
    eng = HybridEngine(tr, small_cfg(), data[0][:8])
    eng.run(lambda e: None, lambda: False)
    state = eng.state_dict()
    other = HybridEngine(trainer(model_dir, data, steps=20), small_cfg(), data[0][:8])
    other.load_state_dict(state)
    again = other.state_dict()
    assert again["counters"] == state["counters"] and again["machine"] == state["machine"]
    assert again["bandit"] == state["bandit"] and again["rate"] == state["rate"]
    assert len(again["predictor"]["snaps"]) == len(state["predictor"]["snaps"])
    for a, b in zip(again["predictor"]["snaps"][-1], state["predictor"]["snaps"][-1], strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="version"):
        other.load_state_dict({**state, "version": 99})
