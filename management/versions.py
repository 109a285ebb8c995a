"""Model versions: which one is current, the eval gate that promotes a new one, promote and rollback.

``models/current`` is a relative symlink to ``vNNNN``; it is changed by creating a new link under a
temp name and ``os.replace``-ing it over the old one (atomic: a crash leaves the old or the new
link, never none), then fsyncing ``models/``. It is only ever pointed at a complete model folder
(``config.json`` and weights, or a LoRA adapter: ``adapter_config.json`` and its weights). The next
job starts from it (``starting_version``); from an adapter version, it starts from the base with the
adapter merged (``core.lora.load_causal_lm``), and a LoRA job's new adapter records that version as
its base.

The gate, when the daemon registers a version: ``plan_version_gate`` says how the version is judged,
the daemon runs the plan's evaluation child and applies ``apply_gate`` when it reaps it
(``daemon/gate.py``: the tick never waits on an evaluation, and neither the daemon nor this package
loads torch):
- with ``models.eval_file``: the new version and the current one are scored on that frozen set by a
  ``python -m core.evaluate`` child;
- without it: the new version's final validation loss against the loss of the model it started
  from on the same held-out set (the job's step-0 evaluation) when it started from the current
  version, else both scored on the job's held-out set by the subprocess.
Promoted when ``new <= current * (1 + models.regression_tolerance)``; otherwise the version is kept
but not promoted, and the ``version_gates`` row and a ``version_not_promoted`` event (with the job
id) say why. ``promote V`` applies the same check (``--force`` skips it); ``rollback`` returns to
the version that was current before the current one was promoted.

One chain per lineage (``trainbox/lineage.py``): ``main``'s pointer is ``models/current``, another
lineage's ``models/current@<lineage>``; a version belongs to its job's lineage, is judged against that
lineage's current version and its memory sets, and promote and rollback move that lineage's pointer only.
The gate never promotes a version whose parent is not the current version (another
branch: it was trained from an older version, a model the job named, or the embedded model while a
version was current); its verdict names both, and ``trainbox models promote V`` can still make it
current by hand. A job retried after another was promoted is retrained from current instead
(``JobRunner._rebase_if_stale``), so this only stops what a person chose to branch.
A promotion moves the pointer first, then records the gate row and the promotion row in one
transaction: a kill in between leaves the pointer on the new version and the gate runs again at the
next start, finding it current already.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from management.db import MemoryScore, ModelDB, ModelVersion, Promotion, VersionGate
from management.evaluation import EvaluationError, evaluate_argv, parse_losses, parse_memory, run_evaluate
from management.memory import ancestry
from management.memory_gate import MemoryTask, judge_memory, memory_argv, memory_tasks
from management.registration import version_number
from trainbox.atomic import fsync_dir
from trainbox.config import Settings
from trainbox.home import Home
from trainbox.lineage import MAIN, pointer_name

log = logging.getLogger("trainbox.versions")


class VersionError(RuntimeError):
    """A promote or rollback that cannot be done; the message says why."""


CURRENT = pointer_name(MAIN)  # main's pointer, as it always was


# --- the pointer -----------------------------------------------------------------------------------


def is_complete_model(path: Path) -> bool:
    """A full model (config.json and weights) or a LoRA adapter (adapter_config.json and its weights)."""
    p = Path(path)
    if (p / "adapter_config.json").is_file():
        return (p / "adapter_model.safetensors").is_file() or (p / "adapter_model.bin").is_file()
    has_weights = any(p.glob("*.safetensors")) or (p / "pytorch_model.bin").is_file()
    return (p / "config.json").is_file() and has_weights


def current_id(home: Home, lineage: str = MAIN) -> int | None:
    """The version the lineage's pointer (``models/current``, ``models/current@<lineage>``) names; None
    when there is no pointer. A pointer whose name is no version is logged (the daemon's start-up
    reconciliation repairs it: ``version_recovery``)."""
    name = pointer_name(lineage)
    try:
        target = os.readlink(home.models / name)
    except OSError:
        return None
    number = version_number(Path(target).name)
    if number is None:
        log.warning("models/%s names %r, which is no model version", name, target)
    return number


def point_current(home: Home, path: Path, lineage: str = MAIN) -> None:
    """Replace the lineage's pointer by a link to ``path`` atomically (a crash leaves the old or the new)."""
    name = pointer_name(lineage)
    link = home.models / name
    tmp = home.models / f".{name}.{os.getpid()}.{time.time_ns()}.tmp"
    target = os.path.relpath(path, home.models) if path.parent == home.models else str(path)
    os.symlink(target, tmp)
    os.replace(tmp, link)
    fsync_dir(home.models)


def set_current(home: Home, version: ModelVersion) -> None:
    """Make ``version`` current in its own lineage."""
    path = Path(version.path)
    if not is_complete_model(path):
        raise VersionError(f"version {version.id}: {path} is not a complete model (config.json and weights)")
    point_current(home, path, version.lineage)


def current_version(home: Home, db: ModelDB, lineage: str = MAIN) -> ModelVersion | None:
    vid = current_id(home, lineage)
    return db.version(vid) if vid is not None else None


def starting_version(home: Home, db: ModelDB, lineage: str = MAIN) -> ModelVersion | None:
    """What the lineage's next job starts from: its pointer; for a home from before the pointer existed,
    the lineage's newest version."""
    current = current_version(home, db, lineage)
    if current is not None and is_complete_model(Path(current.path)):
        return current
    if (home.models / pointer_name(lineage)).is_symlink():
        return None if current is None else current  # a pointer exists: never silently pick another
    return db.latest_version(lineage)


# --- the gate --------------------------------------------------------------------------------------


@dataclass
class GateVerdict:
    promoted: bool
    reason: str
    new_loss: float | None = None
    current_loss: float | None = None
    current_id: int | None = None
    eval_set: str = ""
    scores: list[MemoryScore] = field(default_factory=list)  # memory-set losses the gate measured (issue 17)


def decide_promotion(
    new_loss: float | None, current_loss: float | None, tolerance: float, current: int | None
) -> GateVerdict:
    """Pure: promote when there is nothing to beat or the new loss does not regress beyond tolerance."""
    if current is None:
        return GateVerdict(True, "no current version: the first becomes current", new_loss, current_loss, current)
    if new_loss is None or not math.isfinite(new_loss):
        return GateVerdict(False, f"new version has no finite eval loss ({new_loss})", new_loss, current_loss, current)
    if current_loss is None or not math.isfinite(current_loss):
        return GateVerdict(True, f"current version {current} could not be scored", new_loss, current_loss, current)
    bound = current_loss * (1 + tolerance)
    if new_loss <= bound:
        return GateVerdict(
            True,
            f"eval loss {new_loss:.4f} <= {bound:.4f} (current v{current} {current_loss:.4f}, tolerance {tolerance})",
            new_loss,
            current_loss,
            current,
        )
    return GateVerdict(
        False,
        f"regression: eval loss {new_loss:.4f} > {bound:.4f} (current v{current} {current_loss:.4f} "
        f"+{tolerance:.0%} tolerance)",
        new_loss,
        current_loss,
        current,
    )


def branch_verdict(new: int, parent: int | None, current: int | None) -> GateVerdict | None:
    """Pure: the chain rule. A version not trained from the current one is another branch: never
    promoted automatically (None: it continues the chain, or there is no current version)."""
    if current is None or current in (new, parent):
        return None
    origin = f"version {parent}" if parent is not None else "no version (a named or the embedded model)"
    return GateVerdict(
        False,
        f"another branch: version {new} was trained from {origin}, but version {current} is current; "
        f"not promoted automatically (trainbox models promote {new} makes it current by hand)",
        current_id=current,
        eval_set="none",
    )


def eval_file(home: Home, settings: Settings) -> Path | None:
    if not settings.models.eval_file:
        return None
    p = Path(settings.models.eval_file).expanduser()
    return p if p.is_absolute() else home.root / p


@dataclass
class GatePlan:
    """How a new version is judged: decided at once (``verdict``), or by scoring ``new`` and
    ``current`` with the evaluation child ``argv`` (then ``judge`` turns its losses into a verdict)."""

    version_id: int
    verdict: GateVerdict | None = None
    argv: list[str] = field(default_factory=list)
    new_path: str = ""
    current_path: str = ""
    current_id: int | None = None
    eval_set: str = ""
    frozen: bool = True  # scored on a frozen file or the job's held-out set (False: the memory sets alone)
    memory: list[MemoryTask] = field(default_factory=list)  # issue 17: the lineage's memory sets
    forgetting_tolerance: float = 0.25

    def judge(
        self,
        losses: dict[str, float | None] | None,
        error: str,
        tolerance: float,
        memory: list[dict[str, Any]] | None = None,
    ) -> GateVerdict:
        """The verdict from the child's losses (and its ``memory`` rows when memory sets were scored), or
        ``error`` (why it gave none). Promoted only when both the frozen set and the memory sets pass."""
        if self.verdict is not None:
            return self.verdict
        if losses is None or (self.memory and memory is None):
            return GateVerdict(False, f"not evaluated: {error}", current_id=self.current_id, eval_set=self.eval_set)
        v = GateVerdict(True, "", current_id=self.current_id, eval_set=self.eval_set)
        reasons = []
        if self.frozen:
            v = decide_promotion(losses.get(self.new_path), losses.get(self.current_path), tolerance, self.current_id)
            v.eval_set = self.eval_set
            reasons.append(v.reason)
        if self.memory and memory is not None:
            assert self.current_id is not None
            forgetting, v.scores = judge_memory(
                self.memory, memory, self.forgetting_tolerance, self.version_id, self.current_id
            )
            own = next((r for r in memory if self.memory and int(r["job_id"]) == self.memory[0].job_id), None)
            if not self.frozen and own is not None and self.memory[0].own:
                v.new_loss, v.current_loss = own.get("new"), own.get("current")
            v.promoted = v.promoted and forgetting.promoted
            reasons.append(f"memory sets: {forgetting.reason}")
        v.reason = "; ".join(r for r in reasons if r)
        return v


def plan_gate(
    home: Home,
    db: ModelDB,
    settings: Settings,
    new: ModelVersion,
    current: ModelVersion | None,
    *,
    run_dir: Path | None = None,
    init_version: int | None = None,
    own_val_loss: float | None = None,
    own_first_val_loss: float | None = None,
    max_length: int = 0,
    program: list[str] | None = None,
) -> GatePlan:
    """What judging ``new`` against ``current`` takes (no process is started here)."""
    tolerance = settings.models.regression_tolerance
    plan = GatePlan(new.id, new_path=new.path)
    if current is None:
        plan.verdict = decide_promotion(None, None, tolerance, None)
        plan.verdict.eval_set = "none"
        return plan
    if current.id == new.id:  # a kill came between its promotion and the record of it
        plan.verdict = GateVerdict(True, f"version {new.id} is current already", current_id=new.id, eval_set="none")
        return plan
    plan.current_path, plan.current_id = current.path, current.id
    plan.forgetting_tolerance = settings.models.forgetting_tolerance
    models = [Path(new.path), Path(current.path)]
    frozen = eval_file(home, settings)
    tasks = memory_tasks(home, db, new)
    if any(not t.own for t in tasks):  # earlier jobs to check: the child scores the lineage's memory sets
        plan.memory = tasks
        seconds = settings.models.memory_eval_seconds
        extra = memory_argv(db, tasks, home.memory, current.id, seconds)
        sets = f"memory sets of jobs {', '.join(str(t.job_id) for t in tasks)}"
        plan.argv = [*evaluate_argv(models, settings, frozen, None, max_length, program), *extra]
        plan.frozen = frozen is not None
        plan.eval_set = f"{frozen} and the {sets}" if frozen is not None else f"the {sets}"
    elif frozen is not None:
        plan.argv = evaluate_argv(models, settings, frozen, None, max_length, program)
        plan.eval_set = str(frozen)
    elif run_dir is not None and init_version == current.id and own_first_val_loss is not None:
        plan.verdict = decide_promotion(own_val_loss, own_first_val_loss, tolerance, current.id)
        plan.verdict.eval_set = "the job's held-out set (step-0 loss of the version it started from)"
    elif run_dir is not None:
        plan.argv = evaluate_argv(models, settings, None, run_dir, max_length, program)
        plan.eval_set = f"the held-out set of job run {run_dir.name}"
    else:
        plan.verdict = GateVerdict(
            True, "no models.eval_file and no job held-out set to compare on", current_id=current.id, eval_set="none"
        )
    return plan


def score_against_current(
    home: Home, db: ModelDB, settings: Settings, new: ModelVersion, current: ModelVersion | None
) -> GateVerdict:
    """Judge ``new`` against ``current`` now, waiting for any evaluation (a manual promote)."""
    plan = plan_gate(home, db, settings, new, current)
    if plan.verdict is not None or not plan.argv:
        return plan.judge(None, "nothing to evaluate", settings.models.regression_tolerance)
    try:
        text = run_evaluate(plan.argv, settings.models.eval_timeout)
    except EvaluationError as e:
        return plan.judge(None, str(e), settings.models.regression_tolerance)
    return plan.judge(parse_losses(text), "", settings.models.regression_tolerance, parse_memory(text))


def plan_version_gate(
    home: Home,
    db: ModelDB,
    settings: Settings,
    version_id: int,
    *,
    run_dir: Path | None,
    init_version: int | None,
    own_val_loss: float | None,
    own_first_val_loss: float | None,
    program: list[str] | None = None,
) -> GatePlan:
    """The gate of a version a job just registered: against ``models/current`` (for a home from
    before the pointer, the version the job started from), at the job's max_length."""
    new = db.version(version_id)
    assert new is not None
    max_length = 0
    if run_dir is not None:
        with contextlib.suppress(Exception):  # an unreadable spec only loses the job's max_length
            from trainbox.jobspec import JobSpec

            max_length = JobSpec.load(run_dir).training.max_length
    current = current_version(home, db, new.lineage)
    if current is None and not (home.models / pointer_name(new.lineage)).is_symlink() and init_version is not None:
        current = db.version(init_version)
    branch = branch_verdict(new.id, new.parent_id, current.id if current else None)
    if branch is not None:
        return GatePlan(new.id, verdict=branch, new_path=new.path, current_id=branch.current_id, eval_set="none")
    return plan_gate(
        home,
        db,
        settings,
        new,
        current,
        run_dir=run_dir,
        init_version=init_version,
        own_val_loss=own_val_loss,
        own_first_val_loss=own_first_val_loss,
        max_length=max_length,
        program=program,
    )


def _record(db: ModelDB, version_id: int, verdict: GateVerdict, tolerance: float, previous: int | None) -> None:
    """The gate row, and the promotion row when it moved ``models/current``, in one transaction."""
    with db.session() as s:
        s.add(
            VersionGate(
                version_id=version_id,
                promoted=verdict.promoted,
                reason=verdict.reason,
                eval_set=verdict.eval_set,
                new_loss=verdict.new_loss,
                current_id=verdict.current_id,
                current_loss=verdict.current_loss,
                tolerance=tolerance,
            )
        )
        s.add_all(verdict.scores)
        if verdict.promoted:
            s.add(Promotion(version_id=version_id, previous_id=previous, action="gate", reason=verdict.reason))


def _switch(home: Home, db: ModelDB, version: ModelVersion, action: str, reason: str) -> None:
    previous = current_id(home, version.lineage)
    set_current(home, version)
    with db.session() as s:
        s.add(Promotion(version_id=version.id, previous_id=previous, action=action, reason=reason))


def _previous_of(home: Home, db: ModelDB, version: ModelVersion) -> int | None:
    """What was current in its lineage before ``version`` becomes current; if the pointer already names
    it (a kill after the switch, before its record), the version the promotions last made current."""
    cur = current_id(home, version.lineage)
    if cur != version.id:
        return cur
    return next((v for v in db.promoted_ids(version.lineage) if v != version.id), None)


def apply_gate(
    home: Home, db: ModelDB, settings: Settings, version_id: int, job_id: int | None, verdict: GateVerdict
) -> GateVerdict:
    """Promote the version if it passed and continues the chain, then record the verdict (rows, event).
    The chain is checked again here: ``models promote`` may have moved the pointer during the evaluation."""
    new = db.version(version_id)
    assert new is not None
    previous = _previous_of(home, db, new)
    if verdict.promoted:
        branch = branch_verdict(version_id, new.parent_id, current_id(home, new.lineage))
        if branch is not None:
            verdict = GateVerdict(
                False, branch.reason, verdict.new_loss, verdict.current_loss, branch.current_id, scores=verdict.scores
            )
    if verdict.promoted:
        try:
            set_current(home, new)
        except VersionError as e:
            verdict = GateVerdict(
                False, str(e), verdict.new_loss, verdict.current_loss, verdict.current_id, scores=verdict.scores
            )
    _record(db, version_id, verdict, settings.models.regression_tolerance, previous)
    kind = "version_promoted" if verdict.promoted else "version_not_promoted"
    db.event(
        kind,
        f"model version {version_id}: {verdict.reason}",
        job_id,
        version=version_id,
        promoted=verdict.promoted,
        new_loss=verdict.new_loss,
        current=verdict.current_id,
        current_loss=verdict.current_loss,
        eval_set=verdict.eval_set,
        parent=new.parent_id,
    )
    log.info("%s %d: %s", kind, version_id, verdict.reason)
    return verdict


# --- manual promote / rollback ---------------------------------------------------------------------


def promote(home: Home, db: ModelDB, settings: Settings, version_id: int, force: bool = False) -> GateVerdict:
    """Make ``version_id`` current if it passes the gate against the current one (or ``force``)."""
    new = db.version(version_id)
    if new is None:
        raise VersionError(f"no model version {version_id}")
    if not is_complete_model(Path(new.path)):
        raise VersionError(f"version {version_id}: {new.path} is not a complete model")
    current = current_version(home, db, new.lineage)
    cid = current.id if current else None
    if force:
        verdict = GateVerdict(True, "promoted by hand with --force (gate skipped)", current_id=cid)
    elif eval_file(home, settings) is None:
        verdict = GateVerdict(
            True,
            "promoted by hand (no models.eval_file: versions of different jobs have no common set to compare on)",
            current_id=cid,
        )
    else:
        verdict = score_against_current(home, db, settings, new, current)
    if not verdict.promoted:
        raise VersionError(f"version {version_id} not promoted: {verdict.reason} (use --force to override)")
    _switch(home, db, new, "promote", verdict.reason)
    db.event("version_promoted", f"model version {version_id}: {verdict.reason}", new.job_id, version=version_id)
    return verdict


def rollback(home: Home, db: ModelDB, lineage: str = MAIN) -> ModelVersion:
    """Return the lineage to the version that was current before its current one was promoted."""
    cur = current_id(home, lineage)
    if cur is None:
        raise VersionError(f"lineage {lineage}: no current version to roll back from")
    made_current = [p for p in db.promotions() if p.version_id == cur and p.action in ("gate", "promote")]
    previous_id = made_current[-1].previous_id if made_current else None
    if previous_id is None:
        raise VersionError(f"version {cur} has no previous current version to roll back to")
    previous = db.version(previous_id)
    if previous is None or not is_complete_model(Path(previous.path)):
        raise VersionError(f"previous version {previous_id} is missing or incomplete")
    _switch(home, db, previous, "rollback", f"rolled back from version {cur}")
    db.event("version_rollback", f"current version {cur} -> {previous_id}", previous.job_id, version=previous_id)
    return previous


def rollback_before_job(home: Home, db: ModelDB, job_id: int) -> ModelVersion:
    """Make current the last version of the current one's lineage not trained on job ``job_id``'s file: the
    parent of that job's version (issue 17: undo a bad file; ``trainbox requeue`` retrains later files), in
    the job's lineage."""
    job = db.job(job_id)
    lineage = job.lineage if job is not None else MAIN
    cur = current_version(home, db, lineage)
    if cur is None:
        raise VersionError(f"lineage {lineage}: no current version to roll back from")
    chain = ancestry(db, cur.id)
    at = next((i for i, v in enumerate(chain) if v.job_id == job_id), None)
    if at is None:
        raise VersionError(f"current version {cur.id} was not trained on job {job_id}'s file: nothing to roll back")
    if at == 0:
        raise VersionError(f"job {job_id}'s file is the first version {cur.id} descends from: no version before it")
    target = chain[at - 1]
    if not is_complete_model(Path(target.path)):
        raise VersionError(f"version {target.id} is missing or incomplete")
    later = [v.job_id for v in chain[at + 1 :] if v.job_id is not None]
    reason = f"rolled back before job {job_id}: from version {cur.id}"
    _switch(home, db, target, "rollback", reason)
    db.event(
        "version_rollback",
        f"current version {cur.id} -> {target.id} ({reason})",
        job_id,
        version=target.id,
        later_jobs=later,
    )
    return target
