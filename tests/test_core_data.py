"""Split, batching and schedule: pure functions of the seed, so resume can be exact."""

from __future__ import annotations

import itertools
import random
import statistics

import pytest
import torch

from core.balance import cuts, even_parts
from core.data import Batches, DataPosition, collate, heldout_count, real_tokens, split_heldout, total_steps
from core.encode import IGNORE, Example
from core.packing import pack_rows, place
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


def dense(micro: list[list[int]], lengths: list[int]) -> float:
    """Real tokens over padded positions."""
    return sum(lengths[i] for m in micro for i in m) / sum(len(m) * max(lengths[i] for i in m) for m in micro)


def test_length_grouped_epochs_keep_every_example_and_resume_exactly() -> None:
    """Grouping changes which examples share a micro-batch, not how many there are: each epoch still holds
    every example once, in the same number of full micro-batches, seeded, and a restart at a position
    continues exactly; the longest micro-batch comes first."""
    rng = random.Random(5)
    lengths = [max(1, int(rng.lognormvariate(3, 0.9))) for _ in range(1003)]
    a = Batches(len(lengths), 8, seed=2, lengths=lengths)
    assert a.per_epoch == Batches(len(lengths), 8, seed=2).per_epoch == 126
    for epoch in (0, 1):
        order = a.order(epoch)
        assert sorted(order) == list(range(len(lengths)))
        micro = [order[k : k + 8] for k in range(0, len(order), 8)]
        assert [len(m) for m in micro] == [8] * 125 + [3]
        assert max(lengths[i] for i in micro[0]) == max(lengths)
        # within a micro-batch lengths are close: padding to the longest wastes little
        assert dense(micro[:-1], lengths) > 0.85
    shuffled = Batches(len(lengths), 8, seed=2).order(0)
    assert dense([shuffled[k : k + 8] for k in range(0, 1000, 8)], lengths) < 0.5
    assert a.order(0) != a.order(1)
    assert a.order(0) == Batches(len(lengths), 8, seed=2, lengths=lengths).order(0)
    assert a.order(0) != Batches(len(lengths), 8, seed=3, lengths=lengths).order(0)
    pos, straight = DataPosition(), []
    for _ in range(300):
        idx, pos = a.take(pos)
        straight.append(idx)
    b, pos = Batches(len(lengths), 8, seed=2, lengths=lengths), DataPosition(1, 17)  # a restart, nothing cached
    assert [b.take(pos)[0]] == [straight[126 + 17]]
    b.ungroup()
    assert b.order(0) == Batches(len(lengths), 8, seed=2).order(0)


def test_token_balanced_epochs_are_the_shuffled_order_cut_into_steady_micro_batches() -> None:
    """Balancing moves only the cuts: each epoch is the plain shuffled order, every example once, in as many
    micro-batches as before, whose token counts are steady where plain ones of 8 examples vary several-fold
    (the long-tailed lengths of bench_defaults; one example's granularity is what is left); a restart at a
    position continues exactly."""
    rng = random.Random(5)
    lengths = [max(8, min(256, round(rng.lognormvariate(3.9, 1.0)))) for _ in range(1003)]
    plain, a = Batches(len(lengths), 8, seed=2), Batches(len(lengths), 8, seed=2, balance=lengths)
    assert a.order_kind == "token_balanced" and a.per_epoch == plain.per_epoch == 126

    def epoch(b: Batches, e: int) -> list[list[int]]:
        return [b.take(DataPosition(e, k))[0] for k in range(b.per_epoch)]

    def spread(micro: list[list[int]]) -> float:
        tokens = [sum(lengths[i] for i in m) for m in micro]
        return statistics.pstdev(tokens) / statistics.mean(tokens)

    for e in (0, 1):
        micro = epoch(a, e)
        assert [i for m in micro for i in m] == plain.order(e)
        assert all(micro) and spread(micro) < 0.15 < 0.3 < spread(epoch(plain, e))  # measured: 0.11-0.13, 0.32
        assert max(sum(lengths[i] for i in m) for m in micro) < sum(lengths) / 126 + max(lengths)
    pos, straight = DataPosition(), []
    for _ in range(300):
        idx, pos = a.take(pos)
        straight.append(idx)
    assert pos == DataPosition(2, 48)
    b = Batches(len(lengths), 8, seed=2, balance=lengths)  # a restart, nothing cached
    assert b.take(DataPosition(1, 17))[0] == straight[126 + 17]
    b.ungroup()
    assert b.order_kind == "random" and b.take(DataPosition(0, 3))[0] == plain.take(DataPosition(0, 3))[0]


def test_balanced_cuts_and_passes() -> None:
    assert cuts([5, 5, 5, 5], 2) == [0, 2, 4] and cuts([5, 5, 5, 5], 4) == [0, 1, 2, 3, 4]
    assert cuts([100, 1, 1, 1, 1, 1], 2) == [0, 1, 6]  # one long item fills a run alone
    assert cuts([1, 1, 1, 1, 1, 100], 3) == [0, 4, 5, 6]  # never an empty run, whatever the lengths
    with pytest.raises(ValueError):
        cuts([1, 2], 3)
    b = Batches(4, 4, seed=0, balance=[1, 2, 3, 4])
    assert b.passes(list(range(11)), 4) == [list(range(11))]  # a micro-batch of short examples: one pass
    assert b.passes(list(range(11)), 2) == [list(range(6)), list(range(6, 11))]  # backed off: half each
    assert even_parts([7], 3) == [[7]] and even_parts([], 3) == []  # an empty share (a rank's) makes no pass
    assert (b.pass_count(0, 4), b.pass_count(11, 4), b.pass_count(11, 2), b.pass_count(1, 2)) == (0, 1, 2, 1)
    assert Batches(4, 4, seed=0).passes(list(range(11)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]


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


def test_pack_rows_fill_first_fit_longest_first_with_restarting_positions() -> None:
    a = Example([5, 6, 7], [IGNORE, 6, 7])
    b = Example([8, 9], [8, 9])
    c = Example([4], [4])
    rows = pack_rows([b, a, c], pad_id=0)  # width 3 (the longest): a alone, then b and c together
    assert rows["input_ids"].tolist() == [[5, 6, 7], [8, 9, 4]]
    assert rows["position_ids"].tolist() == [[0, 1, 2], [0, 1, 0]]
    # c's first (only) label would be predicted from b's last token: not trained, as in a padded batch
    assert rows["labels"].tolist() == [[IGNORE, 6, 7], [IGNORE, 9, IGNORE]]
    assert "attention_mask" not in rows
    assert real_tokens(rows) == 6 == real_tokens(collate([a, b, c], pad_id=0))
    # a row's unused tail is a filler segment of its own: positions from 0, no label, not counted
    tail = pack_rows([a, b], pad_id=0)
    assert tail["position_ids"].tolist() == [[0, 1, 2], [0, 1, 0]]
    assert tail["labels"].tolist() == [[IGNORE, 6, 7], [IGNORE, 9, IGNORE]]
    assert real_tokens(tail) == 5


def test_place_is_first_fit_decreasing_and_stable() -> None:
    assert place([2, 5, 3, 1, 5], 5) == [[1], [4], [2, 0], [3]]
    assert place([1, 1, 1], 3) == [[0, 1, 2]]
