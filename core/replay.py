"""The worker's side of a job's memory (issue 17): replay earlier jobs' training examples, keep its own.

Replay: ``training.replay_share`` of the job's training data comes from the kept training samples of the
jobs its starting version was trained on (``JobSpec.memory.replay``, fixed by the daemon at the first
start), each in proportion to its size (``memory_sampling.replay_counts``), the examples of each chosen by
the job's seed. What was chosen is recorded in the run before training starts: ``runs/job-N/replay.jsonl``
(the examples) and ``replay.json`` (seed, share, source shas and counts; written last, so it marks a
complete record). A resumed run reads them back instead of sampling again, so it trains exactly the same
examples even if a later down-sample (``memory_total_mb``) changed the sources; a rebased job, whose spec
names other sources, samples afresh.

Keeping: after the data is read, rank 0 keeps the job's validation examples and a sample of its training
examples as memory sets (``management.memory.keep_job_sets``; once per job). Best effort like every
report: a DB or disk error is logged, never fails the job (the gate then has no set of this job to check).
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any

from core.errors import short_error
from management.memory_sampling import SALT_REPLAY, replay_counts, replay_total
from trainbox.atomic import atomic_write_bytes, atomic_write_json, read_json
from trainbox.jobspec import JobSpec
from trainbox.records import Record, parse_record

log = logging.getLogger("core.worker")

REPLAY_DATA = "replay.jsonl"
REPLAY_META = "replay.json"


def replay_records(spec: JobSpec, n_train: int, is_main: bool) -> list[Record]:
    """The earlier jobs' examples this job mixes into its own training data ([] when replay is off)."""
    memory, cfg = spec.memory, spec.training
    if memory is None or not memory.replay or cfg.replay_share <= 0:
        return []
    run_dir = Path(spec.run_dir)
    sources = [s.model_dump() for s in memory.replay]
    meta = read_json(run_dir / REPLAY_META)
    if isinstance(meta, dict) and meta.get("sources") == sources and (run_dir / REPLAY_DATA).is_file():
        lines = (run_dir / REPLAY_DATA).read_bytes().splitlines()
        log.info("replay: %d examples of earlier jobs, as recorded in %s", len(lines), REPLAY_DATA)
        return [parse_record(json.loads(line)) for line in lines]
    lines, taken = sample_replay(spec, n_train)
    if is_main:
        atomic_write_bytes(run_dir / REPLAY_DATA, b"".join(lines))
        record: dict[str, Any] = {
            "seed": cfg.seed,
            "share": cfg.replay_share,
            "n_train": n_train,
            "sources": sources,
            "taken": taken,
            "examples": len(lines),
        }
        atomic_write_json(run_dir / REPLAY_META, record)
    log.info(
        "replay: %d examples of earlier jobs (share %.2f; %s)",
        len(lines),
        cfg.replay_share,
        ", ".join(f"job {j}: {n}" for j, n in taken.items()),
    )
    return [parse_record(json.loads(line)) for line in lines]


def sample_replay(spec: JobSpec, n_train: int) -> tuple[list[bytes], dict[int, int]]:
    """(the chosen lines, examples taken per source job): a pure function of the spec, its sources' files
    and ``n_train``."""
    from management.memory import read_lines

    assert spec.memory is not None
    sources = spec.memory.replay
    available = [s.n_examples for s in sources]
    counts = replay_counts(replay_total(n_train, spec.training.replay_share, sum(available)), available)
    lines: list[bytes] = []
    taken: dict[int, int] = {}
    for source, k in zip(sources, counts, strict=True):
        if k <= 0:
            continue
        try:
            stored = read_lines(Path(spec.memory.dir), source.sha256, source.n_examples)
        except OSError as e:  # a source cut since the spec was made: replay the others
            log.warning("replay: job %d's training sample is gone (%s); not replayed", source.job_id, e)
            continue
        k = min(k, len(stored))
        chosen = sorted(random.Random(spec.training.seed ^ SALT_REPLAY ^ source.job_id).sample(range(len(stored)), k))
        lines += [stored[i] if stored[i].endswith(b"\n") else stored[i] + b"\n" for i in chosen]
        taken[source.job_id] = k
    return lines, taken


def keep_memory(spec: JobSpec, val_records: list[Record], train_records: list[Record]) -> None:
    """Keep this job's memory sets (rank 0, once per job; never fails the job)."""
    if spec.memory is None:
        return
    from management.db import ModelDB
    from management.memory import Caps, keep_job_sets

    try:
        db = ModelDB(spec.db_url)
        try:
            keep_job_sets(
                db,
                Path(spec.memory.dir),
                spec.job_id,
                spec.training.seed,
                val_records,
                train_records,
                Caps.of(spec.memory),
            )
        finally:
            db.close()
    except Exception as e:  # boundary: a memory that cannot be kept costs the gate a set, not the job
        log.warning("could not keep the job's memory sets: %s", short_error(e))
