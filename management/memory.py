"""Every job's memory (issue 17): its validation examples and a sample of its training examples, kept in the
home content-addressed, and the scores of versions on them.

Continual training forgets: a version trained on file B may lose what file A taught. To see it, the eval gate
scores each new version on the validation examples of every earlier job of its lineage; to prevent it, a job
replays a share of earlier jobs' training examples. Both need those examples after the earlier job's file has
moved on, so the worker keeps them at its start (``keep_job_sets``, rank 0), where the held-out split is
known exactly (the same ``split_heldout`` call on the same records and seed):
- ``memory/<sha256>.jsonl``: one JSON record per line, in the seeded order of ``memory_sampling``; written
  to a temp name, fsynced and renamed (``atomic_write_bytes``); the same content is the same file;
- a ``memory_sets`` row per job and kind (``eval``, ``train``): sha, examples, bytes, seed.
The caps and the down-sampling of older sets over the total cap are ``memory_sampling``'s rules. A file is
deleted only when a down-sample replaced it and no row names it; retention (``management/retention.py``)
never touches ``memory/``, so every set a version's score or a later job's replay needs stays.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select

from management.db import MemoryScore, MemorySet, ModelDB, ModelVersion
from management.memory_files import read_lines as read_lines
from management.memory_files import read_set as read_set
from management.memory_files import record_json as record_json
from management.memory_files import record_line as record_line
from management.memory_files import set_path as set_path
from management.memory_files import write_set as write_set
from management.memory_sampling import SALT_EVAL, SALT_TRAIN, fit_total, prefix_within, sample_order
from trainbox.atomic import fsync_dir
from trainbox.jobspec import MemorySpec, ReplaySource
from trainbox.records import Record

log = logging.getLogger("trainbox.memory")

EVAL, TRAIN = "eval", "train"


@dataclass(frozen=True)
class Caps:
    eval_examples: int
    train_examples: int
    job_bytes: int
    total_bytes: int

    @classmethod
    def of(cls, spec: MemorySpec) -> Caps:
        return cls(spec.eval_examples, spec.train_examples, spec.job_bytes, spec.total_bytes)


def sampled_lines(records: Sequence[Record], seed: int, salt: int, max_examples: int, max_bytes: int) -> list[bytes]:
    """A job's set: its records in the seeded order, the prefix within the per-job caps."""
    lines = [record_line(records[i]) for i in sample_order(len(records), seed, salt)[:max_examples]]
    return lines[: prefix_within([len(x) for x in lines], max_examples, max_bytes)]


def keep_job_sets(
    db: ModelDB,
    memory_dir: Path,
    job_id: int,
    seed: int,
    val_records: Sequence[Record],
    train_records: Sequence[Record],
    caps: Caps,
) -> None:
    """Keep a job's memory sets once (a resumed worker finds them kept), then fit the total cap by cutting
    the older sets evenly (``memory_sampling.fit_total``)."""
    with db.session() as s:
        if s.scalars(select(MemorySet.id).where(MemorySet.job_id == job_id)).first() is not None:
            return
    new: list[MemorySet] = []
    for kind, records, salt, cap in (
        (EVAL, val_records, SALT_EVAL, caps.eval_examples),
        (TRAIN, train_records, SALT_TRAIN, caps.train_examples),
    ):
        lines = sampled_lines(records, seed, salt, cap, caps.job_bytes)
        if not lines:
            continue
        sha, size = write_set(memory_dir, lines)
        new.append(MemorySet(job_id=job_id, kind=kind, sha256=sha, n_examples=len(lines), size_bytes=size, seed=seed))
    _fit_total(db, memory_dir, sum(m.size_bytes for m in new), caps.total_bytes)
    with db.session() as s:
        s.add_all(new)
    log.info("job %d: memory kept (%s)", job_id, ", ".join(f"{m.kind} {m.n_examples}" for m in new) or "nothing")


def _fit_total(db: ModelDB, memory_dir: Path, new_bytes: int, total_bytes: int) -> None:
    """Down-sample every older set to the same share so that all fit ``total_bytes`` with the new ones: the
    cut set is written first, then its row points at it, then the old file goes if no row names it."""
    with db.session() as s:
        older = list(s.scalars(select(MemorySet).order_by(MemorySet.id)))
    keep = fit_total([(m.n_examples, m.size_bytes) for m in older], new_bytes, total_bytes)
    for row, k in zip(older, keep, strict=True):
        if k >= row.n_examples:
            continue
        sha, size = write_set(memory_dir, read_lines(memory_dir, row.sha256, k))
        old = row.sha256
        with db.session() as s:
            live = s.get(MemorySet, row.id)
            assert live is not None
            live.sha256, live.n_examples, live.size_bytes = sha, k, size
        _drop_unnamed(db, memory_dir, old)
        log.info("job %d: %s memory down-sampled to %d examples (memory_total_mb)", row.job_id, row.kind, k)


def _drop_unnamed(db: ModelDB, memory_dir: Path, sha256: str) -> None:
    with db.session() as s:
        if s.scalars(select(MemorySet.id).where(MemorySet.sha256 == sha256)).first() is not None:
            return
    with contextlib.suppress(FileNotFoundError):
        set_path(memory_dir, sha256).unlink()
        fsync_dir(Path(memory_dir))


# --- a version's ancestry and the sets of its jobs ----------------------------------------------------------


def ancestry(db: ModelDB, version_id: int | None) -> list[ModelVersion]:
    """The versions a version descends from, oldest first, itself last: what it was trained on, in order."""
    chain: list[ModelVersion] = []
    seen: set[int] = set()
    while version_id is not None and version_id not in seen:
        seen.add(version_id)
        v = db.version(version_id)
        if v is None:
            break
        chain.append(v)
        version_id = v.parent_id
    return chain[::-1]


def ancestry_jobs(db: ModelDB, version_id: int | None) -> list[int]:
    """The jobs whose files a version was trained on, oldest first."""
    return [v.job_id for v in ancestry(db, version_id) if v.job_id is not None]


def job_sets(db: ModelDB, job_ids: Sequence[int], kind: str) -> dict[int, MemorySet]:
    with db.session() as s:
        rows = s.scalars(select(MemorySet).where(MemorySet.job_id.in_(list(job_ids)), MemorySet.kind == kind))
        return {m.job_id: m for m in rows}


def replay_sources(db: ModelDB, version_id: int | None) -> list[ReplaySource]:
    """The training samples of the jobs a version was trained on: what a job starting from it may replay."""
    jobs = ancestry_jobs(db, version_id)
    sets = job_sets(db, jobs, TRAIN)
    return [ReplaySource(job_id=j, sha256=sets[j].sha256, n_examples=sets[j].n_examples) for j in jobs if j in sets]


# --- scores ---------------------------------------------------------------------------------------------


def stored_scores(db: ModelDB, version_ids: Sequence[int] | None = None) -> list[MemoryScore]:
    with db.session() as s:
        q = select(MemoryScore).order_by(MemoryScore.id)
        if version_ids is not None:
            q = q.where(MemoryScore.version_id.in_(list(version_ids)))
        return list(s.scalars(q))


def stored_loss(db: ModelDB, version_id: int, sha256: str, n: int) -> MemoryScore | None:
    """A version's stored score on the first ``n`` examples of set ``sha256`` (a gate reuses it)."""
    with db.session() as s:
        q = select(MemoryScore).where(
            MemoryScore.version_id == version_id, MemoryScore.set_sha256 == sha256, MemoryScore.n_examples == n
        )
        return s.scalars(q.order_by(MemoryScore.id.desc())).first()


def add_scores(db: ModelDB, rows: Sequence[MemoryScore]) -> None:
    with db.session() as s:
        s.add_all(list(rows))
