"""The forgetting gate's decision, pure: a new version against the current one on every job's memory set.

Each earlier job of the new version's lineage left its validation examples as a memory set
(``management/memory.py``); the gate child scores the new and the current version on each
(``core/evaluate.py``). ``judge_forgetting`` promotes only when:
- the new job's own set improves (the new version learned its file: new loss < current loss), and
- no earlier job's set loses more than ``tolerance`` of what that job taught.
"What a job taught" is the drop of its set's loss from the model it started from (its step-0 validation
loss, ``baseline``) to the current version; the share lost is (new - current) / (baseline - current).
Why not the plain relative change of the loss: a file the model has learned well sits near zero loss, where
any later training multiplies the loss (measured on the README's examples: French chat 0.117 -> 0.271
after the arithmetic file, +133 %, yet 2 % of the 6.87 -> 0.117 it had learned), while a harmful file
undoes most or more of it (the e2e test's opposite mapping: several times what was learned). Without a
baseline above the current loss, the relative change stands in. The verdict names the worst regressed
earlier job and by how much, pass or fail, so a person sees how close a promotion came. A set the current
version could not be scored on cannot be judged and is said so; a new version with no finite loss on a set
is a regression.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class SetScore:
    """Losses of the new and the current version on one job's memory set, and of the model that job
    started from (``baseline``: its step-0 validation loss; None when unknown)."""

    job_id: int
    name: str
    new: float | None
    current: float | None
    baseline: float | None = None

    @property
    def learned(self) -> float | None:
        """What the job taught, as a loss drop to the current version (None: unknown or nothing)."""
        b, c = self.baseline, self.current
        if b is None or c is None or not (math.isfinite(b) and math.isfinite(c)) or b <= c:
            return None
        return b - c

    @property
    def change(self) -> float | None:
        """The share of what the job taught that the new version loses (0.25: a quarter; negative: it
        gained); without a baseline, the relative change of the loss. inf when the new one is not finite."""
        if self.current is None or not math.isfinite(self.current) or self.current <= 0:
            return None
        if self.new is None or not math.isfinite(self.new):
            return math.inf
        learned = self.learned
        return (self.new - self.current) / learned if learned is not None else self.new / self.current - 1

    def describe(self) -> str:
        change = self.change
        if change == math.inf:
            what = "not finite"
        elif change is None:
            what = "n/a"
        elif self.learned is not None:
            what = f"{change:+.0%} of the {self.baseline:.4f} -> {self.current:.4f} it had learned"
        else:
            what = f"{change:+.0%} of its loss"
        return f"job {self.job_id} ({self.name}): {_fmt(self.current)} -> {_fmt(self.new)} ({what})"


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
