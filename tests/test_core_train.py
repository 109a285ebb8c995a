"""The loop in-process: exact resume, accumulation, checkpoint folders, metrics truncation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from core import checkpoint
from core.data import DataPosition, collate, model_inputs
from core.embedded import ensure_embedded_model
from core.encode import Example, encode_all
from core.events import CheckpointEvent, EvalEvent, Event, StepEvent
from core.metrics import read_metrics, truncate_to_step
from core.packing import place
from core.train import Trainer
from trainbox.config import TrainingConfig
from trainbox.records import Record

CPU = torch.device("cpu")


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_flush_denormal(True)
    return ensure_embedded_model(tmp_path_factory.getbasetemp() / "embedded-model")


@pytest.fixture(scope="module")
def examples(model_dir: Path) -> tuple[list[Example], list[Example]]:
    tok = AutoTokenizer.from_pretrained(model_dir)
    words = ["river", "bridge", "garden", "station", "market", "library", "winter", "morning"]
    recs = [
        Record(kind="text", text=f"The {words[i % 8]} was {i} steps from the {words[(i * 3) % 8]}.") for i in range(22)
    ]
    recs += [
        Record(kind="prompt_completion", prompt=f"Count to {i}:", completion=" " + " ".join(map(str, range(i))))
        for i in range(2, 8)
    ]
    enc = encode_all(tok, recs, max_length=48)
    return enc.examples[:24], enc.examples[24:]


def make_trainer(model_dir: Path, data: tuple[list[Example], list[Example]], **over: Any) -> Trainer:
    cfg = TrainingConfig(
        **{
            "max_steps": 12,
            "batch_size": 4,
            "grad_accum": 2,
            "learning_rate": 3e-3,
            "eval_every": 4,
            "checkpoint_every": 0,
            "warmup_ratio": 0.2,
            **over,
        }
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return Trainer(model, cfg, data[0], data[1], pad_id=0, device=CPU)


def saver(trainer: Trainer, run_dir: Path, tok: Any) -> Any:
    def save() -> Path:
        return checkpoint.save(
            run_dir,
            trainer.state.step,
            trainer.model,
            tok,
            trainer.state_dict(),
            trainer.cfg.model_dump(mode="json"),
            {},
        ).path

    return save


def test_resume_from_checkpoint_is_bitwise_identical(model_dir: Path, examples: Any, tmp_path: Path) -> None:
    tok = AutoTokenizer.from_pretrained(model_dir)
    straight_events: list[Event] = []
    a = make_trainer(model_dir, examples)
    assert a.batches.per_epoch == 6  # 24 examples / 4: 12 steps x 2 micro-batches = 4 epochs
    assert a.speedups.packed and a.speedups.split is not None  # the defaults: packed rows, the split loss,
    assert a.batches.order_kind == "token_balanced"  # micro-batches of steady tokens
    assert a.run(straight_events.append, lambda: False, saver(a, tmp_path / "a", tok)) == "completed"

    b = make_trainer(model_dir, examples)
    first: list[Event] = []
    assert b.run(first.append, lambda: b.state.step >= 5, saver(b, tmp_path / "b", tok)) == "interrupted"
    ckpt = checkpoint.latest_complete(tmp_path / "b")
    assert ckpt is not None and ckpt.step == 5
    assert [e.step for e in first if isinstance(e, CheckpointEvent)] == [5]

    torch.manual_seed(999)  # a fresh process would have different RNG state: the checkpoint restores it
    c = make_trainer(ckpt.path / checkpoint.MODEL, examples)
    c.load_state_dict(checkpoint.load_state(ckpt.path))
    rest: list[Event] = []
    assert c.run(rest.append, lambda: False, saver(c, tmp_path / "b", tok)) == "completed"

    sa, sc = a.model.state_dict(), c.model.state_dict()
    assert sa.keys() == sc.keys()
    for k in sa:
        assert torch.equal(sa[k], sc[k]), k
    losses = {e.step: e.loss for e in straight_events if isinstance(e, StepEvent)}
    resumed = {e.step: e.loss for e in first + rest if isinstance(e, StepEvent)}
    assert resumed == losses and sorted(resumed) == list(range(1, 13))
    assert c.state.first_val_loss == a.state.first_val_loss
    assert c.state.train_loss == a.state.train_loss
    evals = [e.step for e in first + rest if isinstance(e, EvalEvent)]
    assert evals == [0, 4, 8, 12]  # no repeated evaluation at the resume step


@pytest.mark.parametrize(("over", "kind"), [({"group_by_length": True}, "length_grouped"), ({}, "token_balanced")])
def test_checkpoint_from_before_length_grouping_resumes_in_its_own_order(
    model_dir: Path, examples: Any, over: dict[str, Any], kind: str
) -> None:
    """A checkpoint whose data position counts plain shuffled epochs (no "order" recorded: made before length
    grouping or token balancing) is continued in that order, not refused and not regrouped or recut: its run's
    remaining batches are the ones it would have seen."""
    a = make_trainer(model_dir, examples, **over)
    state = a.state_dict()
    assert state["data"]["order"] == kind
    del state["data"]["order"]
    b = make_trainer(model_dir, examples, **over)
    b.load_state_dict(state)
    plain = make_trainer(model_dir, examples, packing=False).batches
    assert b.batches.order_kind == plain.order_kind == "random"
    assert [b.batches.take(DataPosition(1, k))[0] for k in range(6)] == [
        plain.take(DataPosition(1, k))[0] for k in range(6)
    ]
    assert b.state_dict()["data"] == state["data"]


def test_a_steps_numbers_are_read_after_the_next_step_is_queued(model_dir: Path, examples: Any) -> None:
    """No host sync between steps (core.readback): step k's event comes once step k+1 was applied, except at a
    boundary (evaluation every 4 steps, the end), where the last step is read before anything else happens."""
    t = make_trainer(model_dir, examples)
    applied = [0]
    t.optimizer.register_step_post_hook(lambda *_: applied.__setitem__(0, applied[0] + 1))
    seen: list[tuple[str, int, int]] = []

    def emit(e: Event) -> None:
        if isinstance(e, StepEvent | EvalEvent):
            seen.append((type(e).__name__, e.step, applied[0]))

    assert t.defers_reads and t.run(emit, lambda: False, lambda: Path()) == "completed"
    steps = [(step, done) for kind, step, done in seen if kind == "StepEvent"]
    assert steps == [(k, k if k % 4 == 0 else k + 1) for k in range(1, 13)]
    assert [(step, done) for kind, step, done in seen if kind == "EvalEvent"] == [(0, 0), (4, 4), (8, 8), (12, 12)]


def test_accumulated_step_equals_one_big_batch(model_dir: Path, examples: Any) -> None:
    """Loss is normalised by the trained tokens of the whole step, so 2 x 4 examples == 1 x 8, and so
    is one configured micro-batch of 8 split into forward passes of 4 (the OOM back-off), and so are
    padding-free packed rows."""
    data: tuple[list[Example], list[Example]] = (examples[0][:8], [])
    results = []
    for bs, accum, micro, packing in ((8, 1, 8, False), (4, 2, 4, False), (8, 1, 4, False), (4, 2, 4, True)):
        t = make_trainer(model_dir, data, batch_size=bs, grad_accum=accum, max_steps=1, grad_clip=0.0, packing=packing)
        t.set_micro_batch(micro)
        assert t.micro_batch_size * t.accum_steps == 8
        grads: dict[str, torch.Tensor] = {}
        params = dict(t.model.named_parameters())
        t.optimizer.step = lambda *a, p=params, g=grads: g.update(  # type: ignore[method-assign]
            {k: v.grad.clone() for k, v in p.items() if v.grad is not None}
        )
        out = t._optimizer_step(1e-3)
        assert out is not None and not out.read().skipped
        results.append((*out.read()[:3], grads))
    loss_a, norm_a, tok_a, grads_a = results[0]
    for loss_b, norm_b, tok_b, grads_b in results[1:]:
        assert tok_a == tok_b
        assert loss_b == pytest.approx(loss_a, rel=1e-5)
        assert norm_b == pytest.approx(norm_a, rel=1e-5)
        assert grads_a.keys() == grads_b.keys()
        for k in grads_a:
            assert torch.allclose(grads_a[k], grads_b[k], rtol=1e-4, atol=1e-7), k


def test_packed_row_attends_within_each_example_only(model_dir: Path, examples: Any) -> None:
    """Each example's logits in a packed row equal its logits alone: no token sees another example, nor
    the row's filler."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    a, b = examples[0][:2]
    long = Example(a.input_ids + b.input_ids, a.labels + b.labels)
    group = [*examples[0][:3], long, *examples[1]]  # 10 to 13 tokens and one of twice that: they share rows
    lengths = [len(e.input_ids) for e in group]
    rows = place(lengths, max(lengths))
    assert any(len(r) > 1 for r in rows) and len(rows) < len(group)  # several examples share a row
    batch = collate(group, pad_id=0, packed=True)
    assert "attention_mask" not in batch and batch["input_ids"].shape == (len(rows), max(lengths))
    with torch.no_grad():
        packed = model(**model_inputs(batch, CPU)).logits
        for r, members in enumerate(rows):
            start = 0
            for i in members:
                alone = model(input_ids=torch.tensor([group[i].input_ids])).logits[0]
                n = lengths[i]
                assert torch.allclose(packed[r, start : start + n], alone, atol=1e-5), (r, i)
                start += n


def test_training_lowers_validation_loss(model_dir: Path, examples: Any) -> None:
    t = make_trainer(model_dir, examples, max_steps=30, eval_every=0)
    t.run(lambda e: None, lambda: False, lambda: Path())
    assert t.state.first_val_loss is not None and t.state.last_val_loss is not None
    assert t.state.last_val_loss < t.state.first_val_loss - 1.0


def test_stop_at_step_zero_saves_nothing(model_dir: Path, examples: Any) -> None:
    t = make_trainer(model_dir, examples)
    saved: list[int] = []

    def save() -> Path:
        saved.append(t.state.step)
        return Path()

    assert t.run(lambda e: None, lambda: True, save) == "interrupted"
    assert saved == [] and t.state.step == 0


def test_checkpoint_listing_ignores_partial_and_prune_keeps_newest(
    model_dir: Path, examples: Any, tmp_path: Path
) -> None:
    tok = AutoTokenizer.from_pretrained(model_dir)
    t = make_trainer(model_dir, examples)
    for step in (10, 20, 30):
        t.state.step = step
        saver(t, tmp_path, tok)()
    root = checkpoint.checkpoints_dir(tmp_path)
    (root / "step-00000040").mkdir()  # a copy without the marker
    (root / ".tmp-step-00000050-x").mkdir()  # a save that died
    assert [c.step for c in checkpoint.complete_checkpoints(tmp_path)] == [10, 20, 30]
    assert checkpoint.remove_partial(tmp_path) == [root / ".tmp-step-00000050-x"]
    deleted = checkpoint.prune(tmp_path, keep=2)
    assert [c.step for c in deleted] == [10]
    assert [c.step for c in checkpoint.complete_checkpoints(tmp_path)] == [20, 30]
    ckpt = root / "step-00000030"
    assert {p.name for p in ckpt.iterdir()} == {"model", "state.pt", "meta.json", "COMPLETE"}
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["step"] == 30 and meta["size_bytes"] > 0
    state = checkpoint.load_state(ckpt)
    assert state["trainer"]["step"] == 30 and state["config"]["batch_size"] == 4
    reloaded = AutoModelForCausalLM.from_pretrained(ckpt / "model")
    assert reloaded.num_parameters() == sum(p.numel() for p in t.model.parameters())


def test_metrics_truncate_to_checkpoint_step(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    lines = [{"kind": "train", "step": s} for s in range(1, 8)] + [{"kind": "eval", "step": 5}]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"kind": "train", "st')
    assert truncate_to_step(path, 5) == 6
    assert [m["step"] for m in read_metrics(path)] == [1, 2, 3, 4, 5, 5]
    assert truncate_to_step(path, -1) == 0 and path.read_text() == ""
