"""The forgetting gate's decision, pure: a new version against the current one on every job's memory set.

Each earlier job of the new version's lineage left its validation examples as a memory set
(``management/memory.py``); the gate child scores the new and the current version on each
(``core/evaluate.py``). ``judge_forgetting`` promotes only when:
- the new job's own set improves (the new version learned its file: new loss < current loss), and
- no earlier job's set regresses beyond ``tolerance`` (relative: new <= current x (1 + tolerance)).
The verdict names the worst regressed earlier job and by how much, pass or fail, so a person sees how close
a promotion came. A set the current version could not be scored on cannot be judged and is said so; a
new version with no finite loss on a set is a regression.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class SetScore:
    """Losses of the new and the current version on one job's memory set."""

    job_id: int
    name: str
    new: float | None
    current: float | None

    @property
    def change(self) -> float | None:
        """Relative change of the loss (+0.25: 25 % worse); inf when the new one is not finite."""
        if self.current is None or not math.isfinite(self.current) or self.current <= 0:
            return None
        if self.new is None or not math.isfinite(self.new):
            return math.inf
        return self.new / self.current - 1

    def describe(self) -> str:
        change = self.change
        pct = "not finite" if change == math.inf else f"{change:+.0%}" if change is not None else "n/a"
        return f"job {self.job_id} ({self.name}): {_fmt(self.current)} -> {_fmt(self.new)} ({pct})"


@dataclass(frozen=True)
class ForgettingVerdict:
    promoted: bool
    reason: str
    worst_job: int | None = None
    worst_change: float | None = None


def _fmt(x: float | None) -> str:
    return "none" if x is None else f"{x:.4f}"


def judge_forgetting(own: SetScore | None, earlier: list[SetScore], tolerance: float) -> ForgettingVerdict:
    """Pure: promote only if ``own`` improves and no set of ``earlier`` regresses beyond ``tolerance``."""
    parts = []
    if own is not None:
        if own.new is None or not math.isfinite(own.new):
            return ForgettingVerdict(False, f"no finite loss on its own job's memory set: {own.describe()}")
        if own.current is not None and math.isfinite(own.current) and not own.new < own.current:
            return ForgettingVerdict(False, f"its own job's memory set did not improve: {own.describe()}")
        parts.append(f"own set {_fmt(own.current)} -> {_fmt(own.new)}")
    judged = [s for s in earlier if s.change is not None]
    unjudged = [s.job_id for s in earlier if s.change is None]
    if not judged:
        parts.append("no earlier job's set to check" if not unjudged else f"earlier sets not scored: {unjudged}")
        return ForgettingVerdict(True, "; ".join(parts))
    worst = max(judged, key=lambda s: s.change or 0.0)
    change = worst.change
    assert change is not None
    if change > tolerance:
        return ForgettingVerdict(
            False,
            f"forgets an earlier job beyond models.forgetting_tolerance {tolerance:.0%}: {worst.describe()}",
            worst.job_id,
            change,
        )
    parts.append(f"{len(judged)} earlier job sets within {tolerance:.0%} (worst {worst.describe()})")
    if unjudged:
        parts.append(f"not scored: jobs {unjudged}")
    return ForgettingVerdict(True, "; ".join(parts), worst.job_id, change)
