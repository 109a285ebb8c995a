"""``[storage] shared`` (issue 18): what every host of a fleet must read lives in one shared folder (inbox,
spool, runs, model versions, memory), what is the host's own stays in its home (config, status, control,
logs, cache, the lock). One daemon (the stub worker and gate, ``tests/daemon_stubs.py``) on a home whose
storage is elsewhere takes a file from the shared inbox to the shared ``done/`` and version folder, and
writes nothing of it in its home."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.main import Daemon
from management.versions import current_id
from tests.daemon_stubs import daemon_factory, tick_until
from tests.test_daemon_tick import FAST, drop
from trainbox.config import Settings
from trainbox.home import Home, shared_storage
from trainbox.status import DAEMON_STATUS


def test_the_home_reads_its_shared_folder_from_its_config(tmp_path: Path) -> None:
    root = tmp_path / "host-a"
    root.mkdir()
    assert Home.resolve(root).storage == root  # no config: the home is its own storage
    (root / "trainbox.toml").write_text('[storage]\nshared = "../nfs"\n')
    home = Home.resolve(root)
    assert home.shared == shared_storage(root) == (tmp_path / "nfs").resolve()
    assert home.inbox == tmp_path / "nfs" / "inbox" and home.runs == tmp_path / "nfs" / "runs"
    assert home.models == tmp_path / "nfs" / "models" and home.memory == tmp_path / "nfs" / "memory"
    assert home.status == root.resolve() / "status" and home.control == root.resolve() / "control"
    assert home.db_file == root.resolve() / "trainbox.db" and home.cache == root.resolve() / "cache"
    (root / "trainbox.toml").write_text("[storage\n")  # unreadable: left to the settings loader to report
    assert Home.resolve(root).shared is None
    assert Settings.model_validate({"storage": {"shared": "/mnt/x"}}).storage.shared == "/mnt/x"


@pytest.fixture
def shared_home(tmp_path: Path) -> Home:
    return Home(tmp_path / "host-a", tmp_path / "nfs").ensure()


@pytest.fixture
def make_daemon(shared_home: Home) -> Iterator[object]:
    yield from daemon_factory(shared_home, Settings.model_validate({"daemon": FAST}))


def test_a_daemon_trains_from_the_shared_folder_and_keeps_only_its_own_files_at_home(
    shared_home: Home, make_daemon: object, tmp_path: Path
) -> None:
    d: Daemon = make_daemon()  # type: ignore[operator]
    drop(shared_home, "a.jsonl", "high")
    tick_until(d, lambda: len(list(shared_home.done.glob("*.jsonl"))) == 1, "a done")
    assert str(shared_home.done).startswith(str(tmp_path / "nfs"))
    assert current_id(shared_home) == 1 and (tmp_path / "nfs" / "models" / "v0001").is_dir()
    assert (tmp_path / "nfs" / "runs" / "job-000001").is_dir()
    assert (shared_home.root / "status" / DAEMON_STATUS).is_file()
    home_entries = {p.name for p in shared_home.root.iterdir()}
    assert not home_entries & {"inbox", "queue", "runs", "models", "memory"}, home_entries
