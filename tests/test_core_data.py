"""Split, batching and schedule: pure functions of the seed, so resume can be exact."""

from __future__ import annotations

import itertools

import pytest
import torch

from core.data import Batches, DataPosition, collate, heldout_count, pack, real_tokens, split_heldout, total_steps
from core.encode import IGNORE, Example
from core.schedule import lr_at, warmup_steps


@pytest.mark.parametrize(
    ("n", "fraction", "cap", "expected"),
    [
        (1, 0.1, 256, 0),
        (2, 0.1, 256, 1),
        (10, 0.1, 256, 1),
        (200, 0.1, 256, 20),
        (200, 0.1, 5, 5),
        (5, 0.9, 256, 4),
        (100, 0.0, 256, 0),
    ],
)
def test_heldout_count(n: int, fraction: float, cap: int, expected: int) -> None:
    assert heldout_count(n, fraction, cap) == expected


def test_split_is_seeded_disjoint_and_complete() -> None:
    items = list(range(50))
    train, val = split_heldout(items, 0.2, 256, seed=7)
    assert (train, val) == split_heldout(items, 0.2, 256, seed=7)
    assert len(val) == 10 and sorted(train + val) == items
    assert split_heldout(items, 0.2, 256, seed=8)[1] != val


def test_each_epoch_is_a_fresh_permutation_of_all_examples() -> None:
    b = Batches(10, 4, seed=3)
    assert b.per_epoch == 3
    pos, seen = DataPosition(), []
    for _ in range(6):
        idx, pos = b.take(pos)
        seen.append(idx)
    assert pos == DataPosition(2, 0)
    epoch0 = sorted(i for batch in seen[:3] for i in batch)
    epoch1 = sorted(i for batch in seen[3:] for i in batch)
    assert epoch0 == epoch1 == list(range(10))
    assert [len(x) for x in seen[:3]] == [4, 4, 2]
    assert seen[:3] != seen[3:]


def test_a_new_batcher_continues_from_a_position_exactly() -> None:
    a = Batches(13, 3, seed=1)
    pos, straight = DataPosition(), []
    for _ in range(20):
        idx, pos = a.take(pos)
        straight.append(idx)
    pos = DataPosition()
    for _ in range(7):
        _, pos = a.take(pos)
    b = Batches(13, 3, seed=1)  # as after a restart: nothing cached
    resumed = []
    for _ in range(13):
        idx, pos = b.take(pos)
        resumed.append(idx)
    assert resumed == straight[7:]


def test_total_steps() -> None:
    assert total_steps(max_steps=17, epochs=3, micro_batches_per_epoch=10, grad_accum=2) == 17
    assert total_steps(max_steps=0, epochs=3, micro_batches_per_epoch=10, grad_accum=4) == 8
    assert total_steps(max_steps=0, epochs=0.01, micro_batches_per_epoch=10, grad_accum=1) == 1


def test_collate_pads_right_and_masks_padding() -> None:
    batch = collate([Example([5, 6, 7], [IGNORE, 6, 7]), Example([8], [8])], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]
    assert batch["input_ids"].dtype == torch.long


def test_schedule_warms_up_then_decays_to_the_floor() -> None:
    total, peak = 100, 1e-3
    lrs = [lr_at(s, total, peak, warmup_ratio=0.1, min_lr_ratio=0.1) for s in range(total)]
    w = warmup_steps(total, 0.1)
    assert w == 10
    assert all(a < b for a, b in itertools.pairwise(lrs[: w + 1]))  # rising through warmup
    assert lrs[w] == pytest.approx(peak)
    assert all(a >= b for a, b in itertools.pairwise(lrs[w:]))  # then never rising
    assert lrs[-1] == pytest.approx(0.1 * peak, rel=0.01)
    assert min(lrs[w:]) >= 0.1 * peak
    assert lrs[0] > 0


def test_schedule_without_warmup_starts_at_peak() -> None:
    assert lr_at(0, 50, 3e-4, warmup_ratio=0.0, min_lr_ratio=0.0) == pytest.approx(3e-4)


def test_pack_lays_examples_end_to_end_with_restarting_positions() -> None:
    a = Example([5, 6, 7], [IGNORE, 6, 7])
    b = Example([8, 9], [8, 9])
    row = pack([a, b])
    assert row["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert row["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    # b's first label would be predicted from a's last token: not trained, as in a padded batch
    assert row["labels"].tolist() == [[IGNORE, 6, 7, IGNORE, 9]]
    assert real_tokens(row) == 5 == real_tokens(collate([a, b], pad_id=0))
