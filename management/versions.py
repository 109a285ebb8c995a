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
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from management.db import ModelDB, ModelVersion, Promotion, VersionGate
from trainbox.atomic import fsync_dir
from trainbox.config import Settings
from trainbox.home import Home

log = logging.getLogger("trainbox.versions")

CURRENT = "current"
QUIET_OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1"}


class VersionError(RuntimeError):
    """A promote or rollback that cannot be done; the message says why."""


# --- the pointer -----------------------------------------------------------------------------------


def is_complete_model(path: Path) -> bool:
    """A full model (config.json and weights) or a LoRA adapter (adapter_config.json and its weights)."""
    p = Path(path)
    if (p / "adapter_config.json").is_file():
        return (p / "adapter_model.safetensors").is_file() or (p / "adapter_model.bin").is_file()
    has_weights = any(p.glob("*.safetensors")) or (p / "pytorch_model.bin").is_file()
    return (p / "config.json").is_file() and has_weights


def current_id(home: Home) -> int | None:
    try:
        target = os.readlink(home.models / CURRENT)
    except OSError:
        return None
    name = Path(target).name
    return int(name[1:]) if name.startswith("v") and name[1:].isdigit() else None


def set_current(home: Home, version: ModelVersion) -> None:
    path = Path(version.path)
    if not is_complete_model(path):
        raise VersionError(f"version {version.id}: {path} is not a complete model (config.json and weights)")
    link = home.models / CURRENT
    tmp = home.models / f".{CURRENT}.{os.getpid()}.{time.time_ns()}.tmp"
    target = os.path.relpath(path, home.models) if path.parent == home.models else str(path)
    os.symlink(target, tmp)
    os.replace(tmp, link)
    fsync_dir(home.models)


def current_version(home: Home, db: ModelDB) -> ModelVersion | None:
    vid = current_id(home)
    return db.version(vid) if vid is not None else None


def starting_version(home: Home, db: ModelDB) -> ModelVersion | None:
    """What the next job starts from: ``models/current``; for a home from before the pointer existed,
    the newest version."""
    current = current_version(home, db)
    if current is not None and is_complete_model(Path(current.path)):
        return current
    if (home.models / CURRENT).is_symlink():
        return None if current is None else current  # a pointer exists: never silently pick another
    return db.latest_version()


# --- the gate --------------------------------------------------------------------------------------


@dataclass
class GateVerdict:
    promoted: bool
    reason: str
    new_loss: float | None = None
    current_loss: float | None = None
    current_id: int | None = None
    eval_set: str = ""


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


def eval_file(home: Home, settings: Settings) -> Path | None:
    if not settings.models.eval_file:
        return None
    p = Path(settings.models.eval_file).expanduser()
    return p if p.is_absolute() else home.root / p


def evaluate_argv(
    models: list[Path],
    settings: Settings,
    eval_path: Path | None,
    run_dir: Path | None,
    max_length: int = 0,
    program: list[str] | None = None,
) -> list[str]:
    """The gate's evaluation child: ``python -m core.evaluate`` (``program`` replaces that prefix in
    tests) scoring ``models`` on a frozen file or a job's held-out set."""
    argv = list(program or [sys.executable, "-m", "core.evaluate"])
    for m in models:
        argv += ["--model", str(m)]
    argv += ["--eval", str(eval_path)] if eval_path is not None else ["--run-dir", str(run_dir)]
    argv += ["--max-examples", str(settings.models.eval_max_examples)]
    argv += ["--max-length", str(settings.models.eval_max_length or max_length)]
    return argv


def run_evaluate(argv: list[str], timeout: float) -> dict[str, float | None]:
    """Run an evaluation child to its end (``trainbox models promote``: a person waits; the daemon
    never calls this, it starts and reaps the child in its tick: ``daemon/gate.py``)."""
    try:
        proc = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            env={**QUIET_OFFLINE_ENV, **os.environ},
        )
    except subprocess.TimeoutExpired:
        raise VersionError(f"evaluation took longer than models.eval_timeout ({timeout}s)") from None
    if proc.returncode != 0:
        tail = proc.stderr.decode(errors="replace").strip().splitlines()[-3:]
        raise VersionError(f"evaluation failed (exit {proc.returncode}): {' | '.join(tail)}")
    return parse_losses(proc.stdout.decode().strip().splitlines()[-1])


def parse_losses(text: str) -> dict[str, float | None]:
    """The losses out of ``core.evaluate``'s JSON object."""
    losses: dict[str, float | None] = json.loads(text)["losses"]
    return losses


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

    def judge(self, losses: dict[str, float | None] | None, error: str, tolerance: float) -> GateVerdict:
        """The verdict from the child's losses, or ``error`` (why it gave none)."""
        if self.verdict is not None:
            return self.verdict
        if losses is None:
            return GateVerdict(False, f"not evaluated: {error}", current_id=self.current_id, eval_set=self.eval_set)
        v = decide_promotion(losses.get(self.new_path), losses.get(self.current_path), tolerance, self.current_id)
        v.eval_set = self.eval_set
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
    if current is None or current.id == new.id:
        plan.verdict = decide_promotion(None, None, tolerance, None)
        plan.verdict.eval_set = "none"
        return plan
    plan.current_path, plan.current_id = current.path, current.id
    models = [Path(new.path), Path(current.path)]
    frozen = eval_file(home, settings)
    if frozen is not None:
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
        losses = run_evaluate(plan.argv, settings.models.eval_timeout)
    except VersionError as e:
        return plan.judge(None, str(e), settings.models.regression_tolerance)
    return plan.judge(losses, "", settings.models.regression_tolerance)


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
    current = current_version(home, db)
    if current is None and not (home.models / CURRENT).is_symlink() and init_version is not None:
        current = db.version(init_version)
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


def _record(db: ModelDB, version_id: int, verdict: GateVerdict, tolerance: float) -> None:
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


def _switch(home: Home, db: ModelDB, version: ModelVersion, action: str, reason: str) -> None:
    previous = current_id(home)
    set_current(home, version)
    with db.session() as s:
        s.add(Promotion(version_id=version.id, previous_id=previous, action=action, reason=reason))


def apply_gate(
    home: Home, db: ModelDB, settings: Settings, version_id: int, job_id: int | None, verdict: GateVerdict
) -> GateVerdict:
    """Record a gate's verdict (``version_gates`` row, event) and promote the version if it passed."""
    new = db.version(version_id)
    assert new is not None
    _record(db, version_id, verdict, settings.models.regression_tolerance)
    if verdict.promoted:
        try:
            _switch(home, db, new, "gate", verdict.reason)
        except VersionError as e:
            verdict = GateVerdict(False, str(e), verdict.new_loss, verdict.current_loss, verdict.current_id)
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
    current = current_version(home, db)
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


def rollback(home: Home, db: ModelDB) -> ModelVersion:
    """Return to the version that was current before the current one was promoted."""
    cur = current_id(home)
    if cur is None:
        raise VersionError("no current version to roll back from")
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
