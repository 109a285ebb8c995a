"""FSDP (``sharding = "fsdp"``, core.sharding): ``torchrun --nproc-per-node 2`` with gloo on the CPU.

A sharded 2-process run equals a 1-process run with the same global batch (gradients summed across ranks, not
averaged: the gradient norms match too) and rank 0 writes the same checkpoint and model files an unsharded run
writes; a SIGTERM stops both ranks at one step boundary with a checkpoint, and a second torchrun run resumes it to
the same end. With 55 training examples in configured micro-batches of 6, the epoch's last micro-batch holds one
example: rank 1 runs a zero-loss forward there so both ranks run FSDP's collectives the same number of times.
"""

# ruff: noqa: F811 (pytest fixtures imported from the other core test modules)
from __future__ import annotations

import functools
import json
import math
import os
import re
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

from core import checkpoint, sharding
from core.data import Batches
from core.encode import IGNORE
from core.memory import USABLE_FRACTION, estimate_memory, pick_micro_batch
from core.metrics import read_metrics
from core.preflight import check_settings, check_sharding, shard_count
from tests.shared_setup import built_once
from tests.test_core_guards import SHAPE
from tests.test_core_worker import (  # noqa: F401 (fixtures)
    data_file,
    finish,
    make_job,
    model_dir,
    run_in_process,
    train_steps,
    wait_for_step,
)
from tests.test_ddp_worker import final_weights, start_torchrun, train_losses
from trainbox.config import TrainingConfig
from trainbox.jobspec import WorkerResult
from trainbox.states import EXIT_COMPLETED, WorkerOutcome

FSDP = {
    "max_steps": 6,
    "batch_size": 6,
    "grad_accum": 2,
    "eval_max_examples": 5,  # 55 training examples: the 10th micro-batch of 6 holds one (step 5)
    "checkpoint_every": 2,
    "eval_every": 2,
}


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory: pytest.TempPathFactory, data_file: Path, model_dir: Path) -> Path:
    """Built once for the session (tests/shared_setup.py), not once per xdist worker; tests only read it."""

    def build(run_dir: Path) -> None:
        make_job(run_dir, data_file, model_dir, nproc=2, sharding="fsdp", **FSDP)
        code, out = finish(start_torchrun(run_dir))
        assert code == 0, out
        assert "fsdp: 2 decoder layers and the root sharded across 2 ranks" in out

    return built_once(tmp_path_factory, "fsdp-run", build)


def grad_norms(run_dir: Path) -> list[float]:
    return [m["grad_norm"] for m in read_metrics(run_dir / "metrics.jsonl") if m["kind"] == "train"]


def optimizer_layout(run_dir: Path, step: int) -> tuple[Any, ...]:
    """What a resume reads from a checkpoint's optimizer state: keys, groups and tensor shapes."""
    state = checkpoint.load_state(checkpoint.checkpoints_dir(run_dir) / checkpoint.step_name(step))["optimizer"]
    shapes = {i: {k: tuple(v.shape) for k, v in s.items()} for i, s in state["state"].items()}
    return shapes, [{k: v for k, v in g.items() if k != "lr"} for g in state["param_groups"]]


def test_fsdp_equals_one_process_and_writes_the_same_files(
    fsdp_run: Path, tmp_path: Path, data_file: Path, model_dir: Path
) -> None:
    one = tmp_path / "one"
    code, _ = run_in_process(make_job(one, data_file, model_dir, **FSDP))
    assert code == EXIT_COMPLETED
    assert train_losses(fsdp_run) == pytest.approx(train_losses(one), abs=1e-5)
    assert grad_norms(fsdp_run) == pytest.approx(grad_norms(one), rel=1e-4)  # an average would halve them
    a, b = final_weights(one), final_weights(fsdp_run)
    assert a.keys() == b.keys()  # the tied output head is written once, as unsharded
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    # summation order and padding widths differ; Adam's normalisation amplifies that where gradients are tiny:
    # measured 4.6e-5 here, and 4.3e-5 for the replicate scheme on these settings (3e-6 between the two)
    assert worst < 1e-4, worst
    # rank 0 alone wrote, in the unsharded formats: one line per step, one result, the same files
    assert train_steps(fsdp_run) == list(range(1, 7))
    result = WorkerResult.load(fsdp_run)
    assert result is not None and result.outcome == WorkerOutcome.COMPLETED and result.step == 6
    assert sorted(os.listdir(fsdp_run / "final")) == sorted(os.listdir(one / "final"))
    config = [json.loads((d / "final" / "config.json").read_text()) for d in (one, fsdp_run)]
    assert config[0] == config[1]  # e.g. architectures: LlamaForCausalLM, not the FSDP subclass
    assert [c.step for c in checkpoint.complete_checkpoints(fsdp_run)] == [4, 6]
    assert optimizer_layout(fsdp_run, 6) == optimizer_layout(one, 6)


def test_sigterm_stops_both_ranks_and_the_resumed_run_ends_the_same(
    fsdp_run: Path, tmp_path: Path, data_file: Path, model_dir: Path
) -> None:
    run_dir = tmp_path / "paused"
    make_job(run_dir, data_file, model_dir, nproc=2, sharding="fsdp", **FSDP)
    proc = start_torchrun(run_dir, TRAINBOX_TEST_STEP_SLEEP="0.3")
    wait_for_step(proc, run_dir, 2)
    proc.send_signal(signal.SIGTERM)  # to the torchrun agent, which forwards it to both ranks
    _code, out = finish(proc)
    stopped = re.findall(r"rank(\d) INFO interrupted at step (\d+)/6", out)
    assert sorted(r for r, _ in stopped) == ["0", "1"], out
    assert len({s for _, s in stopped}) == 1, stopped
    paused = int(stopped[0][1])
    assert 2 <= paused < 6
    assert checkpoint.latest_complete(run_dir).step == paused  # type: ignore[union-attr]

    code, out = finish(start_torchrun(run_dir))
    assert code == 0, out
    assert f"resuming at step {paused}" in out
    assert train_steps(run_dir) == list(range(1, 7))
    assert train_losses(run_dir) == pytest.approx(train_losses(fsdp_run), abs=1e-6)
    a, b = final_weights(fsdp_run), final_weights(run_dir)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6


# --- the pure parts -------------------------------------------------------------------------------


def test_padding_gives_every_rank_rank_0s_number_of_forward_passes() -> None:
    def passes(n: int, world: int, rank: int, micro: int) -> int:
        return math.ceil(len(range(rank, n, world)) / micro) + sharding.padding(n, world, rank, micro)

    for n, world, micro in [(1, 2, 4), (5, 2, 2), (6, 2, 3), (7, 3, 1), (2, 4, 1), (8, 2, 8)]:
        assert len({passes(n, world, r, micro) for r in range(world)}) == 1, (n, world, micro)
    assert sharding.padding(1, 2, 1, 4) == 1  # an empty share still runs one (zero-loss) pass
    assert sharding.padding(6, 2, 1, 3) == 0
    balanced = Batches(8, 8, seed=0, balance=[1] * 8)  # a share of a token-balanced micro-batch: even parts
    for n, world, micro in [(1, 2, 4), (5, 2, 2), (13, 2, 4), (7, 3, 1), (2, 4, 1), (20, 2, 8)]:
        count = functools.partial(balanced.pass_count, micro=micro)
        mine = [count(len(range(r, n, world))) + sharding.padding(n, world, r, micro, count) for r in range(world)]
        assert len(set(mine)) == 1, (n, world, micro)


def test_zero_loss_batch_trains_nothing() -> None:
    batch = {"input_ids": torch.tensor([[5, 6, 7]]), "labels": torch.tensor([[5, 6, 7]])}
    dummy = sharding.zero_loss(batch)
    assert torch.equal(dummy["input_ids"], batch["input_ids"])
    assert bool((dummy["labels"] == IGNORE).all()) and torch.equal(batch["labels"], torch.tensor([[5, 6, 7]]))


def test_optimizer_state_names_and_indices_round_trip() -> None:
    names = [["w1", "w2"], ["b1"]]
    by_name = {
        "state": {"w2": {"step": 3}, "b1": {"step": 3}},
        "param_groups": [{"lr": 0.1, "params": ["w1", "w2"]}, {"lr": 0.1, "params": ["b1"]}],
    }
    indexed = sharding.by_index(by_name, names)
    assert indexed == {
        "state": {1: {"step": 3}, 2: {"step": 3}},
        "param_groups": [{"lr": 0.1, "params": [0, 1]}, {"lr": 0.1, "params": [2]}],
    }
    assert sharding.by_name(indexed, names) == by_name


def test_memory_estimate_divides_weights_grads_and_optimizer_by_the_shards() -> None:
    full = estimate_memory(SHAPE, 8, 1024, bf16=True, cuda=True)
    four = estimate_memory(SHAPE, 8, 1024, bf16=True, cuda=True, shards=4)
    assert (four.grads, four.optimizer) == (full.grads // 4, full.optimizer // 4)
    # its quarter of the weights, plus the full weights of the two layers in flight
    assert four.weights == full.weights // 4 + 2 * full.weights // SHAPE.layers
    assert (four.activations, four.overhead) == (full.activations, full.overhead)
    assert four.weights + four.grads + four.optimizer < (full.weights + full.grads + full.optimizer) / 2
    assert estimate_memory(SHAPE, 8, 1024, True, True, shards=1) == full
    # so a model that does not fit one GPU even at micro-batch 1 fits when sharded four ways
    gpu = int(estimate_memory(SHAPE, 1, 1024, True, True).total * 0.9 / USABLE_FRACTION)
    assert pick_micro_batch(SHAPE, 8, 1024, True, True, gpu)[0] is None
    assert pick_micro_batch(SHAPE, 8, 1024, True, True, gpu, shards=4)[0] is not None
    fsdp = TrainingConfig(sharding="fsdp", nproc=4)
    assert (shard_count(fsdp, 4), shard_count(fsdp, 1), shard_count(TrainingConfig(nproc=4), 4)) == (4, 1, 1)


def test_preflight_refuses_lora_and_warns_about_one_process() -> None:
    lora = check_sharding(TrainingConfig(sharding="fsdp", nproc=2, lora=True), 2)
    assert [(p.code, p.fatal) for p in lora] == [("fsdp_lora", True)]
    assert "sharding = 'replicate'" in lora[0].fix and "lora" in lora[0].message
    one = check_sharding(TrainingConfig(sharding="fsdp"), 1)
    assert [(p.code, p.fatal) for p in one] == [("fsdp_one_process", False)]
    assert "nproc = 2" in one[0].fix and "sharding = 'replicate'" in one[0].fix
    assert check_sharding(TrainingConfig(nproc=2), 2) == []
    # a preflight in one process (nproc 1) reports the warning with the others
    codes = [p.code for p in check_settings(TrainingConfig(sharding="fsdp"), SHAPE, False, False)]
    assert codes == ["fsdp_one_process"]


def test_wrap_shards_every_layer_with_summed_gradients_and_saves_like_unsharded(
    model_dir: Path, tmp_path: Path
) -> None:
    """In a one-process gloo group (FSDP needs one): what ``wrap`` sets up and what ``gather`` saves."""
    plain: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    plain.save_pretrained(tmp_path / "plain")
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        assert sharding.wrap(model, torch.device("cpu"), 1) == 2
        units = [m for m in model.modules() if sharding.is_sharded(m)]
        assert units[0] is model and len(units) == 3  # the root and the two decoder layers
        groups = [g for m in units for g in m._get_fsdp_state()._fsdp_param_groups]
        assert {(g.gradient_divide_factor, g.force_sum_reduction_for_comms) for g in groups} == {(1.0, True)}
        gathered = sharding.gather(model)
        gathered.save_pretrained(tmp_path / "sharded", safe_serialization=True)
        sharding.scatter_weights(model, checkpoint.read_weights(tmp_path / "plain"))  # the tied head is absent
    finally:
        dist.destroy_process_group()
    assert checkpoint.read_weights(tmp_path / "sharded").keys() == checkpoint.read_weights(tmp_path / "plain").keys()
    config = [json.loads((tmp_path / d / "config.json").read_text()) for d in ("plain", "sharded")]
    assert config[0] == config[1]
