"""``trainbox up``: the daemon, watchdog, retention and status server as children of one foreground
supervisor, for machines without systemd.

Each child is a fresh interpreter in its own session (a Ctrl-C at the terminal reaches only the
supervisor, which then stops them in order), with its output appended to ``<home>/logs/<name>.log``.
The supervisor's ``loop(now)`` restarts a child that exits with a failure, with back-off (1 s
doubling to 60 s, reset after a minute up). Restarting is the supervisor's job alone: children get
``$TRAINBOX_SUPERVISED=1``, which tells the watchdog to leave daemon restarts to us (it still
unhangs workers and writes crash reports). A daemon that exits 0 was stopped on purpose
(``trainbox stop``): the supervisor then stops the rest and exits.

Stopping (first SIGINT/SIGTERM): SIGTERM to the daemon, which checkpoints the running job and exits;
then SIGTERM to the others. A second signal SIGKILLs whatever is left.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from safety.watchdog import SUPERVISED_ENV, spawn_logged
from trainbox.home import Home

URL_PREFIX = "trainbox status server: "
BACKOFF_START, BACKOFF_MAX, HEALTHY_AFTER = 1.0, 60.0, 60.0
ORDER = ("daemon", "watchdog", "retention", "server")


def child_commands(home: Home) -> dict[str, list[str]]:
    py, h = sys.executable, str(home.root)
    return {
        "daemon": [py, "-m", "cli", "daemon", "--home", h],
        "watchdog": [py, "-m", "cli", "watchdog", "--home", h],
        "retention": [py, "-m", "cli", "retention", "--home", h],
        "server": [py, "-m", "monitoring.server", "--home", h],
    }


@dataclass
class Child:
    name: str
    argv: list[str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restarts: int = 0
    backoff: float = BACKOFF_START
    due_at: float = 0.0  # when a dead child may be started again
    done: bool = False  # exited on purpose; not restarted
    exits: list[int] = field(default_factory=list)


class Supervisor:
    name = "supervisor"
    interval = 0.5

    def __init__(self, home: Home, say: Callable[[str], None] = print, commands: dict[str, list[str]] | None = None):
        self.home = home.ensure()
        self.say = say
        logs = home.root / "logs"
        cmds = commands or child_commands(home)
        self.children = [Child(n, cmds[n], logs / f"{n}.log") for n in ORDER if n in cmds]
        self.signals = 0
        self.stopping = False
        self.url: str | None = None
        self._url_offset = 0

    def _on_signal(self, _signum: int, _frame: FrameType | None) -> None:
        self.signals += 1

    def start(self, child: Child, now: float) -> None:
        child.proc = spawn_logged(child.argv, child.log, env={SUPERVISED_ENV: "1"})
        child.started_at = now
        self.say(f"started {child.name} (pid {child.proc.pid}), log {child.log}")

    def loop(self, now: float) -> None:
        for child in self.children:
            if child.proc is None:
                if not child.done and now >= child.due_at:
                    self.start(child, now)
                continue
            rc = child.proc.poll()
            if rc is None:
                if now - child.started_at > HEALTHY_AFTER:
                    child.backoff = BACKOFF_START
                continue
            child.exits.append(rc)
            child.proc = None
            if child.name == "daemon" and rc == 0:
                self.say("daemon stopped on request: stopping the rest")
                child.done = True
                self.stopping = True
                continue
            child.due_at = now + child.backoff
            self.say(f"{child.name} exited ({rc}); restarting in {child.backoff:.0f}s")
            child.restarts += 1
            child.backoff = min(BACKOFF_MAX, child.backoff * 2)
        self._find_url()

    def _find_url(self) -> None:
        if self.url is not None:
            return
        server = next((c for c in self.children if c.name == "server"), None)
        if server is None or not server.log.exists():
            return
        with open(server.log, "rb") as f:
            f.seek(self._url_offset)
            data = f.read()
        for line in data.decode(errors="replace").splitlines():
            if line.startswith(URL_PREFIX):
                self.url = line[len(URL_PREFIX) :].strip()
                self.say(line.strip())
        self._url_offset += len(data) - len(data.split(b"\n")[-1])

    def stop_all(self, timeout: float = 300.0) -> None:
        """The daemon first (it checkpoints), then the rest; SIGKILL on a second signal or the timeout."""
        daemon = [c for c in self.children if c.name == "daemon"]
        rest = [c for c in self.children if c.name != "daemon"]
        for group in (daemon, rest):
            live = [c for c in group if c.proc is not None and c.proc.poll() is None]
            for c in live:
                self.say(f"stopping {c.name} (pid {c.proc.pid})")  # type: ignore[union-attr]
                c.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
            deadline = time.monotonic() + timeout
            for c in live:
                assert c.proc is not None
                while c.proc.poll() is None:
                    if self.signals >= 2 or time.monotonic() > deadline:
                        self.say(f"killing {c.name}")
                        c.proc.kill()
                        c.proc.wait(10)
                        break
                    time.sleep(0.1)
                c.exits.append(c.proc.returncode)

    def run(self, stop: threading.Event | None = None) -> int:
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)
        self.say(f"trainbox up: home {self.home.root}")
        try:
            while not self.stopping and self.signals == 0 and not (stop and stop.is_set()):
                self.loop(time.time())
                time.sleep(self.interval)
        finally:
            self.stopping = True
            self.stop_all()
        self.say("trainbox up: stopped")
        return 0
