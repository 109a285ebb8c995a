"""The memory sets' sampling rules, as pure functions of counts, sizes and seeds (no files, no DB).

A job's memory is two sets kept in the home after its worker starts (``management/memory.py``): its
validation examples (the held-out split, or its ``eval_file``), which the gate scores every later version
on, and a sample of its training examples, which later jobs replay. Both are stored in a seeded order
(``sample_order``), so any prefix of a stored set is a uniform random sample of it: capping and
down-sampling only ever keep a prefix, and the same inputs always give the same set.

The rules:
- per job: the first ``max_examples`` of the seeded order, and no more than ``max_bytes`` of them
  (``prefix_within``);
- in all: when the sets would exceed the total cap, every *older* set is cut to the same share of its
  size (``fit_total``: evenly, so no job's memory is sacrificed for another's) and each keeps at least one
  example (never dropped); the newest set is kept whole;
- replay: ``replay_share`` of the mixed training data comes from earlier jobs' samples, allocated to each
  in proportion to its size (``replay_counts``: largest remainders, so the counts add up exactly).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

SALT_EVAL = 0x4D454D31  # seeds the eval set's order apart from the split itself ("MEM1")
SALT_TRAIN = 0x4D454D32
SALT_REPLAY = 0x4D454D33


def sample_order(n: int, seed: int, salt: int) -> list[int]:
    """A seeded permutation of ``range(n)``: the order a memory set is stored in."""
    order = list(range(n))
    random.Random(seed ^ salt).shuffle(order)
    return order


def prefix_within(sizes: Sequence[int], max_examples: int, max_bytes: int) -> int:
    """How many leading items (of ``sizes`` bytes each) fit ``max_examples`` and ``max_bytes``; at least
    one when there is any, so a job with one huge example still has a memory."""
    total, k = 0, 0
    for size in sizes[:max_examples]:
        if k and total + size > max_bytes:
            break
        total += size
        k += 1
    return k


def fit_total(older: Sequence[tuple[int, int]], newest_bytes: int, total_bytes: int) -> list[int]:
    """Examples each older set keeps (``older``: (examples, bytes) per set) so that all sets fit
    ``total_bytes`` next to the newest one: one common share for every older set, at least one example
    each. Unchanged counts when everything fits already."""
    older_bytes = sum(b for _n, b in older)
    if older_bytes + newest_bytes <= total_bytes or not older:
        return [n for n, _b in older]
    share = max(0.0, (total_bytes - newest_bytes) / older_bytes)
    return [min(n, max(1, math.floor(n * share))) for n, _b in older]


def replay_total(n_train: int, share: float, available: int) -> int:
    """Replayed examples so that they are ``share`` of the mixed data: n / (n_train + n) = share."""
    if share <= 0 or n_train <= 0 or available <= 0:
        return 0
    return min(available, round(n_train * share / (1 - share)))


def replay_counts(total: int, available: Sequence[int]) -> list[int]:
    """``total`` replayed examples spread over sets of ``available`` examples, in proportion to their sizes
    (largest remainders; earlier sets win ties), never more than a set holds."""
    pool = sum(available)
    if total <= 0 or pool <= 0:
        return [0 for _ in available]
    total = min(total, pool)
    exact = [total * a / pool for a in available]
    counts = [min(a, math.floor(e)) for a, e in zip(available, exact, strict=True)]
    order = sorted(range(len(available)), key=lambda i: (-(exact[i] - counts[i]), i))
    left = total - sum(counts)
    while left > 0:
        for i in order:
            if left and counts[i] < available[i]:
                counts[i] += 1
                left -= 1
    return counts
