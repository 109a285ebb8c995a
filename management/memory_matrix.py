"""What users see of the memory (issue 17): per version, its loss on each job's memory set (the version x job
matrix) and the jobs whose files it was trained on, in order.

Read by ``trainbox models`` / ``models scores V`` and the status server's ``/api/models`` (dashboard), the same
rows for both. A cell is the newest stored score of that version on the job's set as it is now (the newest
down-sample); a score on an older cut of the set stands in when there is none on the current one, marked.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import select

from management.db import Job, ModelDB, ModelVersion
from management.memory import EVAL, job_sets, stored_scores


@dataclass
class MatrixRow:
    version: int
    trained_on: list[int]  # the jobs whose files it was trained on, oldest first
    losses: dict[str, float | None] = field(default_factory=dict)  # job id (a string: JSON keys) -> loss
    stale: list[int] = field(default_factory=list)  # jobs whose loss was scored on an older cut of the set


@dataclass
class Matrix:
    jobs: list[dict[str, Any]]  # {"job", "name", "examples"} per job with a memory set, oldest first
    rows: list[MatrixRow]

    def as_dict(self) -> dict[str, Any]:
        return {"jobs": self.jobs, "rows": [asdict(r) for r in self.rows]}


def _trained_on(version_id: int, by_id: dict[int, ModelVersion]) -> list[int]:
    """``memory.ancestry_jobs`` over versions already read (one query for the whole matrix)."""
    jobs: list[int] = []
    seen: set[int] = set()
    v = by_id.get(version_id)
    while v is not None and v.id not in seen:
        seen.add(v.id)
        if v.job_id is not None:
            jobs.append(v.job_id)
        v = by_id.get(v.parent_id) if v.parent_id is not None else None
    return jobs[::-1]


def memory_matrix(db: ModelDB, lineage: str | None = None) -> Matrix:
    """Every version's (or one lineage's versions') loss on each job's memory set."""
    versions = db.versions(lineage=lineage)
    by_id = {v.id: v for v in versions}
    all_jobs = sorted({v.job_id for v in versions if v.job_id is not None})
    sets = job_sets(db, all_jobs, EVAL)
    with db.session() as session:
        names = {j.id: j.name for j in session.scalars(select(Job).where(Job.id.in_(list(sets))))}
    jobs = [{"job": j, "name": names.get(j, ""), "examples": sets[j].n_examples} for j in sorted(sets)]
    newest: dict[tuple[int, int], tuple[float | None, bool]] = {}
    for s in stored_scores(db):  # oldest first: a later score replaces an earlier one
        current = s.job_id in sets and s.set_sha256 == sets[s.job_id].sha256
        if current or not newest.get((s.version_id, s.job_id), (None, False))[1]:
            newest[(s.version_id, s.job_id)] = (s.loss, current)
    rows = []
    for v in versions:
        row = MatrixRow(v.id, _trained_on(v.id, by_id))
        for j in sets:
            if (v.id, j) in newest:
                loss, current = newest[(v.id, j)]
                row.losses[str(j)] = loss
                if not current:
                    row.stale.append(j)
        rows.append(row)
    return Matrix(jobs, rows)


def format_matrix(matrix: Matrix, current: int | None) -> str:
    """Plain text: one line per version, one column per job's memory set, then the jobs it was trained on."""
    if not matrix.jobs:
        return "no memory sets yet (each job keeps its validation examples when its worker starts)"
    head = ["version".ljust(10)] + [f"job {j['job']}".rjust(10) for j in matrix.jobs] + ["  trained on (jobs)"]
    lines = ["loss on each job's memory set (version x job):", "".join(head)]
    for r in matrix.rows:
        cells = []
        for j in matrix.jobs:
            loss = r.losses.get(str(j["job"]))
            mark = "*" if j["job"] in r.stale else ""
            cells.append(("-" if loss is None else f"{loss:.4f}{mark}").rjust(10))
        name = f"v{r.version}" + (" (cur)" if r.version == current else "")
        lines.append(name.ljust(10) + "".join(cells) + "  " + " > ".join(str(j) for j in r.trained_on))
    lines.append("jobs: " + ", ".join(f"{j['job']} = {j['name']} ({j['examples']} examples)" for j in matrix.jobs))
    if any(r.stale for r in matrix.rows):
        lines.append("*: scored on an earlier, larger cut of that job's set (memory_total_mb)")
    return "\n".join(lines)


def format_row(matrix: Matrix, version: int) -> str:
    """One version's row: its loss on each job's set, and what it was trained on."""
    row = next((r for r in matrix.rows if r.version == version), None)
    if row is None:
        return f"no model version {version}"
    names = {j["job"]: j["name"] for j in matrix.jobs}
    lines = [f"version {version}: trained on jobs {', '.join(str(j) for j in row.trained_on) or '(none)'}"]
    for j in matrix.jobs:
        loss = row.losses.get(str(j["job"]))
        value = "not scored" if loss is None else f"{loss:.4f}" + (" (earlier cut)" if j["job"] in row.stale else "")
        trained = "trained on" if j["job"] in row.trained_on else "not trained on"
        lines.append(f"  job {j['job']} ({names[j['job']]}, {trained}): {value}")
    return "\n".join(lines)
