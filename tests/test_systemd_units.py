"""sd_notify against a real unix datagram socket; unit files (accounts, sandboxing, quoting) checked as text and
by systemd-analyze where available."""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from cli.systemd import UNITS, RunAs, UnitError, choose_protect_home, install, render, resolve_run_as
from trainbox import sdnotify

REPO = Path(__file__).resolve().parent.parent


def _receive(sock: socket.socket) -> str:
    sock.settimeout(5)
    return sock.recv(4096).decode()


def test_notify_path_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert sdnotify.ready("daemon up")
        assert _receive(sock) == "READY=1\nSTATUS=daemon up"
        assert sdnotify.watchdog_ping()
        assert _receive(sock) == "WATCHDOG=1"


def test_notify_abstract_socket_and_absent(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"trainbox-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.stopping()
        assert _receive(sock) == "STOPPING=1"
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert sdnotify.watchdog_ping() is False  # not under systemd: a no-op


def test_daemon_sends_ready_and_watchdog_pings(tmp_path: Path) -> None:
    """A real daemon process with NOTIFY_SOCKET set: READY=1 at start, WATCHDOG=1 every tick."""
    path = tmp_path / "n.sock"
    home = tmp_path / "home"
    home.mkdir()
    (home / "trainbox.toml").write_text("[daemon]\npoll_interval = 0.1\n")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(30)
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli", "daemon", "--home", str(home)],
            env={**os.environ, "NOTIFY_SOCKET": str(path)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            messages = [sock.recv(4096).decode() for _ in range(3)]
        finally:
            proc.terminate()
            assert proc.wait(30) == 0
    assert messages[0].startswith("READY=1")
    assert "WATCHDOG=1" in messages[1:]


def _service(text: str, key: str) -> list[str]:
    """The values of ``key=`` lines."""
    return [line.split("=", 1)[1] for line in text.splitlines() if line.startswith(key + "=")]


def test_units_render_and_ship_in_sync(tmp_path: Path) -> None:
    written = install(tmp_path / "home", user_mode=True, target_dir=tmp_path / "units", python="/usr/bin/python3")
    assert sorted(p.name for p in written) == sorted([*UNITS, "trainbox.target"])
    daemon = (tmp_path / "units" / "trainbox-daemon.service").read_text()
    for line in ("Type=notify", "Restart=on-failure", "KillSignal=SIGTERM", "WatchdogSec=", "TimeoutStopSec=300"):
        assert line in daemon
    assert f"--home {tmp_path / 'home'}" in daemon
    shipped = render("/opt/trainbox/.venv/bin/python", "/var/lib/trainbox", False, RunAs("trainbox", "trainbox"))
    for name, text in shipped.items():
        assert (REPO / "scripts" / "systemd" / name).read_text() == text, f"scripts/systemd/{name} is stale"


def test_system_units_run_as_an_account_in_a_sandbox() -> None:
    units = render("/opt/tb/.venv/bin/python", "/srv/tb", False, RunAs("svc", "svcgroup"))
    for name in UNITS:
        text = units[name]
        assert (_service(text, "User"), _service(text, "Group")) == (["svc"], ["svcgroup"])
        assert _service(text, "ProtectSystem") == ["strict"] and _service(text, "ProtectHome") == ["yes"]
        assert _service(text, "ReadWritePaths") == ["/srv/tb"]
        assert _service(text, "NoNewPrivileges") == ["yes"] and _service(text, "PrivateTmp") == ["yes"]
        assert "XDG_CACHE_HOME=/srv/tb/cache/xdg" in _service(text, "Environment")[0]  # caches inside the home
    assert "User=" not in units["trainbox.target"]
    read_only = render(
        "/home/me/tb/.venv/bin/python", "/home/me/tb", False, RunAs("me", "me"), protect_home="read-only"
    )
    assert _service(read_only["trainbox-daemon.service"], "ProtectHome") == ["read-only"]


def test_user_units_have_no_account_and_no_mount_sandbox() -> None:
    units = render("/home/me/.venv/bin/python", "/home/me/tb", True)
    for name in UNITS:
        text = units[name]
        assert _service(text, "User") == [] and _service(text, "Group") == []
        assert _service(text, "NoNewPrivileges") == ["yes"]
        for key in ("ProtectSystem", "ProtectHome", "PrivateTmp", "ReadWritePaths"):
            assert _service(text, key) == [], key  # a user manager may lack the user namespace they need
    assert "WantedBy=default.target" in units["trainbox.target"]
    with pytest.raises(UnitError, match="--user"):
        install(Path("/home/me/tb"), user_mode=True, run_as=RunAs("me", "me"))


def test_paths_are_escaped_for_each_setting() -> None:
    home = "/srv/tb home 100%$x"
    units = render("/opt/my tb/bin/python", home, False, RunAs("svc", "svc"))
    text = units["trainbox-daemon.service"]
    assert _service(text, "ExecStart") == [
        '"/opt/my tb/bin/python" -m cli daemon --home "/srv/tb home 100%%$$x"'  # $ expands in arguments only
    ]
    assert _service(text, "WorkingDirectory") == ["/srv/tb home 100%%$x"]  # a single path: no quotes
    assert _service(text, "ReadWritePaths") == ['"/srv/tb home 100%%$x"']  # a list: quoted
    assert _service(text, "Environment") == [
        'PYTHONUNBUFFERED=1 "TRAINBOX_HOME=/srv/tb home 100%%$x" "XDG_CACHE_HOME=/srv/tb home 100%%$x/cache/xdg"'
    ]
    assert _service(text, "Documentation") == ["file:///srv/tb%%20home%%20100%%25%%24x/trainbox.toml"]
    plain = render("/usr/bin/python3", "/srv/tb", False, RunAs("svc", "svc"))["trainbox-server.service"]
    assert _service(plain, "ExecStart") == ["/usr/bin/python3 -m monitoring.server --home /srv/tb"]


@pytest.mark.parametrize(
    "home", ['/srv/a"b', "/srv/a'b", "/srv/a\\b", "/srv/a\nb", "relative/home", "/srv/tb ", "/srv/../x"]
)
def test_paths_systemd_cannot_carry_are_refused(home: str) -> None:
    with pytest.raises(UnitError, match="the home"):
        render("/usr/bin/python3", home, False, RunAs("svc", "svc"))


def test_protect_home_follows_what_the_services_read() -> None:
    assert choose_protect_home(["/srv/tb", "/opt/tb/.venv/bin/python"]) == "yes"
    assert choose_protect_home(["/srv/tb", "/home/me/.venv/bin/python"]) == "read-only"
    assert choose_protect_home(["/root/.pyenv/versions/3.11/bin/python3.11"]) == "read-only"
    assert choose_protect_home(["/homestead/tb", "/rooted"]) == "yes"  # a prefix of the name is not inside
    assert choose_protect_home(["/srv/tb"], "read-only") == "read-only"
    with pytest.raises(UnitError, match="would hide /home/me/models"):
        choose_protect_home(["/srv/tb", "/home/me/models"], "yes")


def test_run_as_defaults_to_the_home_owner_and_refuses_root(tmp_path: Path) -> None:
    owner = pwd.getpwuid(tmp_path.stat().st_uid)
    if owner.pw_uid != 0:  # as a normal user: the home is mine
        assert resolve_run_as(tmp_path).user == owner.pw_name
    with pytest.raises(
        UnitError, match=r"refusing to write units that run as user root \(the owner of /usr\).*--allow-root"
    ):
        resolve_run_as(Path("/usr"))  # owned by root everywhere
    assert resolve_run_as(Path("/usr"), allow_root=True) == RunAs("root", grp.getgrgid(0).gr_name)
    with pytest.raises(UnitError, match="run as user root"):
        resolve_run_as(tmp_path, "root")
    with pytest.raises(UnitError, match="no user 'no-such-user-xyz'"):
        resolve_run_as(tmp_path, "no-such-user-xyz")
    with pytest.raises(UnitError, match="does not exist"):
        resolve_run_as(tmp_path / "missing", "nobody")


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_run_as_the_home_owner_when_root_installs(tmp_path: Path) -> None:
    """The usual case: root writes the units for a home that belongs to a service account."""
    nobody = pwd.getpwnam("nobody")
    home = tmp_path / "home"
    home.mkdir()
    os.chown(home, nobody.pw_uid, nobody.pw_gid)
    account = resolve_run_as(home)
    assert account.user == "nobody" and account.group != "root"
    with pytest.raises(UnitError, match="group root"):
        resolve_run_as(home, group="root")


def _cli(*args: str, home: Path | str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "cli", "install-systemd", "--home", str(home), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "300"})


def test_install_systemd_command(tmp_path: Path) -> None:
    out = _cli("--dir", str(tmp_path / "refused"), home="/usr")
    assert out.returncode == 2 and "refusing to write units that run as user root" in out.stdout, out.stdout
    assert not (tmp_path / "refused").exists()
    home = tmp_path / "home"
    home.mkdir()
    (home / "trainbox.toml").write_text("[daemon]\nworker_stop_timeout = 600\n")
    out = _cli("--dir", str(tmp_path / "units"), "--run-as", "nobody", "--protect-home", "read-only", home=home)
    assert out.returncode == 0, out.stdout + out.stderr
    daemon = (tmp_path / "units" / "trainbox-daemon.service").read_text()
    assert _service(daemon, "User") == ["nobody"] and _service(daemon, "ProtectHome") == ["read-only"]
    assert _service(daemon, "TimeoutStopSec") == ["780"]  # worker_stop_timeout + a checkpoint save
    assert "the services run as nobody:" in out.stdout
    out = _cli("--user", "--run-as", "nobody", "--dir", str(tmp_path / "u"), home=home)
    assert out.returncode == 2 and "for system units" in out.stdout
    out = _cli("--user", "--dir", str(tmp_path / "u"), home=home)
    assert out.returncode == 0 and "User=" not in (tmp_path / "u" / "trainbox-daemon.service").read_text()


def _verify(files: list[Path], *mode: str, env: dict[str, str] | None = None) -> str:
    cmd = ["systemd-analyze", *mode, "verify", "--man=no", "--generators=no", *map(str, files)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})})
    return f"rc={out.returncode}\n{out.stdout}{out.stderr}".strip()


def _weird_install(tmp_path: Path) -> tuple[Path, Path]:
    """A home whose path holds a space and a %, with the interpreter inside it (a real executable). "%c" is a
    (deprecated) specifier that systemd-analyze warns about, so a % left unescaped anywhere shows."""
    home = tmp_path / "tb home 100%c"
    python = home / "venv dir" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.symlink_to(sys.executable)
    return home, python


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed (apt: systemd)")
def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    """No warning at all, for system and user units. --man=no: Documentation= names no man page to look up;
    --generators=no: generators need privileges and concern other units. The user manager needs a runtime
    folder, which a container or CI job may not have: a private one is given."""
    home, python = _weird_install(tmp_path)
    account = RunAs("trainbox-svc", "trainbox-svc")  # need not exist; "nobody" would be flagged as unsafe
    for user_mode, mode in ((False, ("--system",)), (True, ("--user",))):
        folder = tmp_path / ("user" if user_mode else "system")
        folder.mkdir()
        units = render(str(python), str(home), user_mode, None if user_mode else account, protect_home="read-only")
        for name, text in units.items():
            (folder / name).write_text(text)
        files = [folder / n for n in ("trainbox.target", *UNITS)]
        # short: the user manager's sockets live here, and a socket path has at most 107 bytes
        runtime = Path(tempfile.mkdtemp(prefix="rt-")) / folder.name
        runtime.mkdir(mode=0o700)
        assert _verify(files, *mode, env={"XDG_RUNTIME_DIR": str(runtime)}) == "rc=0", folder.name
    # the check can fail: the same units with a % or the quotes left as they are get warnings
    for flaw, expected in (("%", "Specifier '%c' used"), ('"', "is not executable")):
        broken = tmp_path / f"broken-{ord(flaw)}"
        broken.mkdir()
        for name, text in render(str(python), str(home), False, account).items():
            (broken / name).write_text(text.replace("%%", "%") if flaw == "%" else text.replace('"', ""))
        report = _verify([broken / n for n in ("trainbox.target", *UNITS)], "--system")
        assert expected in report, report
