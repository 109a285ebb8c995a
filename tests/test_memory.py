"""Issue 17's pure parts and the memory store: the sampling rules, the forgetting verdict, keeping a job's
sets content-addressed with their caps, the total cap's even down-sampling, lineage and replay sources."""

from __future__ import annotations

import math
from pathlib import Path

from management.db import Job, ModelDB, ModelVersion
from management.forgetting import SetScore, judge_forgetting
from management.memory import (
    EVAL,
    TRAIN,
    Caps,
    ancestry_jobs,
    job_sets,
    keep_job_sets,
    read_set,
    replay_sources,
    set_path,
)
from management.memory_sampling import fit_total, prefix_within, replay_counts, replay_total, sample_order
from trainbox.records import Record


def test_sample_order_is_a_seeded_permutation() -> None:
    a = sample_order(50, 7, 1)
    assert sorted(a) == list(range(50)) and a == sample_order(50, 7, 1)
    assert a != sample_order(50, 8, 1) and a != sample_order(50, 7, 2)


def test_prefix_within_caps_examples_and_bytes_but_keeps_one() -> None:
    assert prefix_within([10] * 10, 4, 1000) == 4
    assert prefix_within([10] * 10, 100, 35) == 3
    assert prefix_within([500, 1], 10, 100) == 1  # one huge example is still a memory
    assert prefix_within([], 10, 100) == 0


def test_fit_total_cuts_older_sets_evenly_never_to_nothing() -> None:
    assert fit_total([(100, 1000), (50, 500)], 500, 10_000) == [100, 50]  # fits: unchanged
    assert fit_total([(100, 1000), (50, 500)], 500, 1250) == [50, 25]  # half of each
    assert fit_total([(100, 1000), (3, 30)], 5000, 100) == [1, 1]  # never dropped
    assert fit_total([], 10, 1) == []


def test_replay_counts_proportional_and_exact() -> None:
    assert replay_total(80, 0.2, 1000) == 20  # 20 / (80 + 20) = 0.2
    assert replay_total(80, 0.2, 5) == 5 and replay_total(80, 0.0, 100) == 0
    assert replay_counts(20, [100, 100]) == [10, 10]
    assert replay_counts(10, [30, 10]) == [8, 2]  # 7.5 and 2.5: the earlier set wins the tie
    assert replay_counts(7, [3, 2, 2]) == [3, 2, 2]
    assert replay_counts(100, [3, 2]) == [3, 2] and replay_counts(5, [0, 0]) == [0, 0]
    assert sum(replay_counts(37, [11, 50, 3, 90])) == 37


def test_forgetting_verdict() -> None:
    own = SetScore(5, "b.jsonl", 1.0, 3.0)
    ok = judge_forgetting(own, [SetScore(1, "a.jsonl", 2.2, 2.0), SetScore(2, "c.jsonl", 1.0, 1.0)], 0.25)
    assert ok.promoted and ok.worst_job == 1 and ok.worst_change is not None and abs(ok.worst_change - 0.1) < 1e-9
    assert "job 1 (a.jsonl)" in ok.reason
    bad = judge_forgetting(own, [SetScore(1, "a.jsonl", 6.0, 2.0), SetScore(2, "c.jsonl", 1.2, 1.0)], 0.25)
    assert (
        not bad.promoted
        and bad.worst_job == 1
        and "job 1 (a.jsonl): 2.0000 -> 6.0000 (+200% of its loss)" in bad.reason
    )
    assert "forgetting_tolerance 25%" in bad.reason
    no_gain = judge_forgetting(SetScore(5, "b.jsonl", 3.1, 3.0), [], 0.25)
    assert not no_gain.promoted and "did not improve" in no_gain.reason
    nan = judge_forgetting(own, [SetScore(1, "a.jsonl", math.nan, 2.0)], 0.25)
    assert not nan.promoted and "not finite" in nan.reason
    # with the loss the job started from, the share of what it taught that is lost: 0.12 -> 0.27 of a
    # 6.87 -> 0.12 drop is 2 %, though the loss more than doubled
    learned = judge_forgetting(own, [SetScore(3, "fr.jsonl", 0.27, 0.12, baseline=6.87)], 0.25)
    assert learned.promoted and learned.worst_change is not None and abs(learned.worst_change - 0.15 / 6.75) < 1e-9
    assert "of the 6.8700 -> 0.1200 it had learned" in learned.reason
    lost = judge_forgetting(own, [SetScore(3, "fr.jsonl", 3.0, 0.12, baseline=6.87)], 0.25)
    assert not lost.promoted and lost.worst_job == 3 and "+43% of the 6.8700" in lost.reason
    assert SetScore(3, "x", 1.3, 1.0, baseline=0.9).change == SetScore(3, "x", 1.3, 1.0).change  # taught nothing
    unscored = judge_forgetting(own, [SetScore(1, "a.jsonl", 2.0, None)], 0.25)
    assert unscored.promoted and "not scored" in unscored.reason
    assert judge_forgetting(None, [], 0.25).promoted


def _records(tag: str, n: int) -> list[Record]:
    return [Record(kind="text", text=f"{tag} example number {i} " + "x" * 20) for i in range(n)]


def _job(db: ModelDB, job_id: int) -> None:
    with db.session() as s:
        s.add(Job(id=job_id, name=f"job{job_id}.jsonl"))


def test_keep_job_sets_content_addressed_capped_once_and_down_sampled(tmp_path: Path) -> None:
    db = ModelDB(f"sqlite:///{tmp_path / 'db.sqlite'}")
    memory = tmp_path / "memory"
    line = len(b'{"text": "a example number 10 xxxxxxxxxxxxxxxxxxxx"}\n')
    caps = Caps(eval_examples=8, train_examples=20, job_bytes=10**6, total_bytes=60 * line)
    for j in (1, 2, 3):
        _job(db, j)
    keep_job_sets(db, memory, 1, 11, _records("a", 10), _records("A", 40), caps)
    sets = job_sets(db, [1], EVAL) | {}
    ev, tr = sets[1], job_sets(db, [1], TRAIN)[1]
    assert (ev.n_examples, tr.n_examples) == (8, 20)
    kept = read_set(memory, ev.sha256)
    assert set_path(memory, ev.sha256).is_file() and len(kept) == 8
    assert {r.text for r in kept} <= {r.text for r in _records("a", 10)}
    keep_job_sets(db, memory, 1, 11, _records("z", 10), _records("Z", 40), caps)  # a resume: kept once
    assert job_sets(db, [1], EVAL)[1].sha256 == ev.sha256
    keep_job_sets(db, memory, 2, 11, _records("b", 10), _records("B", 40), caps)  # 56 lines: fits
    keep_job_sets(db, memory, 3, 11, _records("c", 10), _records("C", 40), caps)  # over: older cut evenly
    after = {(m.job_id, m.kind): m.n_examples for m in [*job_sets(db, [1, 2, 3], EVAL).values()]}
    after |= {(m.job_id, m.kind): m.n_examples for m in job_sets(db, [1, 2, 3], TRAIN).values()}
    assert after[(3, EVAL)] == 8 and after[(3, TRAIN)] == 20  # the newest kept whole
    assert after[(1, EVAL)] == after[(2, EVAL)] < 8 and after[(1, TRAIN)] == after[(2, TRAIN)] < 20
    assert all(n >= 1 for n in after.values())
    cut = job_sets(db, [1], EVAL)[1]
    assert [r.text for r in read_set(memory, cut.sha256)] == [r.text for r in kept[: cut.n_examples]]  # a prefix
    assert not set_path(memory, ev.sha256).exists()  # the replaced file is gone, nothing else names it
    assert sum(p.stat().st_size for p in memory.glob("*.jsonl")) <= 60 * line
    db.close()


def test_lineage_and_replay_sources(tmp_path: Path) -> None:
    db = ModelDB(f"sqlite:///{tmp_path / 'db.sqlite'}")
    caps = Caps(8, 8, 10**6, 10**9)
    for j in (1, 2, 3):
        _job(db, j)
        keep_job_sets(db, tmp_path / "m", j, 5, _records(f"j{j}", 10), _records(f"t{j}", 10), caps)
    with db.session() as s:  # v1 <- v2, and v3 a branch off v1 (job 2's file not in its lineage)
        s.add_all([ModelVersion(id=1, path="a", job_id=1), ModelVersion(id=2, path="b", parent_id=1, job_id=2)])
        s.add(ModelVersion(id=3, path="c", parent_id=1, job_id=3))
    assert ancestry_jobs(db, 2) == [1, 2] and ancestry_jobs(db, 3) == [1, 3] and ancestry_jobs(db, None) == []
    assert [s.job_id for s in replay_sources(db, 2)] == [1, 2]
    assert replay_sources(db, 2)[0].sha256 == job_sets(db, [1], TRAIN)[1].sha256
    db.close()
