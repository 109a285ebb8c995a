"""The daemon's side of a kept child (``trainbox/child_server.py`` says why and the protocol): start it at
the first request, hand it one request at a time, read its answer in a later tick without blocking, end
it when idle or worn, kill it when a request overruns or the daemon stops.

Used by the eval gate (``daemon/gate.py``) and the job reports (``daemon/reports.py``): each owns one.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from trainbox.processes import child_env, describe_exit, kill_group

SERVER_MODULE = "trainbox.child_server"
IDLE_S = 120.0  # no request for this long: the child ends (its memory back; the next request starts another)
REQUESTS_PER_CHILD = 100  # then a fresh child: whatever a long-lived one leaks stays bounded


@dataclass(frozen=True)
class Answer:
    """How the request in hand ended: ``rc`` as a process's exit status would say it, and in words."""

    rc: int
    why: str  # "" when rc is 0

    @property
    def ok(self) -> bool:
        return self.rc == 0


@dataclass
class ServedChild:
    """One kept child running ``entry`` (``MODULE:FUNCTION``) for the daemon of ``home``."""

    entry: str
    home: Path
    env: dict[str, str] = field(default_factory=dict)  # laid over the daemon's environment
    defaults: dict[str, str] = field(default_factory=dict)  # under it
    nice: int = 0
    popen: subprocess.Popen[bytes] | None = None
    in_hand: bool = False
    served: int = 0
    last_used: float = 0.0
    buffer: bytes = b""
    retired: list[subprocess.Popen[bytes]] = field(default_factory=list)  # closed, reaped once they exit

    def argv(self) -> list[str]:
        return [sys.executable, "-m", SERVER_MODULE, self.entry, "--home", str(self.home)]

    def is_ours(self, cmdline: list[str]) -> bool:
        """A process's argv is such a child of this home's daemon (one a killed daemon left is found so)."""
        return cmdline[1:] == self.argv()[1:]

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen is not None else None

    def submit(self, argv: list[str], log: Path, label: str, now: float) -> int:
        """Hand it a request (starting a child first if none is alive); its pid. OSError: none could start."""
        popen = self.popen
        if popen is None or popen.poll() is not None:
            popen = self.popen = self._spawn()
            self.served, self.buffer = 0, b""
        line = json.dumps({"argv": argv, "log": str(log), "label": label}) + "\n"
        assert popen.stdin is not None
        with contextlib.suppress(OSError):  # BrokenPipeError: it died; ``answer`` says so at the next tick
            popen.stdin.write(line.encode())
            popen.stdin.flush()
        self.in_hand, self.last_used = True, now
        return popen.pid

    def _spawn(self) -> subprocess.Popen[bytes]:
        popen = subprocess.Popen(
            self.argv(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,  # its answers; its stderr is the daemon's (its log) between requests
            start_new_session=True,  # STYLE 4: a Ctrl-C meant for the daemon does not reach it; killpg takes all
            env=child_env(self.env, self.defaults),
        )
        assert popen.stdout is not None
        os.set_blocking(popen.stdout.fileno(), False)
        if self.nice:
            with contextlib.suppress(OSError):  # gone already, or not permitted: it runs at normal priority
                # right after the exec, before its imports start any thread (Linux: threads inherit the nice value)
                os.setpriority(os.PRIO_PROCESS, popen.pid, self.nice)
        return popen

    def answer_fd(self) -> int | None:
        """The pipe to wait on while a request is in hand (readable: an answer, or the child's end)."""
        popen = self.popen
        if popen is None or not self.in_hand or popen.stdout is None:
            return None
        return popen.stdout.fileno()

    def answer(self) -> Answer | None:
        """The request in hand's end, once there is one: its answer, or the child's death; None meanwhile."""
        popen = self.popen
        if popen is None or not self.in_hand:
            return None
        rc = popen.poll()  # first: whatever it answered before exiting is in the pipe when read below
        assert popen.stdout is not None
        with contextlib.suppress(BlockingIOError):
            self.buffer += os.read(popen.stdout.fileno(), 65536)
        if b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            self.in_hand = False
            self.served += 1
            try:
                said = json.loads(line)
                code, last = int(said["rc"]), bool(said.get("last"))
            except (ValueError, KeyError, TypeError):
                return Answer(1, f"the kept child answered {line[:200]!r}")
            if last:  # it exits now (it used CUDA): the next request starts another
                self.retired.append(popen)
                self.popen = None
            return Answer(code, "" if code == 0 else describe_exit(code))
        if rc is None:
            return None
        self.in_hand, self.popen = False, None
        return Answer(rc if rc != 0 else 1, f"its child exited ({describe_exit(rc)}) before answering")

    def tick(self, now: float) -> None:
        """Reap retired children; end an idle or worn one (gently: it has no request, it exits at EOF)."""
        self.retired = [p for p in self.retired if p.poll() is None]
        popen = self.popen
        if popen is None or self.in_hand:
            return
        if popen.poll() is not None or self.served >= REQUESTS_PER_CHILD or now - self.last_used > IDLE_S:
            with contextlib.suppress(OSError):
                if popen.stdin is not None:
                    popen.stdin.close()
            self.retired.append(popen)
            self.popen = None

    def kill(self) -> None:
        """The request in hand overran, or the daemon stops: the child and its group, at once."""
        popen, self.popen, self.in_hand = self.popen, None, False
        if popen is not None:
            kill_group(popen)
        for old in self.retired:
            kill_group(old, wait=1.0)
        self.retired = []
