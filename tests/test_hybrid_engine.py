"""The hybrid engine through the real loop (core.train.Trainer with engine = "hybrid") on the embedded model: its
per-example losses are the forward pass's (padded or packed rows), predicted-learned examples get no pass, the
correct phase brings risen examples back, the divergence monitor restores the good point, the curve model ends
the run early after a decay, and its state rides in the Trainer's checkpoints: an interrupted and resumed hybrid
run equals an uninterrupted one bitwise."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from core import checkpoint
from core.data import collate
from core.embedded import ensure_embedded_model
from core.encode import Example, encode_all
from core.events import CheckpointEvent, EvalEvent, StepEvent
from core.example_losses import per_example
from core.hybrid import HybridConfig, HybridEngine
from core.hybrid.events import CorrectionEvent, CurveEvent, RollbackEvent
from core.hybrid.rows import example_losses, owners
from core.loss import stage, staged_loss_sum
from core.schedule import lr_at
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
        Record(kind="text", text=f"The {words[i % 8]} is {i % 5} steps from the {words[(i * 3) % 8]}.")
        for i in range(48)
    ]
    enc = encode_all(tok, recs, max_length=32)
    return enc.examples[:40], enc.examples[40:]


def small_cfg(**over: Any) -> HybridConfig:
    """Short phases, one keep share, and a bandit that counts compute (no measured time: runs repeat exactly)."""
    base = {
        "warmup_steps": 5,
        "full_steps": 5,
        "correct_every": 5,
        "keep_shares": (0.5,),
        "curve_min_points": 3,
        "bandit_cost": "compute",
    }
    return HybridConfig(**{**base, **over})


def trainer(
    model_dir: Path | str, data: Any, steps: int = 40, hybrid: HybridConfig | None = None, **kw: Any
) -> Trainer:
    cfg = TrainingConfig(
        max_steps=steps,
        batch_size=4,
        learning_rate=3e-3,
        eval_every=10,
        checkpoint_every=0,
        engine="hybrid" if hybrid is not None else "plain",
        hybrid=hybrid or HybridConfig(),
        **kw,
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return Trainer(model, cfg, data[0], data[1], pad_id=0, device=CPU)


def engine(tr: Trainer) -> HybridEngine:
    assert tr.hybrid is not None
    return tr.hybrid


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("packed", [False, True])
def test_per_example_losses_come_from_the_training_forward(model_dir: Path, data: Any, packed: bool) -> None:
    """The per-position losses of the loss the step trains on, mapped back to examples (padded or packed rows,
    plain or chunked loss), equal each example's loss measured alone."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    examples = data[0][:6]
    batch = collate(examples, 0, packed)
    expected = per_example(model, collate(examples, 0), CPU)
    for split in (None, engine(trainer(model_dir, data, hybrid=small_cfg())).trainer.speedups.split):
        per_token: list[torch.Tensor] = []
        total = staged_loss_sum(model, stage(batch, CPU, split), split, per_token)
        sums, counts = example_losses(per_token[0], owners(examples, batch["labels"], packed), len(examples))
        assert (sums / counts).tolist() == pytest.approx(expected, rel=1e-4)
        assert float(total.detach()) == pytest.approx(float(sums.sum()), rel=1e-5)


def test_predicted_learned_examples_get_no_pass(model_dir: Path, data: Any) -> None:
    tr = trainer(model_dir, data, steps=40, hybrid=small_cfg(curve_stop=False))
    events: list[Any] = []
    assert tr.run(events.append, NEVER, NOWHERE) == "completed"
    eng, steps = engine(tr), [e for e in events if isinstance(e, StepEvent)]
    assert [e.step for e in steps] == list(range(1, 41))
    assert {e.phase for e in steps[:5]} == {"warmup"} and {e.phase for e in steps[5:10]} == {"full"}
    assert all(e.skipped_share == 0.0 for e in steps if e.phase != "predict")
    skipping = [e for e in steps if e.phase == "predict"]
    assert skipping and sum(e.skipped_share or 0.0 for e in skipping) > 0
    c = eng.counters
    assert c.steps == 40 and c.examples_trained + c.examples_skipped == 40 * 4  # every example of every step
    assert c.examples_skipped == steps[-1].backward_skipped > 0
    assert c.tokens_trained + c.tokens_skipped == sum(
        int(eng.trained_tokens[i]) for e in range(4) for i in tr.batches.order(e)
    )
    assert eng.table.coverage() == 1.0 and int(eng.table.skips.sum()) == c.examples_skipped
    # the selection saved passes: fewer trained tokens than the plain loop over the same batches
    corrections = [e for e in events if isinstance(e, CorrectionEvent)]
    assert corrections and c.remeasured == sum(e.examples for e in corrections)
    summary = eng.summary()
    assert summary["examples_skipped"] == c.examples_skipped and summary["stopped"] == "ran its planned steps"
    assert summary["learned_early"] and summary["never_learned"]
    assert summary["never_learned"][0]["loss"] == pytest.approx(float(max(eng.table.loss)), abs=1e-4)
    assert summary["never_learned"][0]["line"] is None  # no lines given: the training-set index only
    by_line = eng.summary(lines=[100 + i for i in range(40)])  # the file's line of each training example
    assert all(e["line"] == 100 + e["example"] for e in by_line["learned_early"] + by_line["never_learned"])
    # the interval in which skipping began was part full steps: it rewards no arm; a whole one does
    iv, pulls = eng.interval, list(eng.bandit.pulls)
    iv.mixed, iv.arm, iv.context, iv.val, iv.cost = True, 0, [1.0, 0.5], 1.0, 1.0
    eng.after_eval(40, 0.5, lambda e: None)
    assert eng.bandit.pulls == pulls and not iv.mixed
    iv.arm, iv.context, iv.val, iv.cost = 0, [1.0, 0.5], 1.0, 1.0
    eng.after_eval(40, 0.5, lambda e: None)
    assert sum(eng.bandit.pulls) == sum(pulls) + 1


def test_correction_brings_back_risen_examples_and_rolls_back_when_they_rose_too_far(
    model_dir: Path, data: Any
) -> None:
    tr = trainer(model_dir, data, steps=30, hybrid=small_cfg(curve_stop=False, remeasure_tol=100.0))
    tr.run(lambda e: None, NEVER, NOWHERE)
    eng = engine(tr)
    table = eng.table
    skipped = table.skipped_since_measured().tolist()
    if not skipped:  # make some: pretend the last 6 examples were skipped after being measured
        skipped = list(range(34, 40))
        table.mark_skipped(skipped, tr.state.step)
    table.loss[skipped] = 0.05  # the table thought them learned; their real loss is far higher
    eng.machine.phase = eng.machine.phase.CORRECT
    events: list[Any] = []
    eng.before_step(events.append)
    (ev,) = [e for e in events if isinstance(e, CorrectionEvent)]
    assert ev.came_back == ev.examples > 0 and ev.mean_after > ev.mean_before
    assert table.force.sum() == ev.came_back and eng.machine.phase == "predict"  # trained at their next turn
    assert not [e for e in events if isinstance(e, RollbackEvent)]  # within remeasure_tol: 101x the recorded loss

    # the same rise with a strict tolerance: the monitor restores the good point
    eng.cfg = eng.cfg.model_copy(update={"remeasure_tol": 0.5})
    assert eng.good is not None
    good = [w.clone() for w in eng.good.weights]
    with torch.no_grad():
        for p in tr.model.parameters():
            p.add_(0.01)
    table.mark_skipped(skipped, tr.state.step + 1)
    table.loss[skipped] = 1e-3
    eng.machine.phase = eng.machine.phase.CORRECT
    events.clear()
    eng.before_step(events.append)
    rollbacks = [e for e in events if isinstance(e, RollbackEvent)]
    assert [r.reason for r in rollbacks] == ["remeasured_rise"] and eng.counters.rollbacks == 1
    assert all(torch.equal(p, w) for p, w in zip(tr.model.parameters(), good, strict=True))
    assert eng.machine.phase == "plain" and eng.keep_share == 1.0


def test_validation_rise_rolls_back_to_the_best_evaluation(model_dir: Path, data: Any) -> None:
    tr = trainer(model_dir, data, steps=30, hybrid=small_cfg(curve_stop=False))
    tr.run(lambda e: None, NEVER, NOWHERE)
    eng = engine(tr)
    assert eng.machine.phase in ("predict", "correct") and eng.good is not None and eng.best_val is not None
    good = [w.clone() for w in eng.good.weights]
    with torch.no_grad():
        for p in tr.model.parameters():
            p.add_(0.01)
    events: list[Any] = []
    eng.interval.skipped = 0  # an interval that skipped nothing: a worse loss is not skipping's doing
    eng.after_eval(tr.state.step, eng.best_val * 1.5, events.append)
    assert not [e for e in events if isinstance(e, RollbackEvent)]
    eng.interval.skipped = 3
    eng.after_eval(tr.state.step, eng.best_val * 1.001, events.append)  # within val_tol: no rollback
    assert not [e for e in events if isinstance(e, RollbackEvent)]
    eng.interval.skipped = 3
    eng.after_eval(tr.state.step, eng.best_val * 1.5, events.append)
    (rb,) = [e for e in events if isinstance(e, RollbackEvent)]
    assert rb.reason == "val_rise" and rb.restored_step == eng.good.step
    assert all(torch.equal(p, w) for p, w in zip(tr.model.parameters(), good, strict=True))
    assert eng.machine.phase == "plain"


def test_the_curve_starts_the_decay_and_stops_the_run_after_it(model_dir: Path, data: Any) -> None:
    tr = trainer(model_dir, data, steps=200, hybrid=small_cfg(stop_tolerance=0.05))
    events: list[Any] = []
    assert tr.run(events.append, NEVER, NOWHERE) == "completed"
    eng = engine(tr)
    assert eng.decay is not None and eng.stopped.startswith("stopped early")
    start, length = eng.decay
    assert tr.state.step == start + length < 200 and tr.state.stop_reason == eng.stopped
    evals = [e.step for e in events if isinstance(e, EvalEvent)]
    assert evals[-1] == tr.state.step  # a last evaluation at the stop
    curves = [e for e in events if isinstance(e, CurveEvent)]
    assert [c.step for c in curves] == evals
    assert any(c.predicted_final is not None and c.stop_step is not None for c in curves)
    lrs = [e.lr for e in events if isinstance(e, StepEvent)]
    peak, floor = tr.cfg.learning_rate, tr.cfg.learning_rate * tr.cfg.min_lr_ratio
    plain = [lr_at(s, 200, peak, tr.cfg.warmup_ratio, tr.cfg.min_lr_ratio) for s in range(200)]
    assert lrs[:start] == plain[:start] and lrs[-1] == pytest.approx(floor)  # the cosine, cut short to the floor
    assert eng.summary()["decay_start"] == start and math.isfinite(eng.summary()["predicted_final"])


@pytest.mark.parametrize("over", [{}, {"compact": True}, {"compact": True, "learned_below": 0.9}])
def test_interrupted_and_resumed_hybrid_run_equals_uninterrupted(
    model_dir: Path, data: Any, tmp_path: Path, over: dict[str, Any]
) -> None:
    """Bitwise, with and without compaction (whose schedule and end follow the data position the checkpoint
    holds, and whose filled steps read micro-batches with their own draws) and the absolute learned rule."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    cfg = small_cfg(keep_shares=(1.0, 0.5, 0.3), stop_tolerance=0.05, **over)
    compact = bool(over.get("compact"))

    def saver(t: Trainer, run_dir: Path) -> Any:
        return lambda: (
            checkpoint.save(run_dir, t.state.step, t.model, tok, t.state_dict(), t.cfg.model_dump(mode="json"), {}).path
        )

    a = trainer(model_dir, data, steps=120, hybrid=cfg)
    straight: list[Any] = []
    assert a.run(straight.append, NEVER, saver(a, tmp_path / "a")) == "completed"

    b = trainer(model_dir, data, steps=120, hybrid=cfg)
    first: list[Any] = []
    assert b.run(first.append, lambda: b.state.step >= 27, saver(b, tmp_path / "b")) == "interrupted"
    ckpt = checkpoint.latest_complete(tmp_path / "b")
    assert ckpt is not None and [e.step for e in first if isinstance(e, CheckpointEvent)] == [ckpt.step]
    state = checkpoint.load_state(ckpt.path)  # as the worker reads it (weights_only)
    assert state["hybrid"]["machine"]["phase"] in ("predict", "correct") and state["hybrid"]["good"] is not None
    assert TrainingConfig.model_validate(state["config"]).hybrid == cfg  # the resolved config describes itself

    torch.manual_seed(999)  # a fresh process: the checkpoint restores the RNG
    c = trainer(ckpt.path / checkpoint.MODEL, data, steps=120, hybrid=cfg)
    c.load_state_dict(state)
    rest: list[Any] = []
    assert c.run(rest.append, NEVER, saver(c, tmp_path / "b")) == "completed"

    assert same_weights(a.model, c.model)

    def trace(evs: list[Any]) -> list[Any]:
        return [
            (e.step, e.loss, e.lr, e.skipped_share) if isinstance(e, StepEvent) else e
            for e in evs
            if isinstance(e, StepEvent | CurveEvent | RollbackEvent)
        ]

    assert trace(straight) == trace(first + rest)
    corr = lambda evs: [(e.step, e.examples, e.mean_after, e.came_back) for e in evs if isinstance(e, CorrectionEvent)]  # noqa: E731
    assert corr(straight) == corr(first + rest) and corr(straight)
    ea, ec = engine(a).state_dict(), engine(c).state_dict()
    for key in ("machine", "bandit", "keep_share", "forget_rate", "evals", "decay", "stopped"):
        assert ea[key] == ec[key], key
    assert all(torch.equal(ea["table"][k], ec["table"][k]) for k in ea["table"])
    assert sum(engine(a).bandit.pulls) > 0
    assert (engine(a).counters.extra_reads > 0) == compact and ea["counters"] == ec["counters"] | {
        k: ea["counters"][k]
        for k in ("step_s", "full_step_s", "overhead_s")  # measured seconds differ
    }


def test_compaction_fills_each_step_and_the_schedule_follows_the_data(model_dir: Path, data: Any) -> None:
    """``compact``: a step whose examples were partly skipped is filled from the micro-batches after it, so it
    trains (at least) a full batch; the learning rate at each step is the cosine at the micro-batches read before
    it (not at the step count); the run ends once the planned 40 steps' worth of data (4 epochs) was read, in fewer
    steps, the end evaluated and said why."""
    tr = trainer(model_dir, data, steps=40, hybrid=small_cfg(curve_stop=False, compact=True))
    eng = engine(tr)
    plans: list[tuple[int, int]] = []  # (examples trained, micro-batches read) per step
    record = eng.trained

    def spy(plan: Any, step: int) -> None:
        plans.append((sum(len(r) for r in plan.rows), plan.reads))
        record(plan, step)

    eng.trained = spy  # type: ignore[method-assign]
    events: list[Any] = []
    assert tr.run(events.append, NEVER, NOWHERE) == "completed"
    c, steps = eng.counters, [e for e in events if isinstance(e, StepEvent)]
    assert c.steps == len(plans) == len(steps) < 40 and c.extra_reads == sum(r for _, r in plans) - len(plans) > 0
    predict = [p for p, e in zip(plans, steps, strict=True) if e.phase == "predict"]
    assert predict and all(n >= 4 or r == eng.reads() for n, r in predict)  # full, unless the reads cap ended it
    assert c.examples_trained + c.examples_skipped == 4 * sum(r for _, r in plans)  # every example read
    assert eng.progress() >= 40 and tr.state.stop_reason == eng.stopped and "planned epochs" in eng.stopped
    read_before = [sum(r for _, r in plans[:k]) for k in range(len(plans))]
    peak = tr.cfg.learning_rate
    assert [e.lr for e in steps] == [lr_at(r, 40, peak, tr.cfg.warmup_ratio, tr.cfg.min_lr_ratio) for r in read_before]
    evals = [e.step for e in events if isinstance(e, EvalEvent)]
    assert evals[-1] == tr.state.step and eng.summary()["extra_reads"] == c.extra_reads


def test_state_version_is_checked(model_dir: Path, data: Any) -> None:
    eng = engine(trainer(model_dir, data, steps=10, hybrid=small_cfg()))
    with pytest.raises(ValueError, match="version"):
        eng.load_state_dict({**eng.state_dict(), "version": 1})


def test_score_first_measures_every_example_once_and_lets_skipping_start_early(model_dir: Path, data: Any) -> None:
    """``score_first``: one forward-only pass over the training set before the first step fills the loss table
    (each example's loss under the starting weights, as ``per_example`` measures it), counted as overhead and as
    forward-only passes; it is not repeated, nor after a resume from the engine's state; and skipping starts after
    warmup_steps + full_steps, where without it min_coverage holds it back until the examples were trained once."""
    cfg = small_cfg(warmup_steps=2, full_steps=1, min_coverage=1.0, curve_stop=False)
    tr = trainer(model_dir, data, steps=10, hybrid=cfg.model_copy(update={"score_first": True}))
    eng = engine(tr)
    expected = per_example(tr.model, collate(data[0], 0), CPU)
    eng.before_step(lambda e: None)
    assert eng.table.loss.tolist() == pytest.approx(expected, rel=1e-4)
    assert eng.table.coverage() == 1.0 and set(eng.table.step.tolist()) == {0}
    assert eng.counters.scored == len(data[0]) and eng.counters.overhead_s > 0 and eng.counters.examples_trained == 0
    eng.before_step(lambda e: None)
    assert eng.counters.scored == len(data[0])  # once
    fresh = engine(trainer(model_dir, data, steps=10, hybrid=cfg.model_copy(update={"score_first": True})))
    fresh.load_state_dict(eng.state_dict())
    fresh.before_step(lambda e: None)
    assert fresh.counters.scored == len(data[0]) and fresh.summary()["scored"] == len(data[0])

    def first_predict(score_first: bool) -> int | None:
        t = trainer(model_dir, data, steps=14, hybrid=cfg.model_copy(update={"score_first": score_first}))
        events: list[Any] = []
        assert t.run(events.append, NEVER, NOWHERE) == "completed"
        return next((e.step for e in events if isinstance(e, StepEvent) and e.phase == "predict"), None)

    assert first_predict(True) == 4  # steps 1-2 warmup, 3 full, then predict
    assert first_predict(False) == 11  # 10 steps of 4 cover the 40 examples: predict from the 11th


def test_score_first_run_resumed_equals_uninterrupted(model_dir: Path, data: Any, tmp_path: Path) -> None:
    """The scoring pass is part of the checkpointed state: a run interrupted after it and resumed does not score
    again, and trains bitwise as the uninterrupted run (skipping included)."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    cfg = small_cfg(warmup_steps=2, full_steps=1, min_coverage=1.0, curve_stop=False, score_first=True)

    def saver(t: Trainer, run_dir: Path) -> Any:
        return lambda: (
            checkpoint.save(run_dir, t.state.step, t.model, tok, t.state_dict(), t.cfg.model_dump(mode="json"), {}).path
        )

    a = trainer(model_dir, data, steps=16, hybrid=cfg)
    assert a.run(lambda e: None, NEVER, saver(a, tmp_path / "a")) == "completed"
    b = trainer(model_dir, data, steps=16, hybrid=cfg)
    assert b.run(lambda e: None, lambda: b.state.step >= 6, saver(b, tmp_path / "b")) == "interrupted"
    ckpt = checkpoint.latest_complete(tmp_path / "b")
    assert ckpt is not None
    state = checkpoint.load_state(ckpt.path)
    assert state["hybrid"]["scored"] and state["hybrid"]["machine"]["phase"] in ("predict", "correct")
    torch.manual_seed(999)
    c = trainer(ckpt.path / checkpoint.MODEL, data, steps=16, hybrid=cfg)
    c.load_state_dict(state)
    assert c.run(lambda e: None, NEVER, saver(c, tmp_path / "b")) == "completed"
    assert same_weights(a.model, c.model)
    ca, cc = engine(a).counters, engine(c).counters
    assert cc.scored == ca.scored == len(data[0]) and cc.examples_skipped == ca.examples_skipped > 0


@pytest.mark.parametrize(("first", "stops"), [(1.0, True), (0.95, False)])
def test_a_flat_curve_stops_the_run_only_after_it_improved_on_its_start(
    model_dir: Path, data: Any, first: float, stops: bool
) -> None:
    """A continual job's validation loss can sit flat above where it started (new data at a warming lr) before it
    falls in the cosine's decay: flat, but nothing learned yet, so no stop; the same flat evaluations below the start
    by more than stop_tolerance do stop it."""
    tr = trainer(model_dir, data, steps=400, hybrid=small_cfg(stop_tolerance=0.01, curve_min_points=3))
    eng = engine(tr)
    tr.state.first_val_loss = first
    for step in range(40, 140, 10):
        eng.after_eval(step, 0.96, lambda e: None)
    assert (eng.decay is not None) == stops
