"""Admission against files a careless or hostile user drops: nothing outside the home is read,
moved or echoed; one bad file never stops admission; a file and its sidecar move as one unit."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon import admission as admission_module
from daemon.admission import Admission
from daemon.admission_recovery import MAX_DECIDE_ATTEMPTS
from daemon.inbox_report import InboxHousekeeping
from daemon.inbox_scan import scan_inbox
from daemon.staging import Intent
from management.db import ModelDB
from trainbox.config import DaemonConfig
from trainbox.home import Home
from trainbox.safefs import NotRegularFile, display_name
from trainbox.spool import Spool
from trainbox.states import JobState, Priority

GOOD = '{"text": "hello"}\n{"text": "world"}\n'


@pytest.fixture
def env(tmp_path: Path) -> Iterator[tuple[Home, Admission, ModelDB, Path]]:
    home = Home(tmp_path / "home").ensure()
    spool = Spool(home)
    spool.ensure()
    db = ModelDB(home.db_url)
    decoy = tmp_path / "decoy"
    (decoy / "sub").mkdir(parents=True)
    (decoy / "secret.jsonl").write_text('{"text": "TOP-SECRET-LINE"}\n')
    (decoy / "passwd").write_text("root:x:0:0:SECRET-PASSWD\n")
    (decoy / "sub" / "x.toml").write_text("max_steps = 1\n")
    yield home, Admission(home, spool, db, DaemonConfig(max_line_bytes=8192)), db, decoy
    db.close()


def _fingerprint(folder: Path) -> dict[str, tuple[int, str]]:
    return {
        str(p.relative_to(folder)): (
            p.lstat().st_mode,
            hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "",
        )
        for p in sorted(folder.rglob("*"))
    }


def _home_text(home: Home) -> str:
    """Everything admission wrote that a user or the API can read: error files and DB events."""
    parts = [p.read_text(errors="replace") for p in home.failed.glob("*.error.json")]
    return "\n".join(parts)


def test_symlinks_fifos_sockets_and_folders_are_refused_and_left(env: tuple[Home, Admission, ModelDB, Path]) -> None:
    home, adm, _db, decoy = env
    before = _fingerprint(decoy)
    inbox = home.inbox
    os.symlink(decoy, inbox / "harmless.jsonl")
    os.symlink(decoy / "secret.jsonl", inbox / "secret.jsonl")
    os.symlink(decoy / "passwd", inbox / "high" / "p.jsonl")
    os.symlink("nowhere/at/all", inbox / "dangling.jsonl")
    os.symlink(inbox / "loop-b.jsonl", inbox / "loop-a.jsonl")
    os.symlink(inbox / "loop-a.jsonl", inbox / "loop-b.jsonl")
    (inbox / "low").rmdir()
    os.symlink(decoy / "sub", inbox / "low")  # a symlink where a priority folder belongs
    os.mkfifo(inbox / "fifo.jsonl")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(inbox / "sock.jsonl"))
    (inbox / "folder.jsonl").mkdir()
    (inbox / "high" / "nested").mkdir()
    (decoy / "hard.jsonl").write_text(GOOD)
    os.link(decoy / "hard.jsonl", inbox / "hard.jsonl")
    before = _fingerprint(decoy)
    listing = scan_inbox(inbox)
    assert listing.candidates == [] and listing.sidecars == []
    refused = {str(r.path.relative_to(inbox)): r.kind for r in listing.refused}
    assert refused == {
        "harmless.jsonl": "symbolic link",
        "secret.jsonl": "symbolic link",
        "high/p.jsonl": "symbolic link",
        "dangling.jsonl": "symbolic link",
        "loop-a.jsonl": "symbolic link",
        "loop-b.jsonl": "symbolic link",
        "low": "symbolic link",
        "fifo.jsonl": "FIFO (named pipe)",
        "sock.jsonl": "socket",
        "folder.jsonl": "folder",
        "high/nested": "folder",
        "hard.jsonl": "regular file",
    }
    for name in refused:  # admission itself refuses them too (a path that turned into one since the scan)
        with pytest.raises(NotRegularFile):
            adm.admit(inbox / name)
    sock.close()
    assert _fingerprint(decoy) == before
    assert sorted(p.name for p in inbox.iterdir()) == sorted({n.split("/")[0] for n in refused} | {"normal"})
    assert not any(home.failed.iterdir())


def test_sidecar_eval_file_outside_the_home_is_refused_without_echo(env: tuple[Home, Admission, ModelDB, Path]) -> None:
    home, adm, db, decoy = env
    before = _fingerprint(decoy)
    cases = {
        "abs": f'eval_file = "{decoy / "secret.jsonl"}"',
        "rel": 'eval_file = "../../decoy/secret.jsonl"',
        "tilde": 'eval_file = "~nosuchuser/x.jsonl"',
        "home": 'eval_file = "~/x.jsonl"',
        "proc": 'eval_file = "/proc/self/mem"',
    }
    os.symlink(decoy / "secret.jsonl", home.root / "link-out.jsonl")
    cases["via-link"] = f'eval_file = "{home.root / "link-out.jsonl"}"'
    for name, line in cases.items():
        (home.inbox / f"{name}.toml").write_text(line + "\n")
        (home.inbox / f"{name}.jsonl").write_text(GOOD.replace("hello", name))
        result = adm.admit(home.inbox / f"{name}.jsonl")
        assert result.state == JobState.REJECTED, name
        assert "eval_file" in result.reason, (name, result.reason)
    text = _home_text(home) + "\n".join(e.message for e in db.events())
    assert "TOP-SECRET" not in text and "SECRET-PASSWD" not in text
    assert _fingerprint(decoy) == before
    assert not any(home.inbox.glob("*.toml"))  # each sidecar went with its file


def test_eval_file_inside_home_is_copied_and_one_beside_the_sidecar_moves_with_the_job(
    env: tuple[Home, Admission, ModelDB, Path],
) -> None:
    home, adm, _db, _decoy = env
    (home.root / "shared-eval.jsonl").write_text('{"text": "eval"}\n')
    (home.inbox / "a.toml").write_text('eval_file = "../shared-eval.jsonl"\n')
    (home.inbox / "a.jsonl").write_text(GOOD)
    a = adm.admit(home.inbox / "a.jsonl")
    assert a.state == JobState.QUEUED, a.reason
    assert (home.run_dir(a.job_id) / "eval.jsonl").read_text() == '{"text": "eval"}\n'
    assert (home.root / "shared-eval.jsonl").exists()
    housekeeping = InboxHousekeeping(home, adm.db, adm.config)
    (home.inbox / "b.toml").write_text('eval_file = "b-val.jsonl"\n')
    (home.inbox / "b-val.jsonl").write_text('{"text": "held out"}\n')
    (home.inbox / "b.jsonl").write_text(GOOD.replace("hello", "bee"))
    ready = [home.inbox / "b-val.jsonl", home.inbox / "b.jsonl"]
    assert housekeeping.held(ready) == {home.inbox / "b-val.jsonl"}  # not a job of its own
    b = adm.admit(home.inbox / "b.jsonl")
    assert b.state == JobState.QUEUED, b.reason
    assert (home.run_dir(b.job_id) / "eval.jsonl").read_text() == '{"text": "held out"}\n'
    assert sorted(p.name for p in home.inbox.iterdir() if p.is_file()) == []


def test_two_sidecars_reject_the_unit_together(env: tuple[Home, Admission, ModelDB, Path]) -> None:
    home, adm, _db, _decoy = env
    (home.inbox / "x.toml").write_text("max_steps = 1\n")
    (home.inbox / "x.json").write_text('{"max_steps": 2}')
    (home.inbox / "x.jsonl").write_text(GOOD)
    result = adm.admit(home.inbox / "x.jsonl")
    assert result.state == JobState.REJECTED and "two sidecars" in result.reason
    assert sorted(p.name for p in home.failed.iterdir()) == sorted(
        [result.path.name, result.path.name + ".error.json", result.path.stem + ".toml", result.path.stem + ".json"]
    )


def test_bom_upper_case_suffix_and_folder_case(env: tuple[Home, Admission, ModelDB, Path]) -> None:
    home, adm, _db, _decoy = env
    (home.inbox / "HIGH").mkdir()
    (home.inbox / "HIGH" / "Data.JSONL").write_bytes(b"\xef\xbb\xbf" + GOOD.encode())
    (home.inbox / "HIGH" / "Data.toml").write_bytes(b"\xef\xbb\xbfmax_steps = 3\n")
    result = adm.admit(home.inbox / "HIGH" / "Data.JSONL")
    assert result.state == JobState.QUEUED, result.reason
    assert result.path.parent == home.waiting(Priority.HIGH) and result.path.name.endswith("__Data.jsonl")
    assert Spool(home).waiting()[0].path == result.path


def test_hostile_names_are_stored_printable(env: tuple[Home, Admission, ModelDB, Path]) -> None:
    home, adm, db, _decoy = env
    raw = os.fsencode(home.inbox) + b"/bad-\xff\xfe-name.jsonl"
    with open(raw, "wb") as f:
        f.write(GOOD.encode())
    rtl = home.inbox / "invoice\u202egnp.jsonl"
    rtl.write_text(GOOD.replace("hello", "rtl"))
    a = adm.admit(Path(os.fsdecode(raw)))
    b = adm.admit(rtl)
    assert a.state == b.state == JobState.QUEUED
    names = [db.job(a.job_id).name, db.job(b.job_id).name]  # type: ignore[union-attr]
    assert names == ["bad-\\xff\\xfe-name.jsonl", "invoice\\u202egnp.jsonl"]
    assert display_name("ok.jsonl") == "ok.jsonl"
    json.dumps(names).encode("utf-8")  # storable and printable everywhere


def test_parser_limits_name_the_line(env: tuple[Home, Admission, ModelDB, Path]) -> None:
    home, adm, _db, _decoy = env
    lines = [
        '{"text": "fine"}',
        "[" * 3000,
        '{"text": "n", "x": ' + "9" * 5000 + "}",
        '{"text": "' + "y" * 9000 + '"}',  # above the fixture's max_line_bytes = 8192
        '{"text": "\\ud800"}',
        '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "\\udfff b"}]}',
    ]
    (home.inbox / "limits.jsonl").write_text("\n".join(lines) + "\n")
    result = adm.admit(home.inbox / "limits.jsonl")
    assert result.state == JobState.REJECTED
    errors = json.loads(result.path.with_name(result.path.name + ".error.json").read_text())["validation"]["errors"]
    by_line = {e["line"]: (e["field"], e["reason"]) for e in errors}
    assert sorted(by_line) == [2, 3, 4, 5, 6]
    assert "nested deeper" in by_line[2][1]
    assert "digits" in by_line[3][1]
    assert "longer than 8192 bytes" in by_line[4][1]
    assert by_line[5][0] == "text" and "surrogate" in by_line[5][1]
    assert by_line[6][0] == "messages[1].content"


def test_one_failing_file_goes_to_failed_as_internal_and_the_next_is_admitted(
    env: tuple[Home, Admission, ModelDB, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    home, adm, _db, _decoy = env
    real = admission_module.Admission.check_validated

    def explode(self: Admission, staged: admission_module.Staged) -> None:
        if "boom" in staged.data.name:
            raise RecursionError("maximum recursion depth exceeded")
        real(self, staged)

    monkeypatch.setattr(admission_module.Admission, "check_validated", explode)
    (home.inbox / "boom.jsonl").write_text(GOOD)
    (home.inbox / "fine.jsonl").write_text(GOOD.replace("hello", "fine"))
    results = adm.work([home.inbox / "boom.jsonl", home.inbox / "fine.jsonl"], budget_s=30)
    assert [r.state for r in results] == [JobState.REJECTED, JobState.QUEUED]
    error = json.loads(results[0].path.with_name(results[0].path.name + ".error.json").read_text())
    assert error["class"] == "internal" and "RecursionError" in error["reason"]
    assert any("RecursionError" in line for line in error["traceback"])


def test_big_file_is_validated_in_slices(env: tuple[Home, Admission, ModelDB, Path]) -> None:
    home, adm, _db, _decoy = env
    (home.inbox / "big.jsonl").write_text(
        "".join(f'{{"text": "line {i}"}}\n' for i in range(80_000))
    )  # above the batch's 1 MiB
    clock = iter(float(i) for i in range(10**6)).__next__  # every look at the clock is one "second" later
    slices = 0
    results = adm.work([home.inbox / "big.jsonl"], budget_s=3, clock=clock)
    while not results:
        assert adm.busy
        slices += 1
        results = adm.work([], budget_s=3, clock=clock)
    assert slices >= 5 and results[0].state == JobState.QUEUED and not adm.busy


def test_a_unit_interrupted_between_its_renames_is_claimed_whole(env: tuple[Home, Admission, ModelDB, Path]) -> None:
    home, adm, db, _decoy = env
    (home.inbox / "u.toml").write_text('priority = "high"\nmax_steps = 2\n')
    (home.inbox / "u.jsonl").write_text(GOOD)
    real_claim = admission_module.claim
    calls = []

    def die_on_data(src: Path, dst: Path, name: str) -> Path:
        calls.append(src.name)
        if src.name == "u.jsonl":
            raise KeyboardInterrupt  # stands for a kill -9 between the sidecar's and the data file's rename
        return real_claim(src, dst, name)

    admission_module.claim = die_on_data  # type: ignore[assignment]
    try:
        with pytest.raises(KeyboardInterrupt):
            adm.admit(home.inbox / "u.jsonl")
    finally:
        admission_module.claim = real_claim  # type: ignore[assignment]
    assert calls == ["u.toml", "u.jsonl"] and (home.inbox / "u.jsonl").exists()
    fresh = Admission(home, adm.spool, db, adm.config)
    assert fresh.recover() == []
    [result] = fresh.work([], budget_s=30)
    assert result.state == JobState.QUEUED and result.path.parent == home.waiting(Priority.HIGH)
    assert (home.run_dir(result.job_id) / "sidecar.toml").exists() and not any(home.inbox.glob("u.*"))
    assert db.job(result.job_id).settings == {"max_steps": 2}  # type: ignore[union-attr]


def test_a_file_the_daemon_died_on_twice_is_quarantined(
    env: tuple[Home, Admission, ModelDB, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    home, adm, db, _decoy = env
    (home.inbox / "killer.jsonl").write_text(GOOD)
    staged = adm.begin(home.inbox / "killer.jsonl")

    def die(self: Admission, staged: admission_module.Staged) -> None:
        raise KeyboardInterrupt  # stands for a kill -9 while the file is decided

    for attempt in range(MAX_DECIDE_ATTEMPTS):
        current = adm
        if attempt:  # the restarted daemon takes the file up again, one at a time
            current = Admission(home, adm.spool, db, adm.config)
            assert current.recover() == []
            staged = current.backlog[0]
        assert isinstance(staged, admission_module.Staged)
        with monkeypatch.context() as m:
            m.setattr(Admission, "_prepare", die)
            with pytest.raises(KeyboardInterrupt):
                current.advance(staged, 10.0)
    last = Admission(home, adm.spool, db, adm.config)
    [result] = last.recover()
    assert result.state == JobState.REJECTED and "stopped 2 times" in result.reason
    assert Intent.all(adm.spool.admitting) == [] and not any(adm.spool.admitting.iterdir())


def test_orphan_sidecar_is_filed_after_its_wait(env: tuple[Home, Admission, ModelDB, Path]) -> None:
    home, adm, db, _decoy = env
    (home.inbox / "late.jsonl").write_text(GOOD)
    first = adm.admit(home.inbox / "late.jsonl")
    (home.inbox / "late.toml").write_text("max_steps = 1\n")  # dropped after its file
    housekeeping = InboxHousekeeping(home, db, DaemonConfig(sidecar_wait_seconds=60))
    mtime = (home.inbox / "late.toml").stat().st_mtime
    housekeeping.on_listing(scan_inbox(home.inbox), mtime + 10)
    assert (home.inbox / "late.toml").exists()
    housekeeping.on_listing(scan_inbox(home.inbox), mtime + 61)
    assert not (home.inbox / "late.toml").exists()
    [error] = [p for p in home.failed.glob("*.error.json")]
    assert f"admitted as job {first.job_id} without it" in json.loads(error.read_text())["reason"]
    assert db.job(first.job_id + 1).state == JobState.REJECTED.value  # type: ignore[union-attr]


def test_many_small_files_are_admitted_in_batches_and_duplicates_caught(
    env: tuple[Home, Admission, ModelDB, Path],
) -> None:
    home, adm, db, _decoy = env
    paths = []
    for i in range(450):
        p = home.inbox / f"f{i:04d}.jsonl"
        p.write_text(f'{{"text": "file {i % 400}"}}\n')  # the last 50 repeat earlier files
        paths.append(p)
    (home.inbox / "f0007.jsonl").write_text("{broken\n")  # so f0407 ("file 7") is no duplicate
    results = adm.work(paths, budget_s=600)
    states = [r.state for r in results]
    assert len(results) == 450 and not any(home.inbox.glob("*.jsonl"))
    assert states.count(JobState.QUEUED) == 400 and states.count(JobState.REJECTED) == 50
    reasons = sorted({r.reason.split(" of job")[0] for r in results if r.state == JobState.REJECTED})
    assert (
        len(reasons) == 2
        and reasons[0].startswith("1 invalid line(s): line 1: invalid JSON")
        and reasons[1] == "duplicate"
    )
    assert len(list(home.waiting(Priority.NORMAL).iterdir())) == 400
    assert not any(adm.spool.admitting.iterdir())
    assert len(db.events(kind="admitted")) == 400


def test_refused_entries_are_reported_once_by_a_real_daemon(tmp_path: Path, embedded: Path) -> None:
    """A real daemon: a symlink and a FIFO in the inbox are reported once (event, status file,
    ``trainbox queue``) and left alone, while a good file beside them is admitted."""
    from tests.e2e_helpers import DaemonProc, cli, make_home, wait_for

    home = make_home(tmp_path / "home", embedded)  # rescans every second
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.jsonl").write_text(GOOD)
    cli(home, "pause")
    daemon = DaemonProc(home)
    try:
        os.symlink(outside, home.inbox / "trap.jsonl")
        os.mkfifo(home.inbox / "pipe.jsonl")
        (home.inbox / "fine.jsonl").write_text(GOOD)
        wait_for(lambda: list(home.waiting(Priority.NORMAL).iterdir()), 60, "the good file queued")
        shown = wait_for(lambda: json.loads(cli(home, "queue", "--json").stdout)["inbox_refused"], 30, "the report")
        assert len(shown) == 2 and any("trap.jsonl" in line and "symbolic link" in line for line in shown)
        text = cli(home, "queue").stdout
        assert "never opened or moved" in text and "pipe.jsonl" in text
        time.sleep(2.5)  # more rescans: still one event each
        db = ModelDB(home.db_url)
        events = [e.message for e in db.events(kind="inbox_refused")]
        db.close()
        assert len(events) == 2, events
        assert daemon.alive() and (outside / "keep.jsonl").read_text() == GOOD
        assert os.path.islink(home.inbox / "trap.jsonl") and (home.inbox / "pipe.jsonl").exists()
    finally:
        assert daemon.stop() == 0


def test_a_unit_recovery_cannot_handle_is_set_aside_not_raised(env: tuple[Home, Admission, ModelDB, Path]) -> None:
    home, adm, db, _decoy = env
    (home.root / "not-a-folder").write_text("x")
    intent = Intent(77, "000077__odd.jsonl", str(home.root / "not-a-folder"), "odd.jsonl", ["odd.toml"])
    intent.save(adm.spool.admitting)  # its source "folder" is a file: claiming raises NotADirectoryError
    (home.inbox / "after.jsonl").write_text(GOOD)
    fresh = Admission(home, adm.spool, db, adm.config)
    [set_aside] = fresh.recover()
    assert set_aside.state == JobState.REJECTED and "NotADirectoryError" in set_aside.reason
    assert fresh.admit(home.inbox / "after.jsonl").state == JobState.QUEUED  # and admission goes on
    assert Intent.all(adm.spool.admitting) == []
