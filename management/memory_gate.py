"""The forgetting part of the eval gate (issue 17): which memory sets a new version is scored on, the
evaluation child's arguments for them, and its results turned into a verdict and score rows.

A new version is scored on the memory set of its own job and of every earlier job of its lineage (the jobs
whose files it was trained on, ``memory.ancestry_jobs``), in the gate's child (``core/evaluate.py``: torch
never enters the daemon, whose tick only starts and reaps it). The current version's stored scores on the
same examples are passed along and reused, so it is scored only on what no gate scored it on before.
``judge_forgetting`` (pure) decides; every loss the child measured becomes a ``memory_scores`` row.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from management.db import MemoryScore, ModelDB, ModelVersion
from management.forgetting import ForgettingVerdict, SetScore, judge_forgetting
from management.memory import EVAL, ancestry_jobs, job_sets, stored_scores
from trainbox.home import Home
from trainbox.jobspec import WorkerResult


@dataclass(frozen=True)
class MemoryTask:
    """One job's memory set to score the new version (and the current one) on."""

    job_id: int
    name: str
    sha256: str
    n_examples: int
    own: bool  # the new version's own job
    baseline: float | None = None  # the job's step-0 validation loss: the model it started from, on this set


def baseline(home: Home, job_id: int) -> float | None:
    """A job's step-0 validation loss (its ``result.json``): the loss of the model it started from on its
    validation examples, which are its memory set."""
    with contextlib.suppress(OSError, ValueError):
        result = WorkerResult.load(home.run_dir(job_id))
        return result.first_val_loss if result is not None else None
    return None


def memory_tasks(home: Home, db: ModelDB, new: ModelVersion) -> list[MemoryTask]:
    """The new job's set first, then the earlier jobs' of its lineage, newest first (scored first when the
    time budget runs short)."""
    jobs = ancestry_jobs(db, new.id)
    sets = job_sets(db, jobs, EVAL)
    names = {j: (job.name if (job := db.job(j)) is not None else "") for j in sets}
    ordered = [j for j in [new.job_id, *reversed(jobs)] if j is not None]
    out, seen = [], set()
    for j in ordered:
        if j in sets and j not in seen:
            seen.add(j)
            row = sets[j]
            out.append(MemoryTask(j, names[j], row.sha256, row.n_examples, j == new.job_id, baseline(home, j)))
    return out


def memory_argv(
    db: ModelDB, tasks: list[MemoryTask], memory_dir: Path, current_id: int | None, seconds: float
) -> list[str]:
    """The child's memory arguments: the sets, the budget, and the current version's stored scores."""
    argv = ["--memory-dir", str(memory_dir), "--memory-seconds", str(seconds)]
    for t in tasks:
        argv += ["--memory-set", f"{t.job_id}:{t.sha256}:{t.n_examples}"]
    if current_id is not None:
        shas = {t.sha256 for t in tasks}
        for s in stored_scores(db, [current_id]):
            if s.set_sha256 in shas and s.loss is not None:
                argv += ["--known", f"{s.set_sha256}:{s.n_examples}:{s.loss!r}"]
    return argv


def judge_memory(
    tasks: list[MemoryTask], rows: list[dict[str, Any]], tolerance: float, new_id: int, current_id: int | None
) -> tuple[ForgettingVerdict, list[MemoryScore]]:
    """The verdict from the child's ``memory`` rows, and the scores to store (the current version's only
    where the child measured them, not where it reused a stored one)."""
    by_job = {t.job_id: t for t in tasks}
    own: SetScore | None = None
    earlier: list[SetScore] = []
    scores: list[MemoryScore] = []
    for row in rows:
        task = by_job.get(int(row["job_id"]))
        if task is None:
            continue
        new, cur = row.get("new"), row.get("current")
        score = SetScore(task.job_id, task.name, new, cur, task.baseline)
        own, earlier = (score, earlier) if task.own else (own, [*earlier, score])
        common = {"job_id": task.job_id, "set_sha256": task.sha256, "n_examples": int(row["n"])}
        scores.append(MemoryScore(version_id=new_id, loss=new, **common))
        if current_id is not None and not row.get("current_stored") and "current" in row:
            scores.append(MemoryScore(version_id=current_id, loss=cur, **common))
    return judge_forgetting(own, earlier, tolerance), scores
