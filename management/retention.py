"""Checkpoint retention: which checkpoints to delete, and why (pure), and the process that does it.

``plan`` is a pure function of the checkpoints, the protected set, the policy, the disk and the
time. Rules, per run:
  hard (never deleted): the checkpoint an active or paused job resumes from, one a model version or
      a job's starting model points into, and anything younger than ``min_age``;
  soft (kept unless space runs short): the newest ``keep_last``, the ``keep_best`` lowest validation
      losses, every step that is a multiple of ``milestone_every``;
  the rest is deleted.
Then, while the total exceeds ``max_total_gb`` or the free share of the disk is below
``min_free_share``, soft-kept checkpoints go too, lowest value first: milestones, then best-K, then
last-N; within a rule the oldest (or, for best-K, the worst loss) first.

``Retention`` is the process (``trainbox retention``, STYLE 1 ``loop(now)``): it scans
``runs/*/checkpoints/``, plans, and deletes crash-safely: rename into ``<home>/trash/`` (atomic; a
crash leaves a whole checkpoint either in place or in the trash), record it in the DB
(``checkpoints.deleted_at`` and a ``checkpoint_deleted`` event with the reason), then remove the
trashed folder. Leftovers in ``trash/`` are removed at start. It is the only process that deletes
checkpoints other than the worker pruning its own run beyond ``training.keep_checkpoints``. It never
touches ``memory/`` (issue 17): a job's memory sets are what later gates score versions on and later jobs
replay, and only their own down-sampling replaces one (``management/memory.py``).

In a fleet (``[fleet] enabled``, one shared storage) every host may run retention, but one deletes: a pass goes
ahead only while its host holds the ``retention`` lease (``management/fleet_role.py``), re-checked before each
deletion; the others write their heartbeat and stand by, and take over once the holder stops (it releases the
lease) or dies (the lease expires). The trash is emptied by the holder, on the shared storage.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import update

from management.db import Checkpoint, ModelDB, schema_ready
from management.fleet_role import FleetRole
from management.leases import RETENTION
from management.registration import ORPHANED
from trainbox.atomic import atomic_write_json, fsync_dir
from trainbox.config import RetentionConfig, Settings
from trainbox.home import Home
from trainbox.states import JobState

log = logging.getLogger("trainbox.retention")

RETENTION_STATUS = "retention.json"
_STEP = re.compile(r"^step-(\d{8,})$")
_JOB = re.compile(r"^job-(\d+)$")
GB = 1e9

# soft rules, lowest value first: deleted in this order when space runs short
RANK_NONE, RANK_MILESTONE, RANK_BEST, RANK_LAST = 0, 1, 2, 3
RULE_NAMES = {RANK_MILESTONE: "milestone", RANK_BEST: "best", RANK_LAST: "last"}


@dataclass(frozen=True)
class Ckpt:
    job_id: int
    step: int
    path: str
    size: int
    created_at: float
    val_loss: float | None = None


@dataclass(frozen=True)
class Policy:
    keep_last: int = 2
    keep_best: int = 1
    milestone_every: int = 0
    min_age: float = 3600.0
    max_total_bytes: int = 0  # 0: no cap
    min_free_share: float = 0.0

    @classmethod
    def from_config(cls, cfg: RetentionConfig) -> Policy:
        return cls(
            cfg.keep_last,
            cfg.keep_best,
            cfg.milestone_every,
            cfg.min_age,
            int(cfg.max_total_gb * GB),
            cfg.min_free_share,
        )


@dataclass(frozen=True)
class Disk:
    total: int
    free: int


@dataclass
class Plan:
    keep: dict[str, str] = field(default_factory=dict)  # path -> why kept
    delete: list[tuple[Ckpt, str]] = field(default_factory=list)  # (checkpoint, why deleted), in order
    unmet: list[str] = field(default_factory=list)  # limits that still fail when only hard-kept ones remain

    @property
    def deleted_paths(self) -> list[str]:
        return [c.path for c, _ in self.delete]

    @property
    def freed(self) -> int:
        return sum(c.size for c, _ in self.delete)


def _soft_rank(c: Ckpt, run: list[Ckpt], policy: Policy) -> tuple[int, list[str]]:
    """The highest-value soft rule keeping ``c`` within its run, and every rule that does."""
    reasons, rank = [], RANK_NONE
    newest = sorted(run, key=lambda x: x.step, reverse=True)[: policy.keep_last]
    if c in newest:
        reasons.append(f"one of the last {policy.keep_last}")
        rank = max(rank, RANK_LAST)
    scored = sorted((x for x in run if x.val_loss is not None), key=lambda x: (x.val_loss, -x.step))
    if c in scored[: policy.keep_best]:
        reasons.append(f"one of the best {policy.keep_best} by validation loss ({c.val_loss:.4f})")
        rank = max(rank, RANK_BEST)
    if policy.milestone_every > 0 and c.step % policy.milestone_every == 0:
        reasons.append(f"milestone (step multiple of {policy.milestone_every})")
        rank = max(rank, RANK_MILESTONE)
    return rank, reasons


def plan(ckpts: Iterable[Ckpt], protected: dict[str, str], policy: Policy, disk: Disk, now: float) -> Plan:
    """What to delete and why. ``protected`` maps path -> why it must never be deleted."""
    items = sorted(ckpts, key=lambda c: (c.job_id, c.step))
    runs: dict[int, list[Ckpt]] = {}
    for c in items:
        runs.setdefault(c.job_id, []).append(c)
    out = Plan()
    soft: list[tuple[int, float, int, Ckpt]] = []  # (rank, order key, tiebreak, checkpoint)
    for c in items:
        if c.path in protected:
            out.keep[c.path] = protected[c.path]
            continue
        if now - c.created_at < policy.min_age:
            out.keep[c.path] = f"younger than min_age ({now - c.created_at:.0f}s < {policy.min_age:.0f}s)"
            continue
        rank, reasons = _soft_rank(c, runs[c.job_id], policy)
        if rank == RANK_NONE:
            out.delete.append((c, "kept by no rule (not last, best, milestone, young or protected)"))
            continue
        out.keep[c.path] = "; ".join(reasons)
        order = -(c.val_loss if c.val_loss is not None else float("inf")) if rank == RANK_BEST else c.created_at
        soft.append((rank, order, c.step, c))

    remaining = sum(c.size for c in items) - out.freed
    free = disk.free + out.freed

    def short() -> list[str]:
        why = []
        if policy.max_total_bytes and remaining > policy.max_total_bytes:
            why.append(f"total {remaining / GB:.3f} GB > cap {policy.max_total_bytes / GB:.3f} GB")
        if policy.min_free_share and disk.total and free / disk.total < policy.min_free_share:
            why.append(f"free share {free / disk.total:.3f} < {policy.min_free_share}")
        return why

    for rank, _order, _step, c in sorted(soft, key=lambda t: (t[0], t[1], t[2], t[3].job_id)):
        why = short()
        if not why:
            break
        del out.keep[c.path]
        out.delete.append((c, f"space: {', '.join(why)}; lowest value left ({RULE_NAMES[rank]})"))
        remaining -= c.size
        free += c.size
    out.unmet = short()
    return out


# --- the filesystem side ---------------------------------------------------------------------------


def _size(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def scan(home: Home) -> list[Ckpt]:
    """Complete checkpoints under ``runs/*/checkpoints/``; size and loss from ``meta.json``."""
    found: list[Ckpt] = []
    if not home.runs.is_dir():
        return found
    for run in sorted(home.runs.iterdir()):
        m = _JOB.match(run.name)
        root = run / "checkpoints"
        if not m or not root.is_dir():
            continue
        for child in sorted(root.iterdir()):
            s = _STEP.match(child.name)
            if not s or not (child / "COMPLETE").is_file():
                continue
            try:
                meta = json.loads((child / "meta.json").read_text(encoding="utf-8"))
            except (OSError, ValueError):
                meta = {}
            try:
                created = float(meta.get("time") or (child / "COMPLETE").stat().st_mtime)
            except OSError:
                continue  # deleted under us (the worker prunes its own run)
            size = meta.get("size_bytes")
            val = meta.get("val_loss")
            found.append(
                Ckpt(
                    job_id=int(m.group(1)),
                    step=int(s.group(1)),
                    path=str(child),
                    size=int(size) if isinstance(size, int) else _size(child),
                    created_at=created,
                    val_loss=float(val) if isinstance(val, int | float) else None,
                )
            )
    return found


def _job_id_of(name: str) -> int | None:
    head = name.partition("__")[0]
    return int(head) if head.isdigit() else None


def protected_paths(home: Home, db: ModelDB | None, ckpts: list[Ckpt]) -> dict[str, str]:
    """Checkpoints that must survive: resume points of active or paused jobs, and anything a model
    version or a job's starting model points into."""
    active: set[int] = set()
    if home.processing.is_dir():
        for p in home.processing.iterdir():
            job_id = _job_id_of(p.name)
            if job_id is not None and p.suffix == ".jsonl":
                active.add(job_id)
    refs: list[tuple[str, str]] = []
    if db is not None:
        for job in db.jobs([JobState.RUNNING, JobState.PAUSED]):
            active.add(job.id)
        for v in db.versions():
            refs.append((v.path, f"model version {v.id} points at it"))
            if v.base_model:
                refs.append((v.base_model, f"model version {v.id} was trained from it"))
        for job in db.jobs():
            if job.init_model and job.state not in (JobState.DONE.value, JobState.REJECTED.value):
                refs.append((job.init_model, f"job {job.id} starts from it"))
    out: dict[str, str] = {}
    newest: dict[int, Ckpt] = {}
    for c in ckpts:
        if c.job_id in active and (c.job_id not in newest or c.step > newest[c.job_id].step):
            newest[c.job_id] = c
    for job_id, c in newest.items():
        out[c.path] = f"job {job_id} is active or paused and resumes from it"
    for c in ckpts:
        root = os.path.realpath(c.path)
        for ref, why in refs:
            real = os.path.realpath(ref)
            if real == root or real.startswith(root + os.sep):
                out.setdefault(c.path, why)
    return out


def expired_set_aside(folder: Path, days: float, now: float) -> list[Path]:
    """Entries of ``models/.orphaned/`` set aside more than ``days`` ago: the time is the name's suffix
    (``set_aside`` appends ``time.time_ns()``; a rename keeps the folder's old mtime), else the mtime."""
    out = []
    for path in sorted(folder.iterdir()):
        suffix = path.name.rsplit(".", 1)[-1]
        when = int(suffix) / 1e9 if suffix.isdigit() else path.lstat().st_mtime
        if now - when > days * 86400:
            out.append(path)
    return out


def disk_of(path: Path) -> Disk:
    usage = shutil.disk_usage(path)
    return Disk(total=usage.total, free=usage.free)


class Retention:
    name = "retention"

    def __init__(
        self,
        home: Home,
        settings: Settings,
        db: ModelDB | None = None,
        dry_run: bool = False,
        disk: Callable[[Path], Disk] = disk_of,
        report: Callable[[str], None] | None = None,
    ) -> None:
        self.home = home
        self.cfg = settings.retention
        self.db_url = settings.db.url_for(home.db_url)
        self.policy = Policy.from_config(self.cfg)
        self.interval = self.cfg.interval
        self._db = db
        self.dry_run = dry_run
        self.disk = disk
        self.report = report or (lambda line: log.info("%s", line))
        self.trash = home.trash
        self.last_plan: Plan | None = None
        self.deleted_total = 0
        self.role: FleetRole | None = None
        if settings.fleet.enabled and not dry_run:
            # the lease outlives the gap between passes: held steadily by one host, not taken in turns
            ttl = settings.fleet.lease_seconds + self.interval
            self.role = FleetRole(lambda: self.db, RETENTION, settings.fleet.host, ttl)
        elif not dry_run:
            self.empty_trash()  # in a fleet the trash is shared: only the lease's holder empties it

    @property
    def db(self) -> ModelDB | None:
        """Opened once the daemon has created the schema (two processes creating it at once collide)."""
        if self._db is None and schema_ready(self.db_url):
            self._db = ModelDB(self.db_url)
        return self._db

    def empty_trash(self) -> None:
        if self.trash.is_dir():
            for child in self.trash.iterdir():
                shutil.rmtree(child, ignore_errors=True)

    def loop(self, now: float) -> None:
        if self.role is not None:
            if not self.role.hold(now):
                self.write_status(
                    now, None, standby=f"another host deletes: the retention lease is {self.role.holder(now)}"
                )
                return
            self.empty_trash()
        ckpts = scan(self.home)
        protected = protected_paths(self.home, self.db, ckpts)
        p = plan(ckpts, protected, self.policy, self.disk(self.home.storage), now)
        self.last_plan = p
        verb = "would delete" if self.dry_run else "deleting"
        for c, why in p.delete:
            if self.role is not None and not self.role.still_holds(now):
                self.report("retention lease lost to another host: this pass stops here")
                return
            self.report(f"{verb} {c.path} ({c.size / 1e6:.1f} MB): {why}")
            if not self.dry_run:
                self.delete(c, why, now)
        for limit in p.unmet:
            self.report(f"still short after deleting everything deletable: {limit}")
        self.sweep_set_aside(now)
        if not self.dry_run:
            self.write_status(now, p)

    def delete(self, c: Ckpt, why: str, now: float) -> bool:
        src = Path(c.path)
        self.trash.mkdir(parents=True, exist_ok=True)
        dest = self.trash / f"{time.time_ns()}-job-{c.job_id:06d}-{src.name}"
        try:
            os.rename(src, dest)  # atomic: whole in place or whole in the trash
        except FileNotFoundError:
            return False  # the worker pruned it first
        fsync_dir(src.parent)
        if self.db is not None:
            try:
                with self.db.session() as s:
                    s.execute(
                        update(Checkpoint)
                        .where(Checkpoint.path == c.path, Checkpoint.deleted_at.is_(None))
                        .values(deleted_at=now)
                    )
                self.db.event(
                    "checkpoint_deleted",
                    f"step {c.step} of job {c.job_id}: {why}",
                    c.job_id,
                    path=c.path,
                    step=c.step,
                    size_bytes=c.size,
                    reason=why,
                )
            except Exception as e:  # boundary: the deletion stands; the record is best-effort
                log.warning("could not record deletion of %s: %s", c.path, e)
        shutil.rmtree(dest, ignore_errors=True)
        self.deleted_total += c.size
        return True

    def sweep_set_aside(self, now: float) -> None:
        """Model folders set aside by start-up reconciliation are kept ``set_aside_days``, then deleted with
        an event: kept so a person can rescue a model whose row was lost, not forever."""
        folder = self.home.models / ORPHANED
        if self.cfg.set_aside_days <= 0 or not folder.is_dir():
            return
        for path in expired_set_aside(folder, self.cfg.set_aside_days, now):
            self.report(f"{'would delete' if self.dry_run else 'deleting'} set-aside model folder {path}")
            if self.dry_run:
                continue
            self.trash.mkdir(parents=True, exist_ok=True)
            dest = self.trash / f"{time.time_ns()}-{path.name}"
            os.rename(path, dest)
            if dest.is_dir() and not dest.is_symlink():
                shutil.rmtree(dest, ignore_errors=True)
            else:
                dest.unlink(missing_ok=True)
            if self.db is not None:
                self.db.event(
                    "set_aside_deleted",
                    f"models/{ORPHANED}/{path.name} deleted after {self.cfg.set_aside_days:g} days",
                    path=str(path),
                )

    def write_status(self, now: float, p: Plan | None, standby: str = "") -> None:
        """The heartbeat ``trainbox health`` judges; a host standing by in a fleet beats too, saying why."""
        status: dict[str, object] = {"pid": os.getpid(), "heartbeat": now, "deleted_bytes_total": self.deleted_total}
        if p is not None:
            status |= {
                "last_deleted": len(p.delete),
                "last_freed_bytes": p.freed,
                "kept": len(p.keep),
                "unmet": p.unmet,
            }
        if standby:
            status["standby"] = standby
        with contextlib.suppress(OSError):
            atomic_write_json(self.home.status / RETENTION_STATUS, status)

    def shutdown(self) -> None:
        if self.role is not None:
            self.role.release()  # another host takes over at its next pass, not after the TTL
        if self._db is not None:
            self._db.close()
