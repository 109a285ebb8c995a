# ruff: noqa: F811 (pytest fixtures imported from the other core test modules)
"""Recovery in the loop and the worker, driven by the test-only fault hook (core/faults.py): OOM
back-off, NaN skip and rollback, never saving non-finite weights, disk full, early stop, hangs."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from core import checkpoint
from core.errors import OutOfMemory, PreflightError, TrainingDiverged
from core.events import CheckpointEvent, Event, StepEvent, WarningEvent
from core.faults import Faults
from core.health import Alert
from core.loading import restore_weights
from core.microbatch import CACHE_FILE
from core.train import Trainer
from tests.test_core_train import examples, make_trainer, saver  # noqa: F401 (fixture)
from tests.test_core_worker import (  # noqa: F401 (fixtures)
    data_file,
    finish,
    make_job,
    model_dir,
    run_in_process,
    start_worker,
    straight_run,
    train_steps,
)
from trainbox.jobspec import WorkerResult
from trainbox.states import EXIT_COMPLETED, EXIT_FAILED, EXIT_INTERRUPTED, WorkerOutcome
from trainbox.status import TrainingStatus, read_status

NEVER = lambda: False  # noqa: E731


def steps(events: list[Event]) -> list[StepEvent]:
    return [e for e in events if isinstance(e, StepEvent)]


def warnings(events: list[Event]) -> list[WarningEvent]:
    return [e for e in events if isinstance(e, WarningEvent)]


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def restorer(t: Trainer, run_dir: Path, init: Path) -> Any:
    """What the worker supplies: back to the newest complete checkpoint, or the initial weights."""

    def restore() -> None:
        found = checkpoint.latest_complete(run_dir)
        if found:
            restore_weights(t.model, found.path / checkpoint.MODEL)
            t.load_state_dict(checkpoint.load_state(found.path))
        else:
            restore_weights(t.model, init)
            t.reset()

    return restore


# --- in the loop ----------------------------------------------------------------------------------


def test_oom_halves_micro_batch_keeps_effective_batch_and_exact_weights(
    model_dir: Path, examples: Any, tmp_path: Path
) -> None:
    tok = AutoTokenizer.from_pretrained(model_dir)
    a = make_trainer(model_dir, examples)  # batch 4 x accumulation 2
    a.faults = Faults.parse("oom@5")
    events: list[Event] = []
    assert a.run(events.append, NEVER, saver(a, tmp_path / "a", tok)) == "completed"
    assert (a.micro_batch_size, a.accum_steps, a.effective_batch) == (2, 4, 8)
    assert [e.step for e in steps(events)] == list(range(1, 13))  # step 5 ran once, after the back-off
    assert [e.micro_batch for e in steps(events)] == [4] * 4 + [2] * 8
    [w] = warnings(events)
    assert w.kind == "oom_backoff" and w.step == 4 and w.data["micro_batch"] == 2 and w.data["effective_batch"] == 8

    # the reference: 4 steps at micro-batch 4, then micro-batch 2 without any OOM
    b = make_trainer(model_dir, examples)
    b.run(lambda e: None, lambda: b.state.step >= 4, saver(b, tmp_path / "b", tok))
    b.set_micro_batch(2)
    ref: list[Event] = []
    assert b.run(ref.append, NEVER, saver(b, tmp_path / "b", tok)) == "completed"
    assert same_weights(a.model, b.model)  # bitwise: the failed attempt left no trace
    assert [e.loss for e in steps(events)][4:] == [e.loss for e in steps(ref)]


def test_oom_at_micro_batch_one_fails_with_class_oom(model_dir: Path, examples: Any) -> None:
    t = make_trainer(model_dir, examples, batch_size=2, grad_accum=1)
    t.faults = Faults.parse("oom@3x5")
    events: list[Event] = []
    with pytest.raises(OutOfMemory) as info:
        t.run(events.append, NEVER, lambda: Path())
    e = info.value
    assert e.failure_class == "oom" and "micro-batch 1" in str(e) and "max_length" in e.fix
    assert e.evidence["micro_batch"] == 1 and e.evidence["max_length"] == 256 and "rss_bytes" in e.evidence
    assert [w.kind for w in warnings(events)] == ["oom_backoff"] and t.state.step == 2


def test_eval_oom_shrinks_only_the_eval_batch(model_dir: Path, examples: Any) -> None:
    t = make_trainer(model_dir, examples)
    t.faults = Faults.parse("evaloom@4")
    events: list[Event] = []
    assert t.run(events.append, NEVER, lambda: Path()) == "completed"
    assert (t.state.eval_size, t.micro_batch_size) == (2, 4)
    assert [(w.kind, w.step) for w in warnings(events)] == [("eval_oom_backoff", 4)]


def test_nan_step_is_skipped_before_it_reaches_the_weights(model_dir: Path, examples: Any) -> None:
    """The step's numbers are read a step later (core.readback), so the skip is made on the device: the fused
    AdamW kernel, handed the step's non-finite flag, changes no weight and no step count."""
    t = make_trainer(model_dir, examples)
    t.faults = Faults.parse("nan@5")
    after: list[dict[str, torch.Tensor]] = []  # the weights after each optimizer.step() call
    t.optimizer.register_step_post_hook(
        lambda *_: after.append({k: v.clone() for k, v in t.model.state_dict().items()})
    )
    events: list[Event] = []
    assert t.defers_reads
    assert t.run(events.append, NEVER, lambda: Path()) == "completed"
    assert [e.step for e in steps(events) if e.skipped] == [5]
    assert len(after) == 12
    assert all(torch.equal(after[3][k], after[4][k]) for k in after[3])  # no update at step 5
    assert not all(torch.equal(after[4][k], after[5][k]) for k in after[4])
    assert {int(state["step"]) for state in t.optimizer.state.values()} == {11}
    assert [(w.kind, w.step) for w in warnings(events)] == [("non_finite", 5)]
    assert t.state.rollbacks == 0 and t.state.train_loss is not None and t.state.train_loss == t.state.train_loss


def test_repeated_nan_rolls_back_with_lower_lr_then_fails(model_dir: Path, examples: Any, tmp_path: Path) -> None:
    tok = AutoTokenizer.from_pretrained(model_dir)
    t = make_trainer(model_dir, examples, checkpoint_every=4)
    t.faults = Faults.parse("nan@6x3")
    events: list[Event] = []
    assert t.run(events.append, NEVER, saver(t, tmp_path, tok), restorer(t, tmp_path, model_dir)) == "completed"
    [w] = [w for w in warnings(events) if w.kind == "rollback"]
    assert (w.data["from_step"], w.data["to_step"], w.data["lr_scale"]) == (8, 4, 0.5)
    lrs = {e.step: e.lr for e in steps(events)}  # the last (re-run) value per step
    clean = make_trainer(model_dir, examples)
    assert lrs[12] == pytest.approx(0.5 * _lr_at(clean, 11))
    assert t.state.rollbacks == 1 and t.state.step == 12
    assert [e.step for e in events if isinstance(e, CheckpointEvent)] == [4, 8, 12]  # 8 again after the rollback

    t = make_trainer(model_dir, examples, checkpoint_every=4, nan_max_skips=2, nan_max_rollbacks=1)
    t.faults = Faults.parse("nan@1x1000")
    with pytest.raises(TrainingDiverged) as info:
        t.run(lambda e: None, NEVER, saver(t, tmp_path / "f", tok), restorer(t, tmp_path / "f", model_dir))
    e = info.value
    assert e.failure_class == "nan" and "learning_rate" in e.fix
    assert e.evidence["rollbacks"] == 1 and e.evidence["lr_scale"] == 0.5
    assert [x["step"] for x in e.evidence["non_finite_steps"]] == [1, 2, 1, 2]
    assert checkpoint.latest_complete(tmp_path / "f") is None  # never got a finite step to save


def _lr_at(t: Trainer, step: int) -> float:
    t.state.step = step
    return t.lr()


def test_non_finite_weights_are_never_saved(model_dir: Path, examples: Any, tmp_path: Path) -> None:
    tok = AutoTokenizer.from_pretrained(model_dir)
    t = make_trainer(model_dir, examples, checkpoint_every=4)
    t.faults = Faults.parse("nanweight@6")
    events: list[Event] = []
    assert t.run(events.append, NEVER, saver(t, tmp_path, tok), restorer(t, tmp_path, model_dir)) == "completed"
    # NaN weights make steps 7 and 8 NaN (skipped), then the checkpoint at 8 is refused: back to 4
    assert [(w.kind, w.step) for w in warnings(events)] == [
        ("non_finite", 7),
        ("non_finite", 8),
        ("non_finite", 8),
        ("rollback", 4),
    ]
    assert t.state.step == 12 and t.state.rollbacks == 1
    for c in checkpoint.complete_checkpoints(tmp_path):
        weights = load_file(c.path / checkpoint.MODEL / "model.safetensors")
        assert all(bool(torch.isfinite(v).all()) for v in weights.values()), c.path


def test_early_stop_on_overfitting_completes_with_the_reason(model_dir: Path, examples: Any) -> None:
    t = make_trainer(model_dir, examples, early_stop_on_overfit=True)
    t.health.on_eval = lambda step, val, train: [Alert("overfitting", step, "val loss rose")] if step == 8 else []  # type: ignore[method-assign]
    saved: list[int] = []
    assert t.run(lambda e: None, NEVER, lambda: saved.append(t.state.step) or Path()) == "completed"
    assert t.state.step == 8 and saved == [8] and t.state.stop_reason == "stopped early at step 8: val loss rose"
    assert t.run(lambda e: None, NEVER, lambda: Path()) == "completed" and t.state.step == 8  # a resume stays done


# --- the worker process -------------------------------------------------------------------------


def results(run_dir: Path) -> WorkerResult:
    r = WorkerResult.load(run_dir)
    assert r is not None
    return r


def metric_lines(run_dir: Path, kind: str) -> list[dict[str, Any]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [m for m in map(json.loads, lines) if m["kind"] == kind]


def test_worker_oom_backs_off_and_records_the_micro_batch(tmp_path: Path, data_file: Path, model_dir: Path) -> None:
    run_dir = tmp_path / "run"
    cache_dir = tmp_path / "cache"  # its own cache, so the micro-batch it records stays out of other tests
    spec = make_job(run_dir, data_file, model_dir, max_steps=12)
    spec.model_copy(update={"embedded_model_dir": str(cache_dir / "embedded-model")}).save()
    rc, out = finish(start_worker(run_dir, TRAINBOX_TEST_FAULT="oom@5"))
    assert rc == EXIT_COMPLETED, out
    r = results(run_dir)
    assert (r.outcome, r.micro_batch, r.grad_accum, r.step) == (WorkerOutcome.COMPLETED, 2, 2, 12)
    assert train_steps(run_dir) == list(range(1, 13))
    [w] = [m for m in metric_lines(run_dir, "warning") if m["warning"] == "oom_backoff"]
    assert w["step"] == 4 and w["effective_batch"] == 4
    cache = json.loads((cache_dir / CACHE_FILE).read_text())["entries"]
    assert [e["micro_batch"] for k, e in cache.items() if k.endswith("max_length=64")] == [2]
    state = checkpoint.load_state(checkpoint.latest_complete(run_dir).path)  # type: ignore[union-attr]
    assert state["trainer"]["micro_size"] == 2  # a resume keeps it


def test_worker_nan_rollback_and_refused_checkpoint_then_completes(
    tmp_path: Path, data_file: Path, model_dir: Path
) -> None:
    run_dir = tmp_path / "run"
    make_job(run_dir, data_file, model_dir)
    rc, out = finish(start_worker(run_dir, TRAINBOX_TEST_FAULT="nan@10x3,nanweight@14"))
    assert rc == EXIT_COMPLETED, out
    r = results(run_dir)
    assert r.outcome == WorkerOutcome.COMPLETED and r.step == 24
    assert train_steps(run_dir) == list(range(1, 25))  # rolled-back steps were cut from the log and rerun
    kinds = [(m["warning"], m["step"]) for m in metric_lines(run_dir, "warning")]
    # skips at 10-12 roll back to 8 (read a step late, so step 13 ran and was rolled back too); NaN weights after
    # 14 make 15 and 16 NaN (two skips: no rollback yet) and the checkpoint at 16 is refused, which rolls back
    assert [k for k in kinds if k[0] in ("non_finite", "rollback")] == [
        ("non_finite", 10),
        ("non_finite", 11),
        ("non_finite", 12),
        ("rollback", 8),
        ("non_finite", 15),
        ("non_finite", 16),
        ("non_finite", 16),
        ("rollback", 8),
    ]
    for c in checkpoint.complete_checkpoints(run_dir):
        weights = load_file(c.path / checkpoint.MODEL / "model.safetensors")
        assert all(bool(torch.isfinite(v).all()) for v in weights.values()), c.path
    assert checkpoint.load_state(checkpoint.latest_complete(run_dir).path)["trainer"]["rollbacks"] == 2  # type: ignore[union-attr]


def test_worker_disk_full_pauses_without_partial_checkpoint_then_resumes_exactly(
    tmp_path: Path, data_file: Path, model_dir: Path, straight_run: Path
) -> None:
    run_dir = tmp_path / "run"
    make_job(run_dir, data_file, model_dir)
    rc, out = finish(start_worker(run_dir, TRAINBOX_TEST_FAULT="diskfull@20"))
    assert rc == EXIT_INTERRUPTED, out
    r = results(run_dir)
    assert (r.outcome, r.pause_reason, r.failure_class) == (WorkerOutcome.INTERRUPTED, "disk full", "disk")
    assert r.evidence["free_bytes"] == 0 and r.evidence["needed_bytes"] > 0 and r.evidence["resume_step"] == 16
    assert "free at least" in r.fix
    assert [c.name for c in checkpoint.checkpoints_dir(run_dir).iterdir()] == ["step-00000016"]  # older one freed
    status = read_status(run_dir / "training.json", TrainingStatus)
    assert status is not None and status.phase == "interrupted" and "disk full" in status.message

    rc, out = finish(start_worker(run_dir))  # space is back
    assert rc == EXIT_COMPLETED, out
    assert "resuming at step 16" in out and train_steps(run_dir) == list(range(1, 25))
    a = load_file(straight_run / "final" / "model.safetensors")
    b = load_file(run_dir / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_worker_hang_keeps_the_process_alive_without_heartbeats(
    tmp_path: Path, data_file: Path, model_dir: Path
) -> None:
    run_dir = tmp_path / "run"
    make_job(run_dir, data_file, model_dir)
    proc = start_worker(run_dir, TRAINBOX_TEST_FAULT="hang@training:3")
    try:
        deadline = time.time() + 60
        while True:
            st = read_status(run_dir / "training.json", TrainingStatus)
            # steps take milliseconds here: a training heartbeat 1.5 s old means it hangs
            if st is not None and st.phase == "training" and time.time() - st.heartbeat > 1.5:
                break
            assert proc.poll() is None and time.time() < deadline, "worker ended or never started training"
            time.sleep(0.1)
        assert st.step <= 2
        proc.send_signal(signal.SIGTERM)  # a hung worker does not answer: only SIGKILL ends it
        time.sleep(0.5)
        assert proc.poll() is None
        assert checkpoint.latest_complete(run_dir) is None and not (run_dir / "result.json").exists()
    finally:
        proc.kill()
        proc.wait()


def test_worker_failures_carry_class_evidence_and_fix(
    tmp_path: Path, data_file: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In-process (the same code path as the process, minus its start-up time)."""

    def run(name: str, fault: str = "", **over: Any) -> tuple[int, WorkerResult]:
        monkeypatch.setenv("TRAINBOX_TEST_FAULT", fault)
        return run_in_process(make_job(tmp_path / name, data_file, model_dir, **over))

    rc, r = run("nan", "nan@1x1000", nan_max_skips=2, nan_max_rollbacks=1)
    assert rc == EXIT_FAILED and r.failure_class == "nan" and r.evidence["rollbacks"] == 1 and r.fix
    rc, r = run("oom", "oom@2x10")
    assert rc == EXIT_FAILED and r.failure_class == "oom" and r.micro_batch == 1 and r.evidence["micro_batch"] == 1
    rc, r = run("long", max_length=4096)
    assert r.failure_class == "preflight" and "max_position_embeddings" in r.message and "2048" in r.fix
    rc, r = run("bf16", precision="bf16")
    assert r.failure_class == "preflight" and "CPU" in r.message and r.evidence["check"] == "bf16"
    with pytest.raises(PreflightError):
        raise PreflightError("x")
