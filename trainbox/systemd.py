"""systemd unit files for one install and one home: ``trainbox install-systemd [--user]``.

Four services grouped by ``trainbox.target``. The daemon, watchdog and retention are
``Type=notify``: they send READY=1 once started and WATCHDOG=1 every loop (``trainbox/sdnotify.py``),
so systemd restarts one that hangs (``WatchdogSec``) or fails (``Restart=on-failure``); the watchdog
sees ``$INVOCATION_ID`` and leaves daemon restarts to systemd. ``ExecStart`` runs without a shell.
The daemon is stopped by SIGTERM to its main process only (``KillMode=mixed``): it asks the worker
to checkpoint and waits for it, so ``TimeoutStopSec`` is longer than ``daemon.worker_stop_timeout``
plus a checkpoint save; whatever is left at the timeout gets SIGKILL. ``scripts/systemd/`` holds the
units rendered for an example install (``/opt/trainbox``, home ``/var/lib/trainbox``).
"""

from __future__ import annotations

import getpass
import os
import sys
from pathlib import Path

UNITS = (
    "trainbox-daemon.service",
    "trainbox-watchdog.service",
    "trainbox-retention.service",
    "trainbox-server.service",
)

_SERVICE = """\
[Unit]
Description={description}
Documentation=file://{home}/trainbox.toml
PartOf=trainbox.target
After=network.target{after}

[Service]
Type={type}
{notify}ExecStart={python} -m {module} --home {home}
WorkingDirectory={home}
Environment=PYTHONUNBUFFERED=1 TRAINBOX_HOME={home}
{user}Restart=on-failure
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


def render(python: str, home: str, user_mode: bool, run_as: str | None = None) -> dict[str, str]:
    """File name -> content, for the interpreter ``python`` and the instance folder ``home``."""
    user_line = f"User={run_as}\n" if (run_as and not user_mode) else ""
    specs = {
        # module, description, type, watchdog seconds, stop timeout, kill mode, after
        "trainbox-daemon.service": (
            "trainbox.cli daemon",
            "trainbox daemon: admits JSONL files from the inbox and trains them",
            "notify",
            120,
            300,
            "mixed",
            "",
        ),
        "trainbox-watchdog.service": (
            "trainbox.cli watchdog",
            "trainbox watchdog: unhangs workers, writes crash reports",
            "notify",
            60,
            30,
            "control-group",
            " trainbox-daemon.service",
        ),
        "trainbox-retention.service": (
            "trainbox.cli retention",
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
    out = {}
    for name, (module, description, kind, wd, stop, kill_mode, after) in specs.items():
        out[name] = _SERVICE.format(
            description=description,
            home=home,
            after=after,
            type=kind,
            notify="NotifyAccess=main\n" if kind == "notify" else "",
            python=python,
            module=module,
            user=user_line,
            kill_mode=kill_mode,
            start_timeout=300 if name == "trainbox-daemon.service" else 90,
            stop_timeout=stop,
            watchdog=f"WatchdogSec={wd}\n" if wd else "",
        )
    out["trainbox.target"] = _TARGET.format(
        units=" ".join(UNITS), wanted_by="default.target" if user_mode else "multi-user.target"
    )
    return out


def default_dir(user_mode: bool) -> Path:
    if user_mode:
        base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
        return Path(base) / "systemd" / "user"
    return Path("/etc/systemd/system")


def install(home: Path, user_mode: bool, target_dir: Path | None = None, python: str | None = None) -> list[Path]:
    folder = target_dir or default_dir(user_mode)
    folder.mkdir(parents=True, exist_ok=True)
    run_as = None if os.geteuid() == 0 else getpass.getuser()
    written = []
    for name, text in render(python or sys.executable, str(home), user_mode, run_as).items():
        path = folder / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written
