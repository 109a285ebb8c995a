"""Pure parts of the recovery machinery: fault syntax, early-warning detector, preflight checks,
disk guard, micro-batch cache."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from core import checkpoint
from core.disk import DiskGuard
from core.errors import DiskFull
from core.faults import Faults
from core.health import HealthMonitor
from core.memory import ModelShape, estimate_memory, halvings, pick_micro_batch
from core.microbatch import MicroBatchCache, cache_key
from core.preflight import check_data, check_memory, check_settings
from trainbox.config import TrainingConfig

SHAPE = ModelShape(
    params=1_000_000_000,
    trainable=1_000_000_000,
    hidden=2048,
    intermediate=8192,
    layers=24,
    heads=16,
    vocab=32000,
    max_positions=2048,
)
GiB = 1024**3


# --- faults ---------------------------------------------------------------------------------------


def test_fault_syntax_and_counting() -> None:
    f = Faults.parse("oom@5x3, nan@7,evaloom@10,diskfull@20,diskfree=1000,hang@training:5,hang@loading")
    assert f.disk_free == 1000
    assert [(x.kind, x.step, x.count, x.phase) for x in f.faults] == [
        ("oom", 5, 3, ""),
        ("nan", 7, 1, ""),
        ("evaloom", 10, 1, ""),
        ("diskfull", 20, 1, ""),
        ("hang", 5, 1, "training"),
        ("hang", 0, 1, "loading"),
    ]
    assert not f.fire("oom", 4)
    assert [f.fire("oom", 5) for _ in range(4)] == [True, True, True, False]
    assert not f.fire("nan", 6) and f.fire("nan", 8) and not f.fire("nan", 9)  # first attempt at 7 or later
    f.hang("training", 4)  # returns: not yet
    f.hang("evaluating", 50)  # returns: no such fault
    assert not Faults() and not Faults.parse("")
    for bad in ("oom", "boom@3", "hang@5", "oom@training:5", "hang@sleeping:3"):
        with pytest.raises(ValueError, match="TRAINBOX_TEST_FAULT"):
            Faults.parse(bad)


# --- early warnings -------------------------------------------------------------------------------


def feed(h: HealthMonitor, losses: list[float], grads: list[float] | None = None, lr: float = 1e-3) -> list[str]:
    out = []
    for i, loss in enumerate(losses):
        g = grads[i] if grads else 1.0
        out += [a.kind for a in h.on_step(i + 1, 1000, loss, g, lr, 1e-3)]
    return out


def test_loss_and_grad_spikes_after_warmup_with_cooldown() -> None:
    h = HealthMonitor(warmup=10, cooldown=50)
    assert feed(h, [5.0] * 3 + [50.0]) == []  # no average yet to compare with
    h = HealthMonitor(warmup=10, cooldown=50)
    assert feed(h, [2.0] * 12 + [4.5, 2.0, 5.0]) == ["loss_spike"]  # the second spike is within the cooldown
    h = HealthMonitor(warmup=10)
    kinds = feed(h, [2.0] * 13, grads=[1.0] * 12 + [11.0])
    assert kinds == ["grad_spike"]
    a = HealthMonitor(warmup=10).on_step(20, 100, 2.0, 1.0, 1e-3, 1e-3)
    assert a == []


def test_non_finite_is_always_reported() -> None:
    h = HealthMonitor()
    alerts = h.on_step(3, 100, math.nan, 1.0, 1e-3, 1e-3) + h.on_step(4, 100, 2.0, math.inf, 1e-3, 1e-3)
    assert [a.kind for a in alerts] == ["non_finite", "non_finite"]
    assert alerts[0].data["loss"] == "nan" and h.state.finite_steps == 0  # averages untouched


def test_learning_rate_near_zero_with_steps_left() -> None:
    h = HealthMonitor()
    assert h.on_step(10, 100, 2.0, 1.0, 1e-7, 1e-3, warmup_done=False) == []  # warmup starts low
    assert h.on_step(95, 100, 2.0, 1.0, 1e-7, 1e-3) == []  # the end of a decay to 0
    assert [a.kind for a in h.on_step(50, 100, 2.0, 1.0, 1e-7, 1e-3)] == ["lr_near_zero"]


def test_overfitting_needs_rising_val_and_falling_train() -> None:
    h = HealthMonitor(patience=3)
    assert h.on_eval(10, 2.0, 3.0) == [] and h.on_eval(20, 2.1, 2.5) == [] and h.on_eval(30, 2.2, 2.0) == []
    alerts = h.on_eval(40, 2.3, 1.5)
    assert [a.kind for a in alerts] == ["overfitting"] and "rose for 3 evaluations" in alerts[0].message
    h = HealthMonitor(patience=2)
    # val rising while train rises too is divergence, not overfitting
    assert [h.on_eval(s, v, t) for s, v, t in ((1, 2.0, 3.0), (2, 2.1, 3.1), (3, 2.2, 2.0))] == [[], [], []]
    h2 = HealthMonitor(patience=2)  # its state goes into checkpoints
    h2.load_state_dict(h.state_dict())
    assert h2.state == h.state


# --- preflight ------------------------------------------------------------------------------------


def test_memory_estimate_and_micro_batch_pick() -> None:
    est = estimate_memory(SHAPE, 1, 1024, bf16=True, cuda=True)
    assert est.weights == 4_000_000_000  # fp32 master weights
    assert est.grads == 4_000_000_000 and est.optimizer == 8_000_000_000
    assert estimate_memory(SHAPE, 8, 1024, True, True).activations == 8 * est.activations
    assert halvings(8) == [8, 4, 2, 1] and halvings(5) == [5, 2, 1]
    fixed = est.weights + est.grads + est.optimizer + est.overhead
    room = fixed + 3 * est.activations  # micro-batch 2 fits, 4 does not
    micro, chosen = pick_micro_batch(SHAPE, 8, 1024, True, True, int(room / 0.9) + 1)
    assert micro == 2 and chosen.total <= room
    assert pick_micro_batch(SHAPE, 8, 1024, True, True, 10 * GiB)[0] is None


def test_preflight_rejects_each_pitfall_with_a_fix() -> None:
    cfg = TrainingConfig(max_length=4096)
    [p] = check_settings(cfg, SHAPE, cuda=True, bf16_supported=True)
    assert p.fatal and p.code == "max_length" and "2048" in p.message and p.fix == "set max_length = 2048 or less"
    [p] = check_settings(TrainingConfig(precision="bf16"), SHAPE, cuda=False, bf16_supported=False)
    assert p.fatal and "CPU" in p.message and "fp32" in p.fix
    [p] = check_settings(TrainingConfig(precision="bf16"), SHAPE, cuda=True, bf16_supported=False)
    assert p.fatal and "does not support bf16" in p.message
    [p] = check_data(100, 0, eval_file=True, eval_fraction=0.1)
    assert p.fatal and p.code == "eval_empty"
    [p] = check_data(1, 0, eval_file=False, eval_fraction=0.1)
    assert not p.fatal and p.code == "no_eval"
    [p] = check_data(100, 3, eval_file=False, eval_fraction=0.1)
    assert not p.fatal and p.code == "eval_small" and "3 example" in p.message
    _, [p] = check_memory(SHAPE, TrainingConfig(batch_size=8, max_length=1024), True, True, 8 * GiB, "GPU x")
    assert p.fatal and p.code == "memory" and "LoRA" in p.fix and p.evidence["available_bytes"] == 8 * GiB
    # a good job: nothing to say
    good = TrainingConfig(max_length=1024, batch_size=2)
    assert check_settings(good, SHAPE, cuda=True, bf16_supported=True) == []
    assert check_data(1000, 50, eval_file=False, eval_fraction=0.1) == []
    assert check_memory(SHAPE, good, True, True, 80 * GiB, "GPU x") == (2, [])


# --- disk guard -----------------------------------------------------------------------------------


def fake_checkpoint(run_dir: Path, step: int, size: int) -> None:
    d = checkpoint.checkpoints_dir(run_dir) / checkpoint.step_name(step)
    d.mkdir(parents=True)
    (d / "blob").write_bytes(b"x" * size)
    (d / checkpoint.COMPLETE).write_text(f"{step}\n")


def test_disk_guard_frees_old_checkpoints_then_gives_up(tmp_path: Path) -> None:
    for step in (10, 20, 30):
        fake_checkpoint(tmp_path, step, 1000)
    deleted: list[int] = []
    guard = DiskGuard(
        tmp_path, margin_bytes=100, faults=Faults(disk_free=500), on_deleted=lambda c: deleted.extend(x.step for x in c)
    )
    guard.ensure("checkpoint", 2000, step=40)  # 500 free + 2000 freed by deleting steps 10 and 20
    assert deleted == [10, 20] and [c.step for c in checkpoint.complete_checkpoints(tmp_path)] == [30]
    with pytest.raises(DiskFull) as info:
        guard.ensure("checkpoint", 5000, step=40)  # the newest checkpoint is never deleted
    assert info.value.evidence["needed_bytes"] == 5000 and info.value.evidence["free_bytes"] == 500 + 2 * 1003
    assert [c.step for c in checkpoint.complete_checkpoints(tmp_path)] == [30]
    real = DiskGuard(tmp_path, margin_bytes=0, faults=Faults.parse("diskfull@50"))
    real.ensure("checkpoint", 1, step=40)  # real free space; the fault waits for step 50
    with pytest.raises(DiskFull):
        real.ensure("checkpoint", 1, step=50)
    real.ensure("checkpoint", 1, step=60)  # fired once


# --- micro-batch cache ----------------------------------------------------------------------------


def test_micro_batch_cache(tmp_path: Path) -> None:
    cfg = {"model_type": "llama", "hidden_size": 128, "num_hidden_layers": 2}
    key = cache_key("cuda:0 (H100)", cfg, 656_000, 256, True)
    assert key != cache_key("cuda:0 (H100)", cfg, 656_000, 512, True)
    assert key != cache_key("cpu (1 thread)", cfg, 656_000, 256, True)
    cache = MicroBatchCache(tmp_path / "cache" / "microbatch.json")
    assert cache.get(key) is None
    cache.record(key, 2, max_length=256)
    assert MicroBatchCache(tmp_path / "cache" / "microbatch.json").get(key) == 2
    (tmp_path / "cache" / "microbatch.json").write_text("{not json")
    assert cache.get(key) is None  # a hint only
