"""The hybrid engine's per-example loss table and selection rule (core.hybrid.selection): pure, no model."""

from __future__ import annotations

import math

import numpy as np
import pytest

from core.hybrid.selection import FIELDS, LossTable, Rule, calibrate, keep_probability, select


def table_with(losses: list[float], step: int = 0) -> LossTable:
    t = LossTable(len(losses))
    t.record(list(range(len(losses))), losses, step)
    return t


def test_record_keeps_the_last_finite_loss_and_its_step() -> None:
    t = LossTable(4)
    assert t.coverage() == 0.0 and np.isnan(t.predicted(0)).all()
    t.record([0, 2], [1.5, 0.5], step=3)
    t.record([2, 3], [0.25, math.nan], step=7)  # a non-finite loss says nothing about the example
    assert t.loss[0] == 1.5 and t.step[0] == 3 and t.loss[2] == 0.25 and t.step[2] == 7
    assert np.isnan(t.loss[3]) and t.step[3] == -1 and t.seen.tolist() == [1, 0, 2, 0]
    assert t.coverage() == 0.5
    # the predicted loss grows by the forgetting rate per step since the measurement
    pred = t.predicted(13, forget_rate=0.1)
    assert pred[0] == pytest.approx(1.5 * math.exp(0.1 * 10)) and pred[2] == pytest.approx(0.25 * math.exp(0.6))


def test_keep_probability_is_the_loss_percentile_to_a_power() -> None:
    ref = np.sort(np.arange(1, 11, dtype=float))  # losses 1..10
    p = keep_probability(np.array([10.0, 5.0, 1.0, 0.1]), ref, keep_share=0.5, floor=0.05)  # beta 1: p = F(x)
    assert p.tolist() == pytest.approx([1.0, 0.5, 0.1, 0.05])
    p = keep_probability(np.array([5.0]), ref, keep_share=1 / 3, floor=0.0)  # beta 2
    assert p.tolist() == pytest.approx([0.25])
    assert keep_probability(np.array([0.1]), ref, keep_share=1.0, floor=0.0).tolist() == [1.0]


def test_select_keeps_about_the_share_and_the_hardest_examples() -> None:
    n = 2000
    losses = np.random.default_rng(0).uniform(0.1, 3.0, n).tolist()
    t = table_with(losses, step=0)
    rule = Rule(keep_share=0.5, floor=0.02, max_stale=100)
    sel = select(list(range(n)), t, step=5, seed=1, rule=rule)
    assert sorted(sel.kept + sel.skipped) == list(range(n)) and not set(sel.kept) & set(sel.skipped)
    assert 0.45 < len(sel.kept) / n < 0.55  # E[F^1] = 1/2
    kept, skipped = np.array(losses)[sel.kept], np.array(losses)[sel.skipped]
    assert kept.mean() > skipped.mean() + 0.5  # the hard ones are trained
    top = np.argsort(losses)[-20:]
    assert set(top.tolist()) <= set(sel.kept)  # F >= 0.99: all but certainly kept
    # deterministic by (seed, step): a resumed run selects the same; another step draws again
    assert select(list(range(n)), t, 5, 1, rule) == sel
    assert select(list(range(n)), t, 6, 1, rule) != sel
    assert select(list(range(n)), t, 5, 1, Rule(1.0, 0.0, 100)).kept == list(range(n))


def test_select_keeps_unmeasured_and_stale_examples_and_at_least_one() -> None:
    t = LossTable(6)
    t.record([0, 1, 2, 3], [0.01, 0.01, 0.01, 5.0], step=10)
    t.record([4], [0.01], step=0)  # measured 30 steps before: no longer trusted
    rule = Rule(keep_share=0.1, floor=0.0, max_stale=20)
    sel = select([0, 1, 2, 4, 5], t, step=30, seed=0, rule=rule)
    assert {4, 5} <= set(sel.kept)  # stale, never measured
    sel = select([0, 1, 2], t, step=30, seed=0, rule=rule)  # all learned: the step still trains one
    assert len(sel.kept) == 1 and len(sel.skipped) == 2
    t.force[sel.skipped] = True  # their re-measured loss rose: trained at their next turn
    assert select([0, 1, 2], t, step=30, seed=0, rule=rule).kept == [0, 1, 2]
    t.trained([0, 1, 2])
    assert not t.force.any()
    assert select([], t, 30, 0, rule).kept == []


def test_calibrate_measures_the_forgetting_rate() -> None:
    assert calibrate([1.0, 2.0], [1.0 * math.e, 2.0 * math.e], [10, 10]) == pytest.approx(0.1)
    assert calibrate([1.0], [0.5], [0]) is None  # no age: no rate
    rate = calibrate([1.0, 1.0, 1.0], [0.9, 1.0, 1.2], [5, 5, 5])
    assert rate == pytest.approx(0.0)  # the median


def test_skips_record_and_state_round_trip() -> None:
    t = table_with([0.2, 3.0, 0.1, 1.0])
    t.mark_skipped([0, 2], step=4)
    t.mark_skipped([2], step=9)
    assert t.skips.tolist() == [1, 0, 2, 0] and t.first_skip.tolist() == [4, -1, 4, -1]
    assert t.skipped_since_measured().tolist() == [0, 2]
    t.record([0], [0.3], step=10)  # re-measured: no longer a candidate for the next correction
    assert t.skipped_since_measured().tolist() == [2]
    t.force[2] = True
    assert t.most_skipped(5) == [(2, 2, 4), (0, 1, 4)]  # learned early: skipped most
    assert t.highest_loss(2) == [(1, 3.0), (3, 1.0)]  # never learned: highest last loss
    other = LossTable(4)
    other.load_state_dict(t.state_dict())
    for name in FIELDS:
        assert np.array_equal(getattr(other, name), getattr(t, name))
    with pytest.raises(ValueError, match="4 examples"):
        LossTable(5).load_state_dict(t.state_dict())


def test_each_draw_of_a_step_is_its_own() -> None:
    """Compaction reads several micro-batches in one step: each gets its own seeded draw (else the examples at the
    same place of each would be kept or skipped together); draw 0 is the step's draw as before."""
    t = table_with([float(i % 7 + 1) for i in range(64)])
    rule = Rule(keep_share=0.5, floor=0.0, max_stale=100)
    ids = list(range(32))
    first = select(ids, t, 5, 0, rule)
    assert select(ids, t, 5, 0, rule, draw=0) == first
    assert select(ids, t, 5, 0, rule, draw=1) == select(ids, t, 5, 0, rule, draw=1)  # seeded
    assert select(ids, t, 5, 0, rule, draw=1) != first


def test_learned_below_skips_only_losses_under_a_share_of_the_mean() -> None:
    """``learned_below``: the rank rule skips its share of the lowest losses even when all are alike (nothing
    learned); with the absolute rule only those below the share of the mean may be skipped."""
    losses = [1.0 + 0.01 * i for i in range(30)] + [0.01] * 10  # 30 unlearned, 10 learned; mean 0.89
    t = table_with(losses)
    ids = list(range(40))
    rank = Rule(keep_share=0.25, floor=0.0, max_stale=100)
    assert any(i < 30 for i in select(ids, t, 1, 0, rank).skipped)  # low among the unlearned: skipped
    absolute = Rule(keep_share=0.25, floor=0.0, max_stale=100, learned_below=0.25)
    for step in range(1, 6):
        sel = select(ids, t, step, 0, absolute)
        assert sel.skipped and all(i >= 30 for i in sel.skipped)  # only the learned ones
