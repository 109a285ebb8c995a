"""Start-up reconciliation of version rows, model folders and ``models/current``: the pure planner
case by case, the chain rule, and the applier on a real home and SQLite file (no daemon, no torch)."""

from __future__ import annotations

import os
from pathlib import Path

from management.db import Job, ModelDB, ModelVersion, Promotion
from management.registration import make_final, place
from management.version_recovery import TEMP_LINK, Action, PointerFacts, RowFacts, plan, recover_versions
from management.version_recovery import ModelsFacts as _Facts
from management.versions import CURRENT, branch_verdict, current_id
from trainbox.home import Home


def ModelsFacts(  # main's pointer only, as every case below but the lineage one
    rows: list[RowFacts],
    folders: dict[str, bool],
    link: str | None,
    promoted: list[int] | None = None,
    temp_links: list[str] | None = None,
    link_blocked: bool = False,
    link_elsewhere: bool = False,
) -> _Facts:
    pointer = PointerFacts("main", link, promoted or [], link_blocked, link_elsewhere)
    return _Facts(rows, folders, [pointer], temp_links or [])


def kinds(actions: list[Action]) -> list[tuple[str, int | None, str]]:
    return [(a.kind, a.version, a.folder) for a in actions]


def test_a_consistent_home_needs_nothing() -> None:
    rows = [RowFacts(1, False, "v0001"), RowFacts(2, False, "v0002")]
    facts = ModelsFacts(rows, {"v0001": True, "v0002": True}, "v0002", [2, 1])
    assert plan(facts) == []
    assert plan(ModelsFacts([], {}, None)) == []  # a new home
    assert plan(ModelsFacts([RowFacts(1, False, "v0001")], {"v0001": True}, None)) == []  # from before the pointer


def test_a_pending_row_with_its_folder_in_place_is_adopted() -> None:
    rows = [RowFacts(1, False, "v0001"), RowFacts(2, True, job_id=7)]
    facts = ModelsFacts(rows, {"v0001": True, "v0002": True}, "v0001", [1])
    assert kinds(plan(facts)) == [("adopt", 2, "v0002")]


def test_a_pending_row_whose_final_model_is_still_in_its_run_is_placed() -> None:
    facts = ModelsFacts([RowFacts(3, True, job_id=7, final_ready=True)], {}, None)
    assert kinds(plan(facts)) == [("place", 3, "v0003")]
    in_the_way = ModelsFacts([RowFacts(3, True, job_id=7, final_ready=True)], {"v0003": False}, None)
    assert kinds(plan(in_the_way)) == [("remove_folder", 3, "v0003"), ("place", 3, "v0003")]


def test_a_pending_row_with_nothing_to_register_is_dropped() -> None:
    assert kinds(plan(ModelsFacts([RowFacts(4, True, job_id=7)], {}, None))) == [("drop_row", 4, "")]
    half = ModelsFacts([RowFacts(4, True, job_id=7)], {"v0004": False}, None)
    assert kinds(plan(half)) == [("remove_folder", 4, "v0004"), ("drop_row", 4, "")]


def test_folders_no_row_names_are_removed_legacy_suffixes_included() -> None:
    rows = [RowFacts(1, False, "v0001"), RowFacts(2, False, "v0002.1")]  # an old home's re-registration
    folders = {"v0001": True, "v0002": True, "v0002.1": True, "v0005.1": True, "v0006": False}
    facts = ModelsFacts(rows, folders, "v0002.1", [2, 1])
    got = kinds(plan(facts))
    assert got == [("set_aside", None, "v0002"), ("set_aside", None, "v0005.1"), ("remove_folder", None, "v0006")]


def test_set_current_temp_links_are_removed() -> None:
    facts = ModelsFacts([RowFacts(1, False, "v0001")], {"v0001": True}, "v0001", [1], temp_links=[".current.9.1.tmp"])
    assert kinds(plan(facts)) == [("remove_temp", None, ".current.9.1.tmp")]


def test_a_pointer_to_a_missing_or_unknown_folder_goes_to_the_last_promoted_complete_version() -> None:
    rows = [RowFacts(1, False, "v0001"), RowFacts(2, False, "v0002"), RowFacts(3, False, "v0003")]
    folders = {"v0001": True, "v0002": True, "v0003": False}
    for link in ("v0009", "garbage", "v0003", "/elsewhere/v0002x"):  # missing, unparsable, incomplete, unknown
        got = kinds(plan(ModelsFacts(rows, folders, link, [3, 2, 1])))
        assert got == [("set_current", 2, "v0002")], link  # 3 is incomplete: the one promoted before it
    assert kinds(plan(ModelsFacts(rows, folders, None, [1]))) == [("set_current", 1, "v0001")]  # link deleted
    moved = ModelsFacts(rows, folders, "/old/home/models/v0002", [2], link_elsewhere=True)
    assert kinds(plan(moved)) == [("set_current", 2, "v0002")]
    assert kinds(plan(ModelsFacts(rows, folders, "v0009", []))) == [("remove_current", None, "")]
    assert plan(ModelsFacts(rows, folders, None, [], link_blocked=True)) == []  # a folder named current: left


def test_a_pointer_to_a_placed_or_adopted_version_is_kept() -> None:
    facts = ModelsFacts([RowFacts(1, True, job_id=3, final_ready=True)], {}, "v0001", [1])
    assert kinds(plan(facts)) == [("place", 1, "v0001")]


def test_each_lineage_pointer_is_repaired_within_its_own_lineage() -> None:
    rows = [RowFacts(1, False, "v0001"), RowFacts(2, False, "v0002", lineage="b"), RowFacts(3, False, "v0003")]
    folders = {"v0001": True, "v0002": True, "v0003": True}
    main_ok = PointerFacts("main", "v0003", [3, 1])
    crossed = PointerFacts("b", "v0003", [2])  # b's pointer names a main version: no version of b
    got = plan(_Facts(rows, folders, [main_ok, crossed]))
    assert [(a.kind, a.version, a.lineage) for a in got] == [("set_current", 2, "b")]
    missing = PointerFacts("b", None, [2, 3])  # promotions of other lineages never count for b
    assert [(a.kind, a.version, a.lineage) for a in plan(_Facts(rows, folders, [main_ok, missing]))] == [
        ("set_current", 2, "b")
    ]
    nothing_of_b = PointerFacts("b", "v0001", [])
    assert [(a.kind, a.lineage) for a in plan(_Facts(rows, folders, [nothing_of_b]))] == [("remove_current", "b")]
    assert TEMP_LINK.match(".current@b.9.1.tmp") and TEMP_LINK.match(".current.9.1.tmp")
    temp = _Facts(rows, folders, [main_ok], [".current@b.9.1.tmp"])
    assert kinds(plan(temp)) == [("remove_temp", None, ".current@b.9.1.tmp")]


def test_the_chain_rule() -> None:
    assert branch_verdict(5, 4, 4) is None  # continues the chain
    assert branch_verdict(5, None, None) is None and branch_verdict(5, 2, None) is None  # nothing current
    assert branch_verdict(5, 2, 5) is None  # current already (a kill after the switch)
    v = branch_verdict(5, 2, 4)
    assert v is not None and not v.promoted and v.current_id == 4
    assert "version 5 was trained from version 2" in v.reason and "version 4 is current" in v.reason
    named = branch_verdict(5, None, 4)
    assert named is not None and not named.promoted and "no version" in named.reason


def _folder(home: Home, name: str, complete: bool = True) -> Path:
    d = home.models / name
    d.mkdir(parents=True)
    (d / "config.json").write_text("{}")
    if complete:
        (d / "model.safetensors").write_bytes(b"w")
    return d


def test_recovery_on_a_real_home(tmp_path: Path) -> None:
    home = Home(tmp_path / "home").ensure()
    db = ModelDB(home.db_url)
    with db.session() as s:
        s.add(ModelVersion(id=1, path=str(_folder(home, "v0001"))))
        s.add(ModelVersion(id=2, path=str(_folder(home, "v0002.1"))))  # an old home's re-registration
        s.add(Promotion(version_id=1, action="gate"))
        s.add(Promotion(version_id=2, previous_id=1, action="gate"))
        s.add(Job(id=9, name="nine.jsonl"))
    _folder(home, "v0002")  # the orphan the re-registration collided with
    pending = db.add_pending_version(job_id=None)  # a kill after the row, with nothing else left
    placed = db.add_pending_version(job_id=9)  # a kill after the row: final/ still in its run
    final = home.run_dir(9) / "final"
    final.mkdir(parents=True)
    (final / "config.json").write_text("{}")
    (final / "model.safetensors").write_bytes(b"w")
    os.symlink("v0007", home.models / CURRENT)  # names nothing
    (home.models / "base-model").mkdir()  # not a version name: never touched
    actions = recover_versions(home, db)
    assert ("drop_row", pending, "") in kinds(actions) and ("set_aside", None, "v0002") in kinds(actions)
    assert db.version(pending) is None and not (home.models / "v0002").exists()
    assert [p.name.partition(".")[0] for p in (home.models / ".orphaned").iterdir()] == ["v0002"]  # kept aside
    placed_row = db.version(placed)
    assert placed_row is not None and placed_row.path == str(home.models / f"v{placed:04d}") and not final.exists()
    assert (home.models / "v0002.1").is_dir() and (home.models / "base-model").is_dir()
    assert os.readlink(home.models / CURRENT) == "v0002.1" and current_id(home) == 2
    events = {e.kind for e in db.events()}
    assert events >= {"version_dropped", "version_placed", "version_folder_set_aside", "current_repaired"}
    assert recover_versions(home, db) == []  # settled: a second start finds nothing to do
    db.close()


def test_a_registration_sets_aside_a_folder_in_its_way(tmp_path: Path) -> None:
    home = Home(tmp_path / "home").ensure()
    db = ModelDB(home.db_url)
    _folder(home, "v0001")  # e.g. the DB was replaced: the only copy of a model, kept
    final = tmp_path / "final"
    final.mkdir()
    (final / "config.json").write_text('{"new": true}')
    vid = db.add_pending_version()
    assert vid == 1 and db.versions() == [] and db.latest_version() is None  # pending: no version to readers
    make_final(db, vid, place(home, db, vid, final))
    assert (home.models / "v0001" / "config.json").read_text() == '{"new": true}'
    [aside] = (home.models / ".orphaned").iterdir()
    assert (aside / "model.safetensors").exists() and db.events(kind="version_folder_set_aside")
    assert [v.path for v in db.versions()] == [str(home.models / "v0001")]
    db.close()
