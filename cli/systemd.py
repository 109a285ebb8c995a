"""systemd unit files for one install and one home: ``trainbox install-systemd [--user]``.

Four services grouped by ``trainbox.target``. The daemon, watchdog and retention are
``Type=notify``: they send READY=1 once started and WATCHDOG=1 every loop (``trainbox/sdnotify.py``),
so systemd restarts one that hangs (``WatchdogSec``) or fails (``Restart=on-failure``); the watchdog
sees ``$INVOCATION_ID`` and leaves daemon restarts to systemd. ``ExecStart`` runs without a shell.
The daemon is stopped by SIGTERM to its main process only (``KillMode=mixed``): it asks the worker
to checkpoint and waits for it, so ``TimeoutStopSec`` is longer than ``daemon.worker_stop_timeout``
plus a checkpoint save; whatever is left at the timeout gets SIGKILL. ``scripts/systemd/`` holds the
units rendered for an example install (``/opt/trainbox``, home ``/var/lib/trainbox``).

Least privilege: trainbox trains on files strangers may drop into its inbox, so system units never
run as root unless asked to (``--allow-root``): ``User=``/``Group=`` default to the home's owner. The
whole filesystem is read-only to them (``ProtectSystem=strict``) but the home (``ReadWritePaths=``),
with a private ``/tmp`` and no privilege gain through setuid binaries. ``/home``, ``/root`` and
``/run/user`` are hidden (``ProtectHome=yes``), or made read-only when the install, the interpreter
or the home lives there. Nothing else is written outside the home: ``XDG_CACHE_HOME`` points library
caches into it. Devices stay visible (the GPU). User units (``--user``) run as their user already, and
a user manager can only mount-sandbox through an unprivileged user namespace (systemd 253+ turns
``PrivateUsers=`` on for it, older ones ignore the settings), so they get ``NoNewPrivileges=`` only.

Paths are written for systemd's parsers: ``%`` is a specifier (written ``%%``), ``$`` expands in
``ExecStart`` arguments (``$$``), and words with spaces are double-quoted where the setting is a list
(``ExecStart``, ``Environment``, ``ReadWritePaths``). Characters those parsers cannot carry reliably
(quotes, backslashes, control characters) are refused with a message instead.
"""

from __future__ import annotations

import grp
import os
import pwd
import shlex
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import quote

UNITS = (
    "trainbox-daemon.service",
    "trainbox-watchdog.service",
    "trainbox-retention.service",
    "trainbox-server.service",
)
HOME_DIRS = ("/home", "/root", "/run/user")  # what ProtectHome= covers
STOP_MARGIN = 180  # seconds beyond daemon.worker_stop_timeout for the daemon's TimeoutStopSec (a save)
ProtectHome = Literal["yes", "read-only"]


class UnitError(ValueError):
    """Units that must not be written as asked; the message says what to do instead."""


@dataclass(frozen=True)
class RunAs:
    """The account system units run under."""

    user: str
    group: str


_SERVICE = """\
[Unit]
Description={description}
Documentation={doc}
PartOf=trainbox.target
After=network.target{after}

[Service]
Type={type}
{notify}ExecStart={exec_start}
WorkingDirectory={workdir}
Environment=PYTHONUNBUFFERED=1 {env_home} {env_cache}
{sandbox}Restart=on-failure
RestartSec=5
KillSignal=SIGTERM
KillMode={kill_mode}
TimeoutStartSec={start_timeout}
TimeoutStopSec={stop_timeout}
{watchdog}
[Install]
WantedBy=trainbox.target
"""

_TARGET = """\
[Unit]
Description=trainbox: daemon, watchdog, checkpoint retention and status server
Wants={units}

[Install]
WantedBy={wanted_by}
"""

# module, description, type, watchdog seconds, stop timeout, kill mode, after
_SPECS = {
    "trainbox-daemon.service": (
        "cli daemon",
        "trainbox daemon: admits JSONL files from the inbox and trains them",
        "notify",
        120,
        300,
        "mixed",
        "",
    ),
    "trainbox-watchdog.service": (
        "cli watchdog",
        "trainbox watchdog: unhangs workers, writes crash reports",
        "notify",
        60,
        30,
        "control-group",
        " trainbox-daemon.service",
    ),
    "trainbox-retention.service": (
        "cli retention",
        "trainbox retention: deletes checkpoints by policy",
        "notify",
        900,
        120,
        "control-group",
        "",
    ),
    "trainbox-server.service": (
        "monitoring.server",
        "trainbox status server and dashboard",
        "exec",
        0,
        30,
        "control-group",
        "",
    ),
}


# --- escaping ------------------------------------------------------------------------------------


def unit_path(path: str, what: str) -> str:
    """``path`` if systemd can carry it in every setting used here, else UnitError naming ``what``."""
    if not os.path.isabs(path) or os.path.normpath(path) != path:
        raise UnitError(f"{what} {path!r} must be an absolute, normalised path")
    bad = sorted({c for c in path if c in "\"'\\" or ord(c) < 32 or ord(c) == 127 or "\udc80" <= c <= "\udcff"})
    if bad or path != path.rstrip():
        shown = ", ".join(repr(c) for c in bad) or "trailing whitespace"
        raise UnitError(
            f"{what} {path!r} holds characters systemd unit files cannot carry reliably ({shown}): "
            "move it (or a symlink to it) to a plainer path"
        )
    return path


def specifiers(text: str) -> str:
    """``%`` starts a systemd specifier (%h, %n, ...) in almost every setting: a literal one is ``%%``."""
    return text.replace("%", "%%")


def quoted(text: str) -> str:
    """One word of a whitespace-separated list setting; the caller has refused quotes and backslashes."""
    return f'"{specifiers(text)}"' if any(c.isspace() for c in text) else specifiers(text)


def exec_argument(text: str) -> str:
    """An ExecStart= argument: also ``$``, which systemd expands there (not in the executable's path)."""
    return quoted(text).replace("$", "$$")


def file_url(path: str) -> str:
    return specifiers("file://" + quote(path))


# --- rendering -----------------------------------------------------------------------------------


def sandbox_lines(home: str, user_mode: bool, run_as: RunAs | None, protect_home: ProtectHome) -> str:
    if user_mode:
        return "NoNewPrivileges=yes\n"
    account = f"User={specifiers(run_as.user)}\nGroup={specifiers(run_as.group)}\n" if run_as else ""
    return (
        f"{account}NoNewPrivileges=yes\nPrivateTmp=yes\nProtectSystem=strict\n"
        f"ProtectHome={protect_home}\nReadWritePaths={quoted(home)}\n"
    )


def render(
    python: str,
    home: str,
    user_mode: bool,
    run_as: RunAs | None = None,
    *,
    protect_home: ProtectHome = "yes",
    daemon_stop_timeout: int = 300,
) -> dict[str, str]:
    """File name -> content, for the interpreter ``python`` and the instance folder ``home``.

    ``run_as`` (system units): the account; None writes no ``User=`` (systemd's default is root, so
    ``install`` always passes one). User units never get ``User=``/``Group=``: a user manager runs
    everything as its user and refuses another."""
    python, home = unit_path(python, "the interpreter"), unit_path(home, "the home")
    sandbox = sandbox_lines(home, user_mode, run_as, protect_home)
    cache = os.path.join(home, "cache", "xdg")
    out = {}
    for name, (module, description, kind, wd, stop, kill_mode, after) in _SPECS.items():
        args = ["-m", *module.split(), "--home", home]
        out[name] = _SERVICE.format(
            description=description,
            doc=file_url(os.path.join(home, "trainbox.toml")),
            after=after,
            type=kind,
            notify="NotifyAccess=main\n" if kind == "notify" else "",
            exec_start=" ".join([quoted(python), *(exec_argument(a) for a in args)]),
            workdir=specifiers(home),
            env_home=quoted(f"TRAINBOX_HOME={home}"),
            env_cache=quoted(f"XDG_CACHE_HOME={cache}"),
            sandbox=sandbox,
            kill_mode=kill_mode,
            start_timeout=300 if name == "trainbox-daemon.service" else 90,
            stop_timeout=daemon_stop_timeout if name == "trainbox-daemon.service" else stop,
            watchdog=f"WatchdogSec={wd}\n" if wd else "",
        )
    out["trainbox.target"] = _TARGET.format(
        units=" ".join(UNITS), wanted_by="default.target" if user_mode else "multi-user.target"
    )
    return out


# --- choices for one machine ---------------------------------------------------------------------


def _under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def choose_protect_home(needed: Iterable[str], requested: ProtectHome | Literal["auto"] = "auto") -> ProtectHome:
    """``yes`` hides the home folders; ``read-only`` when something the services read lives in one."""
    inside = sorted({p for p in needed if any(_under(p, d) for d in HOME_DIRS)})
    if requested == "yes" and inside:
        raise UnitError(
            f"--protect-home yes would hide {', '.join(inside)} from the services (it is under "
            f"{' or '.join(HOME_DIRS)}): use --protect-home read-only (or auto)"
        )
    if requested != "auto":
        return requested
    return "read-only" if inside else "yes"


def needed_paths(home: Path, python: str, extra: Iterable[str] = ()) -> list[str]:
    """What the services read or write: the home, the interpreter (and what its symlinks lead to), the
    installed trainbox, and ``extra`` (configured model folders and eval files)."""
    package_root = Path(__file__).resolve().parent.parent
    paths = [str(home), os.path.abspath(python), os.path.realpath(python), str(package_root)]
    return [*paths, *(os.path.abspath(os.path.join(home, p)) for p in extra if p)]


def _name(lookup: str, number: int) -> str:
    try:
        return pwd.getpwuid(number).pw_name if lookup == "user" else grp.getgrgid(number).gr_name
    except KeyError:
        return str(number)  # no entry: systemd takes numeric ids too


def resolve_run_as(home: Path, user: str | None = None, group: str | None = None, allow_root: bool = False) -> RunAs:
    """The account for system units: ``user`` (its primary group), else the home's owner and group."""
    if not home.is_dir():
        raise UnitError(
            f"the home {home} does not exist: create it and give it to the account the services run as "
            f"(mkdir -p {shlex.quote(str(home))} && chown USER: {shlex.quote(str(home))}), then run install-systemd "
            "again"
        )
    if user is not None:
        try:
            entry = pwd.getpwnam(user)
        except KeyError:
            raise UnitError(f"no user {user!r} on this machine: create it (useradd --system {user})") from None
        uid, gid, why = entry.pw_uid, entry.pw_gid, f"--run-as {user}"
    else:
        st = home.stat()
        uid, gid, why = st.st_uid, st.st_gid, f"the owner of {home}"
    if group is not None:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise UnitError(f"no group {group!r} on this machine: create it (groupadd --system {group})") from None
    if (uid == 0 or gid == 0) and not allow_root:
        who = "user root" if uid == 0 else "group root"
        raise UnitError(
            f"refusing to write units that run as {who} ({why}): trainbox trains on files anyone with access to "
            f"the inbox drops there. Give the home to a service account (useradd --system trainbox && chown -R "
            f"trainbox: {shlex.quote(str(home))}) and pass --run-as trainbox, or pass --allow-root to run as root "
            "anyway"
        )
    return RunAs(_name("user", uid), _name("group", gid))


def default_dir(user_mode: bool) -> Path:
    if user_mode:
        base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
        return Path(base) / "systemd" / "user"
    return Path("/etc/systemd/system")


def install(
    home: Path,
    user_mode: bool,
    target_dir: Path | None = None,
    python: str | None = None,
    *,
    run_as: RunAs | None = None,
    protect_home: ProtectHome | Literal["auto"] = "auto",
    worker_stop_timeout: float = 120.0,
    extra_paths: Iterable[str] = (),
) -> list[Path]:
    """Write the units; system units need ``run_as`` (``resolve_run_as``), user units must not have it."""
    if user_mode and run_as is not None:
        raise UnitError("user units (--user) run as their user: --run-as/--group/--allow-root are for system units")
    if not user_mode and run_as is None:
        raise UnitError("system units need an account to run as (resolve_run_as)")
    python = os.path.abspath(python or sys.executable)
    chosen = choose_protect_home(needed_paths(home, python, extra_paths), protect_home)
    stop = max(300, int(worker_stop_timeout) + STOP_MARGIN)
    units = render(python, str(home), user_mode, run_as, protect_home=chosen, daemon_stop_timeout=stop)
    folder = target_dir or default_dir(user_mode)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in units.items():
        path = folder / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def ownership_note(home: Path, run_as: RunAs) -> str | None:
    """A warning when the account the units run as is not the home's owner: it could not write there."""
    try:
        uid = pwd.getpwnam(run_as.user).pw_uid
    except KeyError:
        uid = int(run_as.user) if run_as.user.isdigit() else -1
    owner = home.stat().st_uid
    if uid == owner:
        return None
    other = f" (or pass --run-as {_name('user', owner)})" if owner != 0 else ""
    return (
        f"note: {home} belongs to {_name('user', owner)} but the units run as {run_as.user}, who may not be able to "
        f"write there: chown -R {run_as.user}: {shlex.quote(str(home))}{other}"
    )
