"""The hybrid engine through the real loop (core.train.Trainer with engine = "hybrid") on the embedded model:
it trains bitwise like the plain loop when no jump is accepted, advances the schedule on accepted jumps
(evaluations still fall due), restores weights and AdamW state on a spike after an accepted jump, and its
state rides in the Trainer's checkpoints: an interrupted and resumed hybrid run equals an uninterrupted one."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from core import checkpoint
from core.embedded import ensure_embedded_model
from core.encode import Example, encode_all
from core.events import CheckpointEvent, EvalEvent, StepEvent
from core.hybrid import HybridConfig, HybridEngine
from core.hybrid.events import JumpEvent, RollbackEvent
from core.train import Trainer
from trainbox.config import TrainingConfig
from trainbox.records import Record

CPU = torch.device("cpu")
NEVER = lambda: False  # noqa: E731
NOWHERE = lambda: Path(".")  # noqa: E731


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


def trainer(model_dir: Path | str, data: Any, steps: int = 30, hybrid: HybridConfig | None = None) -> Trainer:
    cfg = TrainingConfig(
        max_steps=steps,
        batch_size=4,
        learning_rate=3e-3,
        eval_every=10,
        checkpoint_every=0,
        engine="hybrid" if hybrid is not None else "plain",
        hybrid=hybrid or HybridConfig(),
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return Trainer(model, cfg, data[0], data[1], pad_id=0, device=CPU)


def small_cfg(**over: Any) -> HybridConfig:
    """Short phases, and no overhead budget (it compares measured times: the tests must not depend on them)."""
    base = {"warmup_steps": 4, "full_steps": 4, "snapshot_every": 2, "history": 3, "max_overhead": 1e6}
    return HybridConfig(**{**base, **over})


# every attempt accepted whenever the probe got better at all (and plain progress is measurable); one arm and
# no fallback, so the run does not depend on timings (the bandit's rewards and the fallback use step times)
EAGER = {"min_earned": -1e9, "min_rel_gain": 0.0, "prediction_tol": 10.0, "horizons": (5,), "fallback_after": 100}


def engine(tr: Trainer) -> HybridEngine:
    assert tr.hybrid is not None
    return tr.hybrid


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_rejected_jumps_leave_training_bitwise_plain(model_dir: Path, data: Any) -> None:
    plain = trainer(model_dir, data)
    plain_events: list[Any] = []
    plain.run(plain_events.append, NEVER, NOWHERE)
    # no jump can earn 10^9 steps: every attempt is rolled back (weights and AdamW state)
    hyb = trainer(model_dir, data, hybrid=small_cfg(min_earned=1e9, fallback_after=100))
    events: list[Any] = []
    hyb.run(events.append, NEVER, NOWHERE)
    jumps = [e for e in events if isinstance(e, JumpEvent)]
    assert jumps and not any(j.accepted for j in jumps)
    c = engine(hyb).counters
    assert c.rolled_back == len(jumps) and c.real_steps == 30
    assert same_weights(plain.model, hyb.model)
    steps = [e for e in events if isinstance(e, StepEvent)]
    assert [e.step for e in steps] == list(range(1, 31))
    assert [e.loss for e in steps] == [e.loss for e in plain_events if isinstance(e, StepEvent)]
    assert {e.phase for e in steps} == {"warmup", "full"} and not any(e.predicted for e in steps)
    assert [e.step for e in events if isinstance(e, EvalEvent)] == [0, 10, 20, 30]
    assert steps[-1].speedup_estimate is not None and steps[-1].speedup_estimate <= 1.0  # probes cost time


def test_no_copies_of_the_weights_before_they_can_be_needed(model_dir: Path, data: Any) -> None:
    """Until a jump is accepted a divergence is the Trainer's business (the weights are plain training's): the
    engine copies weights and AdamW state only right before each attempt, not every ``snapshot_every`` steps,
    which on a full fine-tune would cost 3 x the weights each time."""
    tr = trainer(model_dir, data, steps=12, hybrid=small_cfg(warmup_steps=10**9))
    tr.run(lambda e: None, NEVER, NOWHERE)
    eng = engine(tr)
    assert eng.counters.real_steps == 12 and eng.counters.attempts == 0
    assert eng._good is None and len(eng.predictor) == 0
    # every attempt rejected: one copy per attempt, none in the full phase's snapshots between them
    tr = trainer(model_dir, data, steps=30, hybrid=small_cfg(min_earned=1e9, fallback_after=100))
    eng = engine(tr)
    saves = 0
    save_good = eng._save_good

    def counting() -> None:
        nonlocal saves
        saves += 1
        save_good()

    eng._save_good = counting  # type: ignore[method-assign]
    tr.run(lambda e: None, NEVER, NOWHERE)
    assert eng.counters.attempts >= 3 and eng.counters.accepted == 0
    assert saves == eng.counters.attempts


def test_the_overhead_budget_gates_attempts(model_dir: Path, data: Any) -> None:
    """An attempt starts only while the engine's time, its expected cost included, stays within max_overhead of
    the real steps' time; with no budget at all the engine never tries and trains exactly like plain."""
    plain = trainer(model_dir, data, steps=16)
    plain.run(lambda e: None, NEVER, NOWHERE)
    tr = trainer(model_dir, data, steps=16, hybrid=small_cfg(max_overhead=0.0))
    tr.run(lambda e: None, NEVER, NOWHERE)
    eng = engine(tr)
    assert eng.counters.attempts == 0 and eng.attempt_s is not None and eng.attempt_s > 0  # the probe was timed
    assert same_weights(plain.model, tr.model)
    # the rule itself, on the engine's counters
    eng.cfg = eng.cfg.model_copy(update={"max_overhead": 0.03})
    eng.counters.overhead_s, eng.counters.real_step_s, eng.attempt_s = 1.0, 100.0, 2.0
    assert eng.within_budget()  # 1 + 2 <= 3
    eng.attempt_s = 2.5
    assert not eng.within_budget()
    assert eng.state_dict()["attempt_s"] == 2.5


def test_accepted_jumps_advance_the_schedule_and_are_tagged(model_dir: Path, data: Any) -> None:
    tr = trainer(model_dir, data, steps=40, hybrid=small_cfg(**EAGER))
    events: list[Any] = []
    tr.run(events.append, NEVER, NOWHERE)
    predicted = [e for e in events if isinstance(e, StepEvent) and e.predicted]
    assert predicted and all(e.phase == "predict" and e.grad_norm == 0.0 and e.advanced > 0 for e in predicted)
    c = engine(tr).counters
    assert c.accepted >= len(predicted) and tr.state.step == 40
    assert c.real_steps + c.advanced_steps == 40 and c.backward_skipped == c.advanced_steps
    assert predicted[-1].backward_skipped == c.backward_skipped
    steps = [e.step for e in events if isinstance(e, StepEvent)]
    assert steps == sorted(set(steps)) and steps[-1] == 40  # every schedule step once, jumps included
    evals = [e.step for e in events if isinstance(e, EvalEvent)]
    # a jump may step over a multiple of eval_every: the evaluation happens right after it, never skipped
    assert evals[0] == 0 and evals[-1] == 40 and len(evals) == 5
    assert all(10 * k <= s < 10 * k + 5 for k, s in zip((1, 2, 3), evals[1:4], strict=True)), evals
    assert math.isfinite(tr.state.last_val_loss or math.nan)


def test_spike_restores_weights_and_optimizer_only_after_an_accepted_jump(model_dir: Path, data: Any) -> None:
    tr = trainer(model_dir, data, steps=30, hybrid=small_cfg(**EAGER))
    tr.run(lambda e: None, NEVER, NOWHERE)
    eng = engine(tr)
    assert eng.counters.accepted > 0 and eng._good is not None
    good = [w.clone() for w in eng._good[1]]
    with torch.no_grad():  # a blow-up the step's loss shows
        for p in eng.params:
            p.add_(1e3)
    events: list[Any] = []
    eng.after_real_step(1e6, 1.0, 0.01, events.append)
    assert [type(e) for e in events] == [RollbackEvent] and events[0].reason == "loss_spike"
    assert eng.counters.divergence_rollbacks == 1 and eng.machine.phase in ("plain", "full")
    assert all(torch.equal(p, w) for p, w in zip(eng.params, good, strict=True))

    fresh = trainer(model_dir, data, steps=30, hybrid=small_cfg(min_earned=1e9))
    fresh.run(lambda e: None, NEVER, NOWHERE)
    before = [p.clone() for p in engine(fresh).params]
    engine(fresh).after_real_step(1e6, 1.0, 0.01, events.append)  # nothing accepted: plain training's business
    assert len(events) == 1 and all(torch.equal(p, w) for p, w in zip(engine(fresh).params, before, strict=True))


def test_state_dict_round_trip(model_dir: Path, data: Any) -> None:
    tr = trainer(model_dir, data, steps=20, hybrid=small_cfg())
    tr.run(lambda e: None, NEVER, NOWHERE)
    state = engine(tr).state_dict()
    other = engine(trainer(model_dir, data, steps=20, hybrid=small_cfg()))
    other.load_state_dict(state)
    again = other.state_dict()
    assert again["counters"] == state["counters"] and again["machine"] == state["machine"]
    assert again["bandit"] == state["bandit"] and again["rate"] == state["rate"]
    assert len(again["predictor"]["snaps"]) == len(state["predictor"]["snaps"])
    for a, b in zip(again["predictor"]["snaps"][-1], state["predictor"]["snaps"][-1], strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="version"):
        other.load_state_dict({**state, "version": 99})


def test_interrupted_and_resumed_hybrid_run_equals_uninterrupted(model_dir: Path, data: Any, tmp_path: Path) -> None:
    tok = AutoTokenizer.from_pretrained(model_dir)
    cfg = small_cfg(**EAGER)

    def saver(t: Trainer, run_dir: Path) -> Any:
        return lambda: (
            checkpoint.save(run_dir, t.state.step, t.model, tok, t.state_dict(), t.cfg.model_dump(mode="json"), {}).path
        )

    a = trainer(model_dir, data, steps=40, hybrid=cfg)
    straight: list[Any] = []
    assert a.run(straight.append, NEVER, saver(a, tmp_path / "a")) == "completed"

    b = trainer(model_dir, data, steps=40, hybrid=cfg)
    first: list[Any] = []
    assert b.run(first.append, lambda: b.state.step >= 17, saver(b, tmp_path / "b")) == "interrupted"
    ckpt = checkpoint.latest_complete(tmp_path / "b")
    assert ckpt is not None and [e.step for e in first if isinstance(e, CheckpointEvent)] == [ckpt.step]
    state = checkpoint.load_state(ckpt.path)  # as the worker reads it (weights_only)
    assert state["hybrid"]["counters"]["real_steps"] == engine(b).counters.real_steps
    assert TrainingConfig.model_validate(state["config"]).hybrid == cfg  # the resolved config describes itself

    torch.manual_seed(999)  # a fresh process: the checkpoint restores the RNG
    c = trainer(ckpt.path / checkpoint.MODEL, data, steps=40, hybrid=cfg)
    c.load_state_dict(state)
    rest: list[Any] = []
    assert c.run(rest.append, NEVER, saver(c, tmp_path / "b")) == "completed"

    assert same_weights(a.model, c.model)
    jumps = [
        (j.step, j.probe_before, j.probe_after, j.accepted, j.advanced) for j in straight if isinstance(j, JumpEvent)
    ]
    resumed = [
        (j.step, j.probe_before, j.probe_after, j.accepted, j.advanced)
        for j in first + rest
        if isinstance(j, JumpEvent)
    ]
    assert jumps == resumed and any(j[3] for j in jumps)
    ca, cc = engine(a).counters, engine(c).counters
    assert (ca.real_steps, ca.attempts, ca.accepted, ca.advanced_steps) == (
        cc.real_steps,
        cc.attempts,
        cc.accepted,
        cc.advanced_steps,
    )
    ma, mc = engine(a).machine.state_dict(), engine(c).machine.state_dict()
    assert {**ma, "recent_net": None} == {**mc, "recent_net": None}  # net steps count measured seconds
