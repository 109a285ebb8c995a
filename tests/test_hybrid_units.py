"""The hybrid engine's pure parts besides the selection rule and the curve (their own files): the bandit, the
divergence rules, the phase machine, state round trips, and compaction's filling of a step (``Lockstep.plan``)."""

from __future__ import annotations

import math
import random

import pytest
import torch

from core.data import Batches, DataPosition
from core.distributed import Lockstep, StepPlan
from core.encode import Example
from core.hybrid import divergence
from core.hybrid.bandit import LinUCB
from core.hybrid.phases import Phase, PhaseMachine

# --- bandit ---------------------------------------------------------------------------------------


def test_linucb_tries_every_arm_then_converges_to_the_better_one() -> None:
    rng = random.Random(0)
    means = [0.1, 0.5, -0.3]
    bandit = LinUCB([1.0, 0.5, 0.25], dim=2, alpha=0.5)
    picks = []
    for _ in range(300):
        ctx = [1.0, rng.random()]
        a = bandit.choose(ctx)
        picks.append(a)
        bandit.update(a, ctx, means[a] + rng.gauss(0, 0.3))
    assert picks[:3] == [0, 1, 2]  # each arm once, in order, before any estimate is trusted
    assert picks[-100:].count(1) >= 90
    assert bandit.pulls[1] > bandit.pulls[0] and bandit.pulls[1] > bandit.pulls[2]


def test_linucb_uses_the_context() -> None:
    rng = random.Random(1)
    bandit = LinUCB([1.0, 0.5], dim=2, alpha=0.3)
    for _ in range(400):  # arm 0 pays early in training (x=0), arm 1 late (x=1)
        ctx = [1.0, float(rng.random() < 0.5)]
        a = bandit.choose(ctx)
        reward = (1.0 if ctx[1] == 0 else -1.0) if a == 0 else (1.0 if ctx[1] == 1 else -1.0)
        bandit.update(a, ctx, reward + rng.gauss(0, 0.1))
    assert bandit.choose([1.0, 0.0]) == 0 and bandit.choose([1.0, 1.0]) == 1
    copy = LinUCB([0.9], dim=2)
    copy.load_state_dict(bandit.state_dict())
    assert copy.arms == bandit.arms and copy.scores([1.0, 0.5]) == bandit.scores([1.0, 0.5])
    with pytest.raises(ValueError, match="shape"):
        bandit.choose([1.0])


# --- divergence -----------------------------------------------------------------------------------


def test_remeasured_losses_that_rose_too_far_say_roll_back() -> None:
    assert divergence.remeasured([1.0, 1.0], [1.2, 1.2], tol=0.5) is None
    assert divergence.remeasured([1.0, 1.0], [1.4, 1.8], tol=0.5) == "remeasured_rise"  # mean 1.6 > 1.5
    assert divergence.remeasured([1.0], [math.nan], tol=0.5) == "not_finite"
    assert divergence.remeasured([], [], tol=0.5) is None


def test_a_validation_loss_above_the_best_says_roll_back() -> None:
    assert divergence.evaluated(1.01, 1.0, tol=0.02) is None
    assert divergence.evaluated(1.03, 1.0, tol=0.02) == "val_rise"
    assert divergence.evaluated(5.0, None, tol=0.02) is None  # no best yet
    assert divergence.evaluated(math.inf, 1.0, tol=0.02) == "not_finite"


# --- phases ---------------------------------------------------------------------------------------


def test_phase_cycle_warmup_full_predict_correct() -> None:
    m = PhaseMachine(warmup_steps=3, full_steps=2, correct_every=2, cooldown=4, max_cooldown=8)
    assert [m.on_step(True) for _ in range(3)] == [Phase.WARMUP, Phase.WARMUP, Phase.FULL]
    assert not m.skipping
    assert m.on_step(False) == Phase.FULL
    assert m.on_step(False) == Phase.FULL  # the table does not cover enough examples: keep full steps
    assert m.on_step(True) == Phase.PREDICT and m.skipping
    assert m.on_step(True) == Phase.PREDICT
    assert m.on_step(True) == Phase.CORRECT  # every correct_every steps
    with pytest.raises(RuntimeError):
        m.on_step(True)
    assert m.on_corrected() == Phase.PREDICT
    with pytest.raises(RuntimeError):
        m.on_corrected()
    assert m.restart() == Phase.FULL  # the Trainer rolled back: full steps first


def test_phase_falls_back_to_plain_and_cooldown_doubles() -> None:
    m = PhaseMachine(warmup_steps=0, full_steps=1, correct_every=5, cooldown=3, max_cooldown=5)
    assert m.phase == Phase.FULL
    assert m.on_step(True) == Phase.PREDICT
    assert m.fall_back() == Phase.PLAIN and m.current_cooldown == 3
    assert [m.on_step(True) for _ in range(3)] == [Phase.PLAIN, Phase.PLAIN, Phase.FULL]
    m.on_step(True)
    assert m.fall_back() == Phase.PLAIN and m.current_cooldown == 5  # doubled, capped
    assert m.fall_back() == Phase.PLAIN and m.current_cooldown == 5 and m.fallbacks == 3


def test_phase_state_round_trip() -> None:
    m = PhaseMachine(warmup_steps=1, full_steps=1, correct_every=1, cooldown=7)
    m.on_step(True)
    m.on_step(True)
    m.fall_back()
    n = PhaseMachine()
    n.load_state_dict(m.state_dict())
    assert n == m and n.phase is Phase.PLAIN


# --- compaction: a step filled from the micro-batches after it --------------------------------------


def plan_with(keep_every: int, reads: int, grad_accum: int = 1) -> tuple[StepPlan, list[tuple[list[int], int]]]:
    """A plan over 20 examples in micro-batches of 4 (unshuffled order read through ``Batches``), keeping the
    examples whose index is a multiple of ``keep_every``; returns it and the (micro-batch, draw) keep was asked."""
    batches = Batches(20, 4, seed=0)
    examples = [Example(input_ids=[1, 2, 3], labels=[1, 2, 3]) for _ in range(20)]
    asked: list[tuple[list[int], int]] = []

    def keep(ids: list[int], draw: int) -> list[int]:
        asked.append((list(ids), draw))
        return [i for i in ids if i % keep_every == 0]

    def collate(exs: list[Example]) -> dict[str, torch.Tensor]:
        return {"labels": torch.tensor([e.labels for e in exs])}

    return Lockstep().plan(batches, DataPosition(), examples, grad_accum, 4, collate, keep, reads), asked


def test_compaction_fills_a_step_from_the_next_micro_batches() -> None:
    order = Batches(20, 4, seed=0).order(0)
    plan, asked = plan_with(keep_every=2, reads=4)  # about half kept: two micro-batches fill one
    kept = [i for part in plan.rows for i in part]
    read = [i for ids, _ in asked for i in ids]
    assert len(kept) >= 4 and read == order[: 4 * len(asked)]  # read in order, until four were kept
    assert [d for _, d in asked] == list(range(len(asked)))  # each read its own draw
    assert sorted(kept + plan.skipped) == sorted(read) and plan.reads == len(asked)
    assert plan.end == DataPosition(0, len(asked))


def test_compaction_reads_at_most_reads_micro_batches_and_none_without_it() -> None:
    plan, asked = plan_with(keep_every=1000, reads=3)  # only example 0 is ever kept: the cap ends the filling
    assert plan.reads == len(asked) == 3 and plan.end == DataPosition(0, 3)
    plan, asked = plan_with(keep_every=1000, reads=1)  # no compaction: one micro-batch, shrunk
    assert plan.reads == len(asked) == 1 and plan.end == DataPosition(0, 1)
    plan, asked = plan_with(keep_every=1, reads=5, grad_accum=2)  # nothing skipped: one read per micro-batch
    assert plan.reads == 2 and [d for _, d in asked] == [0, 1]
