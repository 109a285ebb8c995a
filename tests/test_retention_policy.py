"""Retention: property tests on generated checkpoint sets, and a dry run that agrees with the real run."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from management.db import Checkpoint, Job, ModelDB
from management.registration import ORPHANED
from management.retention import Ckpt, Disk, Policy, Retention, plan, scan
from trainbox.config import Settings
from trainbox.home import Home

NOW = 1_000_000.0


@st.composite
def checkpoint_sets(draw: st.DrawFn) -> tuple[list[Ckpt], dict[str, str], Policy, Disk]:
    ckpts = []
    for job in range(1, draw(st.integers(1, 3)) + 1):
        steps = draw(st.lists(st.integers(1, 60), min_size=0, max_size=8, unique=True))
        for step in steps:
            ckpts.append(
                Ckpt(
                    job_id=job,
                    step=step * 10,
                    path=f"/h/runs/job-{job:06d}/checkpoints/step-{step * 10:08d}",
                    size=draw(st.integers(1, 1000)),
                    created_at=NOW - draw(st.floats(0, 10_000, allow_subnormal=False)),
                    val_loss=draw(st.one_of(st.none(), st.floats(0.1, 10, allow_subnormal=False))),
                )
            )
    protected = {c.path: "test" for c in ckpts if draw(st.booleans()) and draw(st.booleans())}
    policy = Policy(
        keep_last=draw(st.integers(0, 3)),
        keep_best=draw(st.integers(0, 2)),
        milestone_every=draw(st.sampled_from([0, 20, 50])),
        min_age=draw(st.sampled_from([0.0, 600.0, 5000.0])),
        max_total_bytes=draw(st.sampled_from([0, 500, 3000])),
        min_free_share=draw(st.sampled_from([0.0, 0.1, 0.5])),
    )
    total = 20_000
    disk = Disk(total=total, free=draw(st.integers(0, total)))
    return ckpts, protected, policy, disk


def _hard(c: Ckpt, protected: dict[str, str], policy: Policy) -> bool:
    return c.path in protected or NOW - c.created_at < policy.min_age


@settings(max_examples=300, deadline=None)
@given(checkpoint_sets())
def test_protected_never_deleted_and_limits_hold(case: tuple[list[Ckpt], dict[str, str], Policy, Disk]) -> None:
    ckpts, protected, policy, disk = case
    p = plan(ckpts, protected, policy, disk, NOW)
    deleted = set(p.deleted_paths)
    assert len(deleted) == len(p.delete)  # nothing twice
    assert deleted.isdisjoint(protected)
    assert not any(_hard(c, protected, policy) for c, _ in p.delete)
    assert deleted | set(p.keep) == {c.path for c in ckpts} and deleted.isdisjoint(p.keep)
    remaining = [c for c in ckpts if c.path not in deleted]
    only_hard_left = all(_hard(c, protected, policy) for c in remaining)
    total = sum(c.size for c in remaining)
    if policy.max_total_bytes:
        assert total <= policy.max_total_bytes or only_hard_left
    free = disk.free + sum(c.size for c, _ in p.delete)
    if policy.min_free_share:
        assert free / disk.total >= policy.min_free_share or only_hard_left
    assert bool(p.unmet) == (
        not (total <= (policy.max_total_bytes or total) and free / disk.total >= policy.min_free_share)
    )


def test_rules_keep_last_best_milestones_and_explain() -> None:
    ckpts = [
        Ckpt(1, s, f"/r/step-{s:08d}", 10, NOW - 10_000, v)
        for s, v in [(10, 3.0), (20, 1.0), (30, 2.5), (40, 2.8), (50, 2.9), (60, 2.7)]
    ]
    p = plan(ckpts, {}, Policy(keep_last=2, keep_best=1, milestone_every=30, min_age=60), Disk(10**9, 10**9), NOW)
    assert sorted(c.step for c, _ in p.delete) == [10, 40]
    assert "best 1" in p.keep["/r/step-00000020"] and "milestone" in p.keep["/r/step-00000030"]
    assert all("no rule" in why for _, why in p.delete)
    # under a cap the milestone goes before the best, the best before the newest
    p = plan(
        ckpts,
        {},
        Policy(keep_last=2, keep_best=1, milestone_every=30, min_age=60, max_total_bytes=15),
        Disk(10**9, 10**9),
        NOW,
    )
    order = [c.step for c, _ in p.delete]
    assert order[:2] == [10, 40] and order[2:] == [30, 20, 50] and not p.unmet


def _make_tree(root: Path, ckpts: list[Ckpt]) -> Home:
    home = Home(root).ensure()
    for c in ckpts:
        d = home.run_dir(c.job_id) / "checkpoints" / f"step-{c.step:08d}"
        d.mkdir(parents=True)
        (d / "model.bin").write_bytes(b"x" * 3)
        meta = {"step": c.step, "time": c.created_at, "size_bytes": c.size, "val_loss": c.val_loss}
        (d / "meta.json").write_text(json.dumps(meta))
        (d / "COMPLETE").write_text(f"{c.step}\n")
    return home


@settings(max_examples=15, deadline=None)
@given(checkpoint_sets())
def test_dry_run_equals_real_run(case: tuple[list[Ckpt], dict[str, str], Policy, Disk]) -> None:
    ckpts, _protected, policy, disk = case
    with tempfile.TemporaryDirectory() as tmp:
        home = _make_tree(Path(tmp) / "home", ckpts)
        cfg = Settings().retention.model_copy(
            update={
                "keep_last": policy.keep_last,
                "keep_best": policy.keep_best,
                "milestone_every": policy.milestone_every,
                "min_age": policy.min_age,
                "max_total_gb": policy.max_total_bytes / 1e9,
                "min_free_share": policy.min_free_share,
            }
        )
        s = Settings(retention=cfg)
        before = {c.path for c in scan(home)}
        # the job with the lowest id is "paused": its newest checkpoint is its resume point
        paused = min((c.job_id for c in ckpts), default=None)
        if paused is not None:
            (home.processing / f"{paused:06d}__x.jsonl").write_text("{}\n")
        db = ModelDB(home.db_url)
        with db.session() as sess:
            for job_id in sorted({c.job_id for c in ckpts}):
                sess.add(Job(id=job_id, name=f"j{job_id}.jsonl"))
            sess.flush()
            for c in scan(home):
                sess.add(Checkpoint(job_id=c.job_id, step=c.step, path=c.path, size_bytes=c.size))
        dry = Retention(home, s, db=db, dry_run=True, disk=lambda _p: disk, report=lambda _l: None)
        dry.loop(NOW)
        assert dry.last_plan is not None
        would = set(dry.last_plan.deleted_paths)
        real = Retention(home, s, db=db, disk=lambda _p: disk, report=lambda _l: None)
        real.loop(NOW)
        after = {c.path for c in scan(home)}
        assert before - after == would
        if paused is not None:
            newest = max((c for c in ckpts if c.job_id == paused), key=lambda c: c.step)
            assert str(home.run_dir(paused) / "checkpoints" / f"step-{newest.step:08d}") in after
        marked = {c.path for job in {c.job_id for c in ckpts} for c in db.checkpoints(job) if c.deleted_at}
        assert marked == would
        assert len(db.events(kind="checkpoint_deleted")) == len(would)
        trash = home.root / "trash"
        assert not (trash.exists() and any(trash.iterdir()))  # trashed, then removed
        db.close()


def test_set_aside_model_folders_are_kept_for_their_days_then_deleted_with_an_event(tmp_path: Path) -> None:
    home = Home(tmp_path / "home").ensure()
    db = ModelDB(home.db_url)
    aside = home.models / ORPHANED
    now = 1_800_000_000.0
    old = aside / f"v0003.{int((now - 15 * 86400) * 1e9)}"  # set aside 15 days ago
    young = aside / f"v0004.{int((now - 2 * 86400) * 1e9)}"
    for folder in (old, young):
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"w")
    lines: list[str] = []
    s = Settings.model_validate({"retention": {"set_aside_days": 14}})
    Retention(home, s, db=db, dry_run=True, disk=lambda _p: Disk(100, 90), report=lines.append).loop(now)
    assert old.exists() and any("would delete set-aside" in line for line in lines)
    Retention(home, s, db=db, disk=lambda _p: Disk(100, 90), report=lines.append).loop(now)
    assert not old.exists() and young.exists()
    assert [e.kind for e in db.events(kind="set_aside_deleted")] == ["set_aside_deleted"]
    keep = Settings.model_validate({"retention": {"set_aside_days": 0}})  # 0: kept forever
    Retention(home, keep, db=db, disk=lambda _p: Disk(100, 90), report=lines.append).loop(now + 1e9)
    assert young.exists()
    db.close()
