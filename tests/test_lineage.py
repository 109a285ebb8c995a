"""Named lineages (issue 18): each a chain of versions with its own current pointer, gate and memory.

The pure parts (names, pointer names, where an inbox path puts a file) as unit tests; the rest through
``Daemon.tick`` with the stub worker and gate (``tests/daemon_stubs.py``) on a real home, on SQLite and a
real PostgreSQL: files in ``inbox/<lineage>/`` and a sidecar's ``lineage`` build two chains that never
cross, promote and rollback move one lineage's pointer, a broken pointer is repaired within its lineage,
and ``trainbox models --lineage`` shows one chain. No torch: a few seconds per backend."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from daemon.inbox_scan import Placement, placement, scan_inbox
from daemon.main import Daemon
from management.db import ModelDB
from management.versions import current_id, rollback
from tests.daemon_stubs import tick_until
from tests.test_daemon_tick import daemon_db_url, drop, home, make_daemon  # noqa: F401 - fixtures
from trainbox.config import ConfigError, JobOverrides, load_sidecar
from trainbox.home import Home
from trainbox.lineage import MAIN, LineageError, check_lineage, lineage_of_pointer, pointer_name
from trainbox.states import JobState, Priority


def test_names_and_pointers() -> None:
    assert check_lineage("chat-v2_x") == "chat-v2_x" and check_lineage("0") == "0"
    for bad in ("", "Chat", "-x", "a/b", "..", "a b", "x" * 33, "high", "low", "normal", "é"):
        with pytest.raises(LineageError):
            check_lineage(bad)
    assert pointer_name(MAIN) == "current" and pointer_name("chat") == "current@chat"
    assert lineage_of_pointer("current") == MAIN and lineage_of_pointer("current@chat") == "chat"
    assert lineage_of_pointer("current@Bad") is None and lineage_of_pointer("v0001") is None


def test_where_an_inbox_path_puts_a_file(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    assert placement(inbox, inbox / "a.jsonl") == Placement(None, None)
    assert placement(inbox, inbox / "HIGH" / "a.jsonl") == Placement(None, Priority.HIGH)
    assert placement(inbox, inbox / "chat" / "a.jsonl") == Placement("chat", None)
    assert placement(inbox, inbox / "chat" / "low" / "a.jsonl") == Placement("chat", Priority.LOW)
    for odd in ("Chat/a.jsonl", "high/chat/a.jsonl", "chat/other/a.jsonl", "chat/low/x/a.jsonl"):
        assert placement(inbox, inbox / odd) is None, odd
    assert placement(inbox, tmp_path / "a.jsonl") is None


def test_the_scan_takes_lineage_folders_and_refuses_the_rest(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    for rel in ("a.jsonl", "chat/b.jsonl", "chat/high/c.jsonl", "Bad Name/d.jsonl", "chat/other/e.jsonl"):
        (inbox / rel).parent.mkdir(parents=True, exist_ok=True)
        (inbox / rel).write_text("{}\n")
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", inbox / "linked")  # a symlink where a lineage folder would be
    listing = scan_inbox(inbox)
    assert sorted(p.relative_to(inbox).as_posix() for p in listing.candidates) == [
        "a.jsonl",
        "chat/b.jsonl",
        "chat/high/c.jsonl",
    ]
    refused = {r.path.relative_to(inbox).as_posix(): r.reason for r in listing.refused}
    assert set(refused) == {"Bad Name", "chat/other", "linked"}
    assert "lineage name" in refused["Bad Name"] and "not followed" in refused["linked"]


def test_a_sidecar_names_a_lineage_or_is_refused_saying_why(tmp_path: Path) -> None:
    assert JobOverrides.model_validate({"lineage": "chat"}).lineage == "chat"
    bad = tmp_path / "a.json"
    bad.write_text(json.dumps({"lineage": "Chat Bot"}))
    with pytest.raises(ConfigError, match=r"a.json: lineage: .*'Chat Bot' is not a valid name \(1-32 characters"):
        load_sidecar(bad)


def version_of(db: ModelDB, name: str) -> tuple[int, int | None, str]:
    job = next(j for j in db.jobs() if j.name == name)
    v = db.version_of_job(job.id)
    assert v is not None, name
    return v.id, v.parent_id, v.lineage


def test_two_lineages_are_two_chains(home: Home, make_daemon: Callable[..., Daemon]) -> None:  # noqa: F811
    d = make_daemon()
    assert d.db is not None
    db = d.db
    drop(home, "a.jsonl")
    drop(home, "x.jsonl", "chat")
    tick_until(d, lambda: len(list(home.done.glob("*.jsonl"))) == 2, "a and x done")
    (home.inbox / "y.json").write_text(json.dumps({"lineage": "chat"}))  # a sidecar names the lineage
    drop(home, "y.jsonl")
    drop(home, "c.jsonl", "high")
    tick_until(d, lambda: len(list(home.done.glob("*.jsonl"))) == 4, "c and y done")
    bad = home.inbox / "z.json"
    bad.write_text(json.dumps({"lineage": "Not Valid"}))
    drop(home, "z.jsonl")
    tick_until(d, lambda: any(home.failed.glob("*z.jsonl.error.json")), "z rejected")

    a, x, y, c = (version_of(db, n) for n in ("a.jsonl", "x.jsonl", "y.jsonl", "c.jsonl"))
    assert a[1:] == (None, MAIN) and x[1:] == (None, "chat")  # each chain starts from the base model
    assert c == (c[0], a[0], MAIN) and y == (y[0], x[0], "chat")  # each continues its own lineage
    assert current_id(home) == c[0] and current_id(home, "chat") == y[0]
    assert os.readlink(home.models / "current@chat") == f"v{y[0]:04d}"
    jobs = {j.name: j for j in db.jobs()}
    assert (jobs["y.jsonl"].init_version, jobs["c.jsonl"].init_version) == (x[0], a[0])
    assert jobs["y.jsonl"].lineage == "chat" and "lineage" not in (jobs["y.jsonl"].settings or {})
    assert jobs["z.jsonl"].state == JobState.REJECTED.value and "not a valid name" in (jobs["z.jsonl"].error or "")
    assert db.lineages() == [MAIN, "chat"]

    # one lineage's rollback moves its pointer only
    assert rollback(home, db, "chat").id == x[0]
    assert current_id(home, "chat") == x[0] and current_id(home) == c[0]

    # a pointer naming another lineage's version is repaired at start, within its lineage
    d.shutdown()
    os.replace(home.models / "current", home.models / "current@chat")  # chat's pointer names main's c
    again = make_daemon()
    assert again.db is not None
    assert current_id(home, "chat") == x[0]  # chat's last promotion (the rollback)
    assert current_id(home) == c[0]  # main's pointer, missing, comes back from main's promotions

    url = again.settings.db.url
    if url:
        (home.root / "trainbox.toml").write_text(f'[db]\nurl = "{url}"\n')
    out = CliRunner().invoke(app, ["models", "--lineage", "chat", "--json", "--home", str(home.root)])
    assert out.exit_code == 0, out.output
    shown = json.loads(out.output)
    assert [v["version"] for v in shown["versions"]] == [x[0], y[0]] and shown["current"] == x[0]
    assert shown["lineages"] == {"chat": {"current": x[0]}}
    everything = json.loads(CliRunner().invoke(app, ["models", "--json", "--home", str(home.root)]).output)
    assert everything["lineages"] == {MAIN: {"current": c[0]}, "chat": {"current": x[0]}}
