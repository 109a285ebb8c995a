"""Hostile inbox input, end to end: a real daemon (and, second, ``trainbox up``) on a real inbox fed a
few hundred seeded hostile cases (``tests/fuzz_cases.py``: symlinks into a decoy folder outside the
home, FIFOs, sockets, odd folders and names, hostile content and sidecars, races), then one good file.

The run: the daemon starts paused; every case is dropped; we wait (bounded) until the inbox holds no
regular file but the ones the README says intake leaves (ignored names, sidecars with no data file);
the outcome of every entry is recorded; every queued job is cancelled (so nothing hostile trains);
a good file goes to ``inbox/high/`` with a sidecar ``max_steps = 2``; resume; it must be trained (done,
with a model version); SIGTERM. Then the invariants:

- the daemon never died, hung or blew up its memory; one pid from start to end (one
  ``daemon_started`` event); it exits 0 on SIGTERM (under ``trainbox up``: no restart, no watchdog
  intervention);
- every regular file dropped is in exactly one place (inbox/, queue/*/, runs/*/: found by inode or by
  the unique marker inside it), a file deleted by its case in none; nothing left in queue/admitting/
  nor a job row in state admitting;
- symlinks, FIFOs, sockets and folders stay where they were (or are filed in queue/failed/): never
  taken in as jobs;
- the decoy folder is untouched (listing, sha256 and mode of every entry) and none of its content
  shows up anywhere in the home (error files, DB rows, status, runs) but logs;
- each case's expected outcome (``fuzz_cases.Entry.expect``): e.g. a BOM or ``.JSONL`` file is queued,
  ``inbox/HIGH/`` does not silently mean normal, a valid file is queued complete and in its priority.

When the daemon dies or hangs, the test says which case did it (what was in queue/admitting/, the
paths its log names, the log's tail), moves what is in queue/admitting/ aside (a daemon would die
on it again while recovering) and restarts the daemon (at most TRAINBOX_FUZZ_MAX_RESTARTS times) so
one run reports as many failing cases as it can. A failure lists, per invariant, the cases behind it.

Environment: TRAINBOX_FUZZ_SEED, TRAINBOX_FUZZ_CASES (main run, default 300), TRAINBOX_FUZZ_UP_CASES
(default 80), TRAINBOX_FUZZ_ONLY (comma-separated case kinds), TRAINBOX_FUZZ_MAX_RESTARTS (default 6).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests import fuzz_cases as fc
from trainbox import control
from trainbox.config import DaemonConfig
from trainbox.home import Home

pytestmark = pytest.mark.e2e

SEED = int(os.environ.get("TRAINBOX_FUZZ_SEED") or 20261202)
N_CASES = int(os.environ.get("TRAINBOX_FUZZ_CASES") or 300)
N_UP_CASES = int(os.environ.get("TRAINBOX_FUZZ_UP_CASES") or 80)
ONLY = [k for k in (os.environ.get("TRAINBOX_FUZZ_ONLY") or "").split(",") if k.strip()] or None
MAX_RESTARTS = int(os.environ.get("TRAINBOX_FUZZ_MAX_RESTARTS") or 6)

MEMORY_LIMIT = 1536 * 1024**2  # daemon RSS that counts as a blow-up (it idles near 100 MB): SIGKILLed
HUNG_AFTER = 15.0  # heartbeat age the project calls hung (trainbox.status.heartbeat_limit at our poll)
KILL_HUNG_AFTER = 12.0  # a hung daemon not freed by opening its FIFOs this long after: SIGKILLed
LINE_LIMIT = 64 * 1024  # set when the daemon has a line-length setting

CONFIG = """
[daemon]
poll_interval = 0.2
settle_seconds = 1.0
rescan_interval = 1.0
worker_stop_timeout = 60
{daemon_extra}
[training]
max_steps = 3
eval_every = 0
checkpoint_every = 0
batch_size = 8
max_length = 64
learning_rate = 3e-3
warmup_ratio = 0.1
threads = 1
{extra}
"""
UP_EXTRA = """
[server]
port = 0
[watchdog]
interval = 0.5
[retention]
interval = 5
"""

ERROR_SUFFIX = b".error.json"
IGNORED_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", "~")  # README: intake ignores these
SIDECAR_SUFFIXES = (".toml", ".json")
RUN_FILES = {b"eval.jsonl", b"metrics.jsonl", b"worker.log", b"job.json", b"result.json"}
RUN_FILES |= {b"crash-report.json", b"watchdog-kill.json"}
RUN_DIRS = {b"checkpoints", b"final"}
MARKER = re.compile(rb"FZM\d{4,}[a-z]Z")


def line_limit_setting() -> str | None:
    """The daemon's line-length setting, if the tree has one by now (a name with line and length/bytes)."""
    for name, f in DaemonConfig.model_fields.items():
        if "line" in name and any(w in name for w in ("length", "bytes", "chars", "size")) and f.annotation is int:
            return name
    return None


FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\w+)|([\w./-]+\.py):(\d+) in (\w+)')
PROJECT = ("/daemon/", "/trainbox/", "/management/", "/core/", "/safety/", "/monitoring/")


def summarize_log(text: str) -> str:
    """The last traceback in a daemon log, short: the project's frames and the exception (rich or plain
    tracebacks); without one, the last lines."""
    lines = text.splitlines()
    start = max((i for i, x in enumerate(lines) if "Traceback (most recent call last)" in x), default=None)
    if start is None:
        return "\n".join(lines[-8:])
    frames = []
    for x in lines[start:]:
        m = FRAME.search(x)
        if m:
            path, line, fn = (m.group(1), m.group(2), m.group(3)) if m.group(1) else m.groups()[3:]
            if any(p in path for p in PROJECT):
                short = path[max(path.find(p) for p in PROJECT if p in path) + 1 :]
                frames.append(f"{short}:{line} in {fn}")
    box_end = max((i for i, x in enumerate(lines) if x.lstrip().startswith("\u2570")), default=start)
    tail = [x.strip() for x in lines[max(box_end + 1, start) :] if x.strip() and "\u2502" not in x][:6]
    return "\n".join(["frames: " + " -> ".join(frames) if frames else "frames: (none of the project's)", *tail])


def rel(path: bytes, root: bytes) -> str:
    return ascii(os.fsdecode(os.path.relpath(path, root)))


# --- filesystem views ------------------------------------------------------------------------------


@dataclass
class Item:
    path: bytes
    st: os.stat_result
    place: str  # inbox | admitting | queued:<p> | processing | done | failed | runs | quarantine | other:<x>
    data_place: bool  # where a job's file or sidecar may legitimately be (markers are looked for here)
    _content: bytes | None = None

    @property
    def regular(self) -> bool:
        return stat.S_ISREG(self.st.st_mode)

    def content(self) -> bytes:
        if self._content is None:
            try:
                with open(self.path, "rb") as f:
                    self._content = f.read()
            except OSError:
                self._content = b""
        return self._content


def classify(relpath: bytes) -> tuple[str, bool]:
    parts = relpath.split(b"/")
    top = parts[0]
    name = parts[-1]
    if top == b"inbox":
        return "inbox", True
    if top == b"queue" and len(parts) >= 3:
        folder = parts[1].decode(errors="replace")
        place = f"queued:{folder}" if folder in fc.PRIORITIES else folder
        return place, not name.endswith(ERROR_SUFFIX)
    if top == b"runs" and len(parts) >= 3:
        return "runs", name not in RUN_FILES and not any(p in RUN_DIRS for p in parts[2:-1])
    return f"other:{top.decode(errors='replace')}", False


def walk(root: bytes) -> Iterator[bytes]:
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            yield os.path.join(dirpath, name)


def index_tree(home: Path, quarantine: Path) -> list[Item]:
    out = []
    hb = os.fsencode(home)
    for p in walk(hb):
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            continue
        place, data = classify(os.path.relpath(p, hb))
        out.append(Item(p, st, place, data))
    qb = os.fsencode(quarantine)
    for p in walk(qb) if quarantine.exists() else ():
        out.append(Item(p, os.lstat(p), "quarantine", True))
    return out


def tree_snapshot(root: Path) -> dict[str, tuple[Any, ...]]:
    """Every entry under ``root``: kind, mode, and the sha256 of a file or the target of a link."""
    out: dict[str, tuple[Any, ...]] = {".": ("dir", stat.S_IMODE(os.lstat(root).st_mode))}
    rb = os.fsencode(root)
    for p in walk(rb):
        st = os.lstat(p)
        mode = stat.S_IMODE(st.st_mode)
        key = os.fsdecode(os.path.relpath(p, rb))
        if stat.S_ISLNK(st.st_mode):
            out[key] = ("link", mode, os.readlink(p))
        elif stat.S_ISDIR(st.st_mode):
            out[key] = ("dir", mode)
        elif stat.S_ISREG(st.st_mode):
            out[key] = ("file", mode, hashlib.sha256(Path(os.fsdecode(p)).read_bytes()).hexdigest())
        else:
            out[key] = ("other", mode)
    return out


def inodes(root: Path) -> dict[tuple[int, int], str]:
    rb = os.fsencode(root)
    out = {}
    for p in walk(rb):
        st = os.lstat(p)
        if stat.S_ISREG(st.st_mode):
            out[(st.st_dev, st.st_ino)] = os.fsdecode(os.path.relpath(p, rb))
    return out


def db_rows(home: Home, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
    if not home.db_file.exists():
        return []
    con = sqlite3.connect(f"file:{home.db_file}?mode=ro", uri=True, timeout=10)
    con.row_factory = sqlite3.Row
    con.text_factory = lambda b: b.decode("utf-8", "replace")
    try:
        return con.execute(sql, args).fetchall()
    except sqlite3.Error:
        return []
    finally:
        con.close()


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def job_id_of(name: bytes) -> int | None:
    m = re.match(rb"(\d+)__", name)
    return int(m.group(1)) if m else None


# --- the harness -----------------------------------------------------------------------------------


@dataclass
class Incident:
    at: float
    what: str  # died | hung | memory
    detail: str
    suspects: list[str] = field(default_factory=list)
    admitting: list[str] = field(default_factory=list)
    log_tail: str = ""


class Harness:
    """One home, one decoy, one daemon (``mode = "daemon"``) or ``trainbox up`` (``mode = "up"``)."""

    def __init__(self, tmp: Path, embedded: Path, mode: str, n_cases: int) -> None:
        self.tmp, self.mode, self.n_cases = tmp, mode, n_cases
        self.home = Home(tmp / "home").ensure()
        self.limit_key = line_limit_setting()
        daemon_extra = f"{self.limit_key} = {LINE_LIMIT}" if self.limit_key else ""
        self.home.config_file.write_text(
            CONFIG.format(daemon_extra=daemon_extra, extra=UP_EXTRA if mode == "up" else "")
        )
        shutil.copytree(embedded, self.home.embedded_model)
        self.decoy = fc.make_decoy(tmp / "decoy", SEED)
        self.decoy_before = tree_snapshot(self.decoy.root)
        self.decoy_inodes = inodes(self.decoy.root)
        self.quarantine = tmp / "quarantine"
        self.log_path = tmp / "daemon.log" if mode == "daemon" else self.home.root / "logs" / "daemon.log"
        self.failures: dict[str, list[str]] = defaultdict(list)
        self.info: dict[str, list[str]] = defaultdict(list)
        self.incidents: list[Incident] = []
        self.cases: list[fc.Case] = []
        self.by_ino: dict[tuple[int, int], tuple[fc.Case, fc.Entry]] = {}
        self.t0 = time.monotonic()
        self.wall0 = time.time()
        self.lock = threading.RLock()
        self.proc: subprocess.Popen[bytes] | None = None
        self.up: subprocess.Popen[bytes] | None = None
        self.pids: list[int] = []
        self.restarts = 0
        self.gave_up = False
        self.stopping = False
        self.stop_watch = threading.Event()
        self.watcher: threading.Thread | None = None
        self.later_threads: list[threading.Thread] = []
        self.hung_since: float | None = None
        self.progress = ("", time.monotonic())
        self.max_heartbeat_gap = 0.0
        self.log_offset = 0
        self.killed: set[int] = set()
        self.good_name = f"good-{SEED}.jsonl"
        self.good_id: int | None = None
        self.outcomes: dict[int, str] = {}  # id(entry) -> where it was after the drain

    def now(self) -> float:
        return round(time.monotonic() - self.t0, 1)

    # --- processes ---
    def start(self) -> None:
        control.submit(self.home.control, control.Action.PAUSE)  # before start: the daemon starts paused
        if self.mode == "daemon":
            self._spawn_daemon()
        else:
            out = open(self.tmp / "up.out", "ab")  # noqa: SIM115 - the child holds it
            self.up = subprocess.Popen(
                [sys.executable, "-m", "cli", "up", "--home", str(self.home.root)],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            out.close()
        self.watcher = threading.Thread(target=self._watch, daemon=True)
        self.watcher.start()

    def _spawn_daemon(self) -> None:
        with open(self.log_path, "ab") as log:
            log.write(f"\n--- test: daemon start at t={self.now()} ---\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "cli", "daemon", "--home", str(self.home.root)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def daemon_pid(self) -> int | None:
        if self.mode == "daemon":
            return self.proc.pid if self.proc is not None and self.proc.poll() is None else None
        if self.up is None or self.up.poll() is not None:
            return None
        try:
            for child in psutil.Process(self.up.pid).children():
                if " daemon " in " ".join(child.cmdline()) + " " and child.status() != psutil.STATUS_ZOMBIE:
                    return child.pid
        except psutil.Error:
            pass
        return None

    def _kill(self, pid: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)

    # --- the watch: memory, hangs, deaths ---
    def _watch(self) -> None:
        try:
            self._watch_loop()
        except Exception as e:  # a bug of the watch itself must show, not pass silently
            self.failures["test harness"].append(f"the watch thread failed: {e!r}")

    def _watch_loop(self) -> None:
        last_pid: int | None = None
        last_beat_check = 0.0
        while not self.stop_watch.is_set():
            with self.lock:
                pid = self.daemon_pid()
                if pid is not None and pid not in self.pids:
                    self.pids.append(pid)
                    if len(self.pids) > 1:
                        self.info["daemon pids"].append(f"t={self.now()}s: daemon pid {pid} (previous {self.pids[-2]})")
                if pid is not None:
                    self._check_memory(pid)
                if time.monotonic() - last_beat_check > 0.5 and pid is not None:
                    last_beat_check = time.monotonic()
                    self._check_heartbeat(pid)
                if not self.stopping:
                    if self.mode == "daemon" and self.proc is not None and self.proc.poll() is not None:
                        self._on_death(self.proc.pid, f"exit status {self.proc.returncode}")
                    elif self.mode == "up" and last_pid is not None and pid != last_pid:
                        self._on_death(last_pid, "gone (the supervisor restarts it)" if pid is None else "replaced")
                last_pid = pid if pid is not None else (None if self.mode == "up" else last_pid)
            time.sleep(0.05)

    def _check_memory(self, pid: int) -> None:
        try:
            rss = psutil.Process(pid).memory_info().rss
        except psutil.Error:
            return
        if rss > MEMORY_LIMIT:
            self._incident("memory", f"daemon pid {pid} RSS {rss >> 20} MiB: SIGKILLed by the test")
            self._kill(pid)
            self.killed.add(pid)

    def _spool_signature(self) -> str:
        parts = []
        for folder in sorted(self.home.queue.iterdir()) if self.home.queue.is_dir() else ():
            with contextlib.suppress(OSError):
                parts.append(f"{folder.name}:{sorted(os.listdir(folder))}")
        return "|".join(parts)

    def _check_heartbeat(self, pid: int) -> None:
        st = read_json(self.home.status / "daemon.json")
        if st.get("pid") != pid or st.get("state") == "stopped" or not isinstance(st.get("heartbeat"), int | float):
            return
        age = time.time() - st["heartbeat"]
        self.max_heartbeat_gap = max(self.max_heartbeat_gap, age)
        sig = self._spool_signature()
        if sig != self.progress[0]:
            self.progress = (sig, time.monotonic())
        stalled = time.monotonic() - self.progress[1]
        if age <= HUNG_AFTER or stalled <= HUNG_AFTER:
            if age <= HUNG_AFTER:
                self.hung_since = None
            return
        if self.hung_since is None or self.progress[1] > self.hung_since:  # a new hang (freed from the last)
            self.hung_since = time.monotonic()
            self._incident(
                "hung", f"daemon pid {pid}: heartbeat {age:.0f}s old, spool unchanged for {stalled:.0f}s", pid=pid
            )
            freed = self._unblock_fifos()
            self.incidents[-1].detail += f"; the test opened FIFOs for writing to free it: {freed or 'none found'}"
        elif time.monotonic() - self.hung_since > KILL_HUNG_AFTER:
            self._incident("hung", f"daemon pid {pid} still hung: SIGKILLed by the test", pid=pid)
            self.hung_since = None
            self._kill(pid)
            self.killed.add(pid)

    def _unblock_fifos(self) -> list[str]:
        freed = []
        for root in (self.home.queue, self.home.inbox, self.home.runs):
            for p in walk(os.fsencode(root)):
                with contextlib.suppress(OSError):
                    if stat.S_ISFIFO(os.lstat(p).st_mode):
                        try:
                            fd = os.open(p, os.O_WRONLY | os.O_NONBLOCK)
                        except OSError as e:
                            if e.errno != errno.ENXIO:  # ENXIO: nobody reads it
                                raise
                            continue
                        os.close(fd)
                        freed.append(rel(p, os.fsencode(self.home.root)))
        return freed

    def _on_death(self, pid: int, how: str) -> None:
        if pid in self.killed:
            how += " (killed by the test, see above)"
        self._incident("died", f"daemon pid {pid} {how}", pid=pid)
        self._quarantine_admitting()
        if self.mode == "up":
            return
        if self.restarts >= MAX_RESTARTS:
            self.gave_up = True
            self.proc = None
            self.info["gave up"].append(f"t={self.now()}s: {self.restarts} restarts done; not restarting again")
            return
        self.restarts += 1
        self._spawn_daemon()

    def _incident(self, what: str, detail: str, pid: int | None = None) -> None:
        admitting = []
        hb = os.fsencode(self.home.root)
        suspects: list[str] = []
        failed_ticks = "\n".join(x for x in self.log_tail(100000).splitlines() if "tick failed" in x)
        for p in walk(os.fsencode(self.home.queue / "admitting")):
            if os.fsdecode(os.path.basename(p)) in failed_ticks:  # left there by an earlier failed tick
                admitting.append(rel(p, hb) + " (stuck there since a failed tick)")
                continue
            admitting.append(rel(p, hb))
            with contextlib.suppress(OSError):
                st = os.lstat(p)
                hit = self.by_ino.get((st.st_dev, st.st_ino))
                if hit:
                    suspects.append(hit[0].name)
        for row in db_rows(self.home, "SELECT id, name FROM jobs WHERE state = 'admitting'"):
            admitting.append(f"DB job {row['id']} {row['name']!a} (state admitting)")
        new_log, n_bytes = self.log_since(self.log_offset)
        self.log_offset += n_bytes
        summary = summarize_log(new_log) if what == "died" else "\n".join(new_log.splitlines()[-6:])
        errors = [x for x in new_log.splitlines()[-400:] if " ERROR " in x or " WARNING " in x]
        suspects += self.cases_named_in("\n".join([summary if what == "died" else "", *errors[-5:]]))
        self.incidents.append(Incident(self.now(), what, detail, sorted(set(suspects)), admitting, summary))

    def _quarantine_admitting(self) -> None:
        """What a dead daemon left in queue/admitting/ would kill the next one in ``recover``: set aside."""
        adm = self.home.queue / "admitting"
        if not adm.is_dir():
            return
        self.quarantine.mkdir(exist_ok=True)
        for name in os.listdir(os.fsencode(adm)):
            src = os.path.join(os.fsencode(adm), name)
            dst = os.path.join(os.fsencode(self.quarantine), f"{time.monotonic_ns()}-".encode() + name)
            with contextlib.suppress(OSError):
                os.rename(src, dst)
                self.info["quarantined by the test"].append(f"t={self.now()}s: {os.fsdecode(name)!a}")

    def log_since(self, offset: int) -> tuple[str, int]:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                data = f.read()
        except OSError:
            return "", 0
        return data.decode(errors="replace"), len(data)

    def log_tail(self, n: int) -> str:
        try:
            data = self.log_path.read_bytes()
        except OSError:
            return ""
        return "\n".join(data.decode(errors="replace").splitlines()[-n:])

    def cases_named_in(self, text: str) -> list[str]:
        out = []
        for case in self.cases:
            for e in case.entries:
                base = os.path.basename(os.fsdecode(e.path))
                if len(base) > 4 and (base in text or repr(base)[1:-1] in text):
                    out.append(case.name)
                    break
        return out

    # --- dropping ---
    def drop(self, cases_plan: list[tuple[int, str]]) -> None:
        ctx = fc.Ctx(self.home.inbox, self.decoy, LINE_LIMIT if self.limit_key else None)
        for idx, kind in cases_plan:
            case = fc.build(ctx, idx, kind, SEED)
            self.cases.append(case)
            for later in case.later:
                t = threading.Thread(target=self._later, args=(later,), daemon=True)
                t.start()
                self.later_threads.append(t)
        for case in self.cases:
            for e in case.entries:
                if e.ino is not None:
                    self.by_ino[e.ino] = (case, e)

    def _later(self, later: fc.Later) -> None:
        time.sleep(later.delay)
        try:
            later.run()
        except Exception as e:  # a case's own step failing is a test bug: say so
            self.failures["test harness"].append(f"a case's later step failed: {e!r}")

    def entries_after_later(self) -> None:
        for t in self.later_threads:
            t.join(30)
        for case in self.cases:
            for e in case.entries:
                if e.ino is not None:
                    self.by_ino.setdefault(e.ino, (case, e))

    # --- waiting ---
    def wait(self, cond: Callable[[], Any], timeout: float, what: str) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.gave_up:
                self.failures["not exercised"].append(f"{what}: skipped, the daemon was given up on")
                return False
            if cond():
                return True
            time.sleep(0.25)
        return bool(cond())

    def daemon_status(self) -> dict[str, Any]:
        return read_json(self.home.status / "daemon.json")

    def ticking(self) -> bool:
        """The daemon is alive and its heartbeat fresh (not stuck in a tick)."""
        st = self.daemon_status()
        beat = st.get("heartbeat")
        return (
            st.get("pid") == self.daemon_pid() is not None
            and isinstance(beat, int | float)
            and time.time() - beat < 3.0
        )

    def undrained(self) -> list[bytes]:
        """Regular files in inbox/ and inbox/<priority>/ the README does not say intake leaves."""
        out = []
        for folder in (self.home.inbox, *(self.home.inbox / p for p in fc.PRIORITIES)):
            fb = os.fsencode(folder)
            names = set(os.listdir(fb)) if folder.is_dir() else set()
            for name in names:
                p = os.path.join(fb, name)
                with contextlib.suppress(FileNotFoundError):
                    if not stat.S_ISREG(os.lstat(p).st_mode):
                        continue
                    text = os.fsdecode(name)
                    if text.startswith(".") or text.endswith(IGNORED_SUFFIXES):
                        continue
                    stem, suffix = os.path.splitext(text)
                    if suffix in SIDECAR_SUFFIXES and not self._regular(os.path.join(fb, os.fsencode(stem + ".jsonl"))):
                        continue  # a sidecar without (a regular) data file: intake leaves it
                    out.append(p)
        return out

    @staticmethod
    def _regular(p: bytes) -> bool:
        try:
            return stat.S_ISREG(os.lstat(p).st_mode)
        except FileNotFoundError:
            return False

    def wait_drained(self, timeout: float) -> None:
        """Until the inbox holds only what intake leaves and the spool has not changed for 2 s; each
        daemon restart on the way extends the deadline by 20 s."""
        stable: tuple[str, float] = ("", 0.0)
        deadline = time.monotonic() + timeout
        restarts = self.restarts
        while not self.gave_up:
            if self.restarts != restarts:
                deadline += 20 * (self.restarts - restarts)
                restarts = self.restarts
            if not any(t.is_alive() for t in self.later_threads) and not self.undrained() and self.ticking():
                sig = self._spool_signature()
                if sig != stable[0]:
                    stable = (sig, time.monotonic())
                if time.monotonic() - stable[1] > 2.0:
                    return
            if time.monotonic() > deadline:
                break
            time.sleep(0.25)
        left = self.undrained()
        if left:
            self.failures["inbox not drained"].append(
                f"{len(left)} regular file(s) still in the inbox at the deadline: " + self.describe_paths(left)
            )

    def describe_paths(self, paths: list[bytes], limit: int = 40) -> str:
        hb = os.fsencode(self.home.root)
        out = []
        for p in paths[:limit]:
            who = ""
            with contextlib.suppress(OSError):
                st = os.lstat(p)
                hit = self.by_ino.get((st.st_dev, st.st_ino))
                who = f" [{hit[0].name}]" if hit else ""
            out.append(rel(p, hb) + who)
        more = f" (+{len(paths) - limit} more)" if len(paths) > limit else ""
        return "; ".join(out) + more

    # --- where each entry is ---
    def locate(self, items: list[Item]) -> dict[int, list[Item]]:
        """Where each entry is: its inode (same kind of file; a regular file's marker or size must
        match, or the inode number was reused), or, for a regular file, any job/sidecar place holding
        its marker (a copy counts as a second place)."""
        by_ino: dict[tuple[int, int], list[Item]] = defaultdict(list)
        by_marker: dict[bytes, list[Item]] = defaultdict(list)
        for it in items:
            by_ino[(it.st.st_dev, it.st.st_ino)].append(it)
            if it.regular and it.data_place:
                for m in set(MARKER.findall(it.content())):
                    by_marker[m].append(it)
        out: dict[int, list[Item]] = {}
        for case in self.cases:
            for e in case.entries:
                found: dict[bytes, Item] = {}
                for it in by_ino.get(e.ino, []) if e.ino else []:
                    if stat.S_IFMT(it.st.st_mode) != self._fmt(e):
                        continue
                    if e.kind == "file" and (
                        (e.marker and e.marker not in it.content()) or (not e.marker and it.st.st_size != e.size)
                    ):
                        continue
                    found[it.path] = it
                for it in by_marker.get(e.marker, []) if e.kind == "file" and e.marker else []:
                    found.setdefault(it.path, it)
                out[id(e)] = list(found.values())
        return out

    @staticmethod
    def _fmt(e: fc.Entry) -> int:
        return {
            "file": stat.S_IFREG,
            "symlink": stat.S_IFLNK,
            "fifo": stat.S_IFIFO,
            "socket": stat.S_IFSOCK,
            "dir": stat.S_IFDIR,
        }[e.kind]

    def where(self, items: list[Item]) -> str:
        hb = os.fsencode(self.home.root)
        qb = os.fsencode(self.quarantine)
        return (
            ", ".join(
                (rel(it.path, qb) + " (quarantined)") if it.place == "quarantine" else rel(it.path, hb) for it in items
            )
            or "nowhere"
        )

    def check_places(self, when: str, reported: set[int]) -> dict[int, list[Item]]:
        """Every regular file in exactly one place (none if its case deleted it); non-regular entries
        where they were or in queue/failed/. An entry already reported is not reported again."""
        located = self.locate(index_tree(self.home.root, self.quarantine))
        for case in self.cases:
            for e in case.entries:
                found = located[id(e)]
                label = f"{case.name}: {e.role} {e.kind} {e.shown}"
                key = ""
                if e.kind == "file":
                    if e.expect == fc.GONE and found:
                        key = "file deleted by its case found again"
                    elif e.expect != fc.GONE and len(found) != 1:
                        key = f"regular file in {'no place' if not found else 'two or more places'}"
                elif not found:
                    key = f"{e.kind} entries vanished"
                elif len(found) > 1 or (found[0].path != e.path and found[0].place != "failed"):
                    key = "non-regular entries taken in as jobs"
                if key and id(e) not in reported:
                    reported.add(id(e))
                    self.failures[f"{key} ({when})"].append(f"{label} -> {self.where(found)}")
        return located

    def check_outcomes(self, located: dict[int, list[Item]]) -> None:
        events = " ".join(str(r["message"]) for r in db_rows(self.home, "SELECT message FROM events"))
        high_reported = "HIGH" in events or "HIGH" in self.log_tail(100000)
        jobs = {r["id"]: r for r in db_rows(self.home, "SELECT * FROM jobs")}
        for case in self.cases:
            for e in case.entries:
                found = located[id(e)]
                if e.kind != "file":
                    here = len(found) == 1 and found[0].path == e.path
                    self.outcomes[id(e)] = f"{e.kind}:" + (
                        "in_place" if here else "+".join(f.place for f in found) or "gone"
                    )
                    continue
                if len(found) != 1:
                    gone = "deleted by its case" if e.expect == fc.GONE else "nowhere"
                    self.outcomes[id(e)] = "+".join(f.place for f in found) or gone
                    continue
                it = found[0]
                stayed = it.path == e.path
                place = "stay" if stayed else it.place
                self.outcomes[id(e)] = place
                ok = {
                    fc.QUEUED: place.startswith("queued:"),
                    fc.REJECTED: place == "failed",
                    fc.EITHER: place.startswith("queued:") or place == "failed",
                    fc.STAY: stayed,
                    fc.STAY_OR_REJECTED: stayed or place == "failed",
                    fc.ANY: True,
                    fc.GONE: True,
                    fc.HIGH_OR_REPORTED: place in ("queued:high", "failed") or (stayed and high_reported),
                }[e.expect]
                label = f"{case.name}: {e.role} {e.shown}"
                if not ok:
                    why = ""
                    if place == "failed":
                        why = " (" + self.error_reason(it.path) + ")"
                    self.failures["wrong outcome"].append(f"{label}: expected {e.expect}, got {place}{why}")
                    continue
                if place == "failed" and e.role == "data" and not os.path.exists(it.path + ERROR_SUFFIX):
                    self.failures["rejected without an error file"].append(f"{label} -> {self.where(found)}")
                if e.expect == fc.QUEUED and e.priority and place != f"queued:{e.priority}":
                    self.failures["queued in the wrong priority"].append(f"{label}: expected {e.priority}, got {place}")
                if place.startswith("queued:") and e.records is not None and e.role == "data":
                    row = jobs.get(job_id_of(os.path.basename(it.path)) or -1)
                    got = row["n_records"] if row is not None else None
                    if got != e.records:
                        self.failures["admitted incomplete or miscounted"].append(
                            f"{label}: {e.records} records written, the job row says {got}"
                        )

    def error_reason(self, failed_path: bytes) -> str:
        data = read_json(Path(os.fsdecode(failed_path + ERROR_SUFFIX)))
        return f"{data.get('class', '?')}: {str(data.get('reason', 'no error file'))[:160]}"

    # --- after the drain: nothing hostile may train ---
    def cancel_waiting(self, keep: int | None = None) -> None:
        ids = []
        for p in fc.PRIORITIES:
            for name in os.listdir(os.fsencode(self.home.queue / p)):
                jid = job_id_of(name)
                if jid is not None and jid != keep and name.endswith(b".jsonl"):
                    ids.append(jid)
        for jid in ids:
            control.submit(self.home.control, control.Action.CANCEL, job_id=jid)

        def none_waiting() -> bool:
            return not any(
                job_id_of(n) in ids for p in fc.PRIORITIES for n in os.listdir(os.fsencode(self.home.queue / p))
            )

        if ids and not self.wait(none_waiting, 60 + 0.2 * len(ids), "cancelling the waiting jobs"):
            self.failures["cancel requests not applied"].append(f"jobs still waiting after cancel: {ids[:30]}")

    def good_file(self) -> None:
        high = self.home.inbox / "high"
        (high / f"good-{SEED}.toml").write_text("max_steps = 2\n")
        rows = [{"text": f"the good file {SEED}: the cat sat on mat {i}"} for i in range(40)]
        tmp = high / f"{self.good_name}.tmp"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        os.replace(tmp, high / self.good_name)

        def queued() -> bool:
            for name in os.listdir(self.home.queue / "high"):
                if name.endswith(self.good_name):
                    self.good_id = job_id_of(name.encode())
                    return True
            return False

        if not self.wait(queued, 60, "the good file queued"):
            where = [str(p.relative_to(self.home.root)) for p in self.home.root.rglob(f"*{self.good_name}*")]
            self.failures["good file not trained"].append(f"not queued in high within 60s; found at {where}")
            return
        self.cancel_waiting(keep=self.good_id)
        control.submit(self.home.control, control.Action.RESUME)
        others: set[Any] = set()

        def done() -> bool:
            current = self.daemon_status().get("current_job")
            if current not in (None, self.good_id):
                others.add(current)
            return any(p.name.endswith(self.good_name) for p in self.home.done.iterdir())

        if not self.wait(done, 180, "the good file trained"):
            st = self.daemon_status()
            self.failures["good file not trained"].append(
                f"job {self.good_id} not in queue/done within 180s; daemon state {st.get('state')!r}, "
                f"message {st.get('message')!r}, files: "
                + str([str(p.relative_to(self.home.root)) for p in self.home.queue.rglob(f"*{self.good_name}*")])
            )
            return
        if others:
            self.failures["other jobs trained"].append(f"the daemon ran jobs {sorted(others)} besides the good one")
        versions = db_rows(self.home, "SELECT id, steps FROM model_versions WHERE job_id = ?", (self.good_id,))
        if len(versions) != 1:
            self.failures["good file not trained"].append(f"job {self.good_id}: {len(versions)} model versions")
        elif versions[0]["steps"] != 2:
            self.failures["good file not trained"].append(
                f"job {self.good_id}: version {versions[0]['id']} has {versions[0]['steps']} steps; its sidecar said 2"
            )

    # --- the end ---
    def stop(self) -> None:
        with self.lock:
            self.stopping = True
        if self.mode == "daemon":
            if self.proc is None:
                return
            alive = self.proc.poll() is None
            if not alive:
                self.failures["daemon exit"].append(f"the daemon was not running at the end ({self.proc.returncode})")
                return
            self.proc.send_signal(signal.SIGTERM)
            try:
                rc = self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self._kill(self.proc.pid)
                rc = self.proc.wait(10)
                self.failures["daemon exit"].append("the daemon did not exit within 60s of SIGTERM: SIGKILLed")
            if rc != 0:
                self.failures["daemon exit"].append(f"the daemon exited {rc} on SIGTERM")
            return
        assert self.up is not None
        daemon = self.daemon_pid()
        if daemon is None:
            self.failures["daemon exit"].append("no daemon running under trainbox up at the end")
        self.up.send_signal(signal.SIGTERM)
        try:
            rc = self.up.wait(90)
        except subprocess.TimeoutExpired:
            self._kill(self.up.pid)
            rc = self.up.wait(10)
            self.failures["daemon exit"].append("trainbox up did not exit within 90s of SIGTERM: SIGKILLed")
        if rc != 0:
            self.failures["daemon exit"].append(f"trainbox up exited {rc} on SIGTERM")
        if self.daemon_status().get("state") != "stopped":  # written by the daemon's own clean shutdown
            self.failures["daemon exit"].append(
                "the daemon did not stop cleanly under trainbox up: " + summarize_log(self.log_tail(300))
            )

    def cleanup(self) -> None:
        self.stop_watch.set()
        if self.watcher is not None:
            self.watcher.join(5)
        for proc in (self.proc, self.up):
            if proc is not None and proc.poll() is None:
                self._kill(proc.pid)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(10)
        with contextlib.suppress(OSError):
            self._unblock_fifos()
        for t in self.later_threads:
            t.join(5)

    def check_daemon_identity(self) -> None:
        groups: dict[tuple[str, str, tuple[str, ...]], list[Incident]] = defaultdict(list)
        for inc in self.incidents:  # the same death over and over (a crash loop) is told once
            last = inc.log_tail.splitlines()[-1] if inc.log_tail else ""
            groups[(inc.what, last if not inc.suspects else inc.detail, tuple(inc.suspects))].append(inc)
        for (what, _, suspects), incs in groups.items():
            inc = incs[0]
            times = ", ".join(f"t={i.at}s" for i in incs)
            head = f"{what} {len(incs)}x ({times}): {inc.detail}"
            who = (
                f"suspects: {', '.join(suspects)}"
                if suspects
                else ("suspects: none identified (nothing in queue/admitting: the daemon died before moving the file)")
            )
            adm = f"in queue/admitting: {inc.admitting or 'nothing'}"
            self.failures[f"daemon {what}"].append(
                f"{head}\n      {who}\n      {adm}\n      daemon log:\n"
                + "\n".join("        | " + x for x in inc.log_tail.splitlines()[-10:])
            )
        if len(self.pids) > 1:
            self.failures["daemon pid changed"].append(f"daemon pids seen: {self.pids}")
        started = db_rows(self.home, "SELECT message FROM events WHERE kind = 'daemon_started'")
        if len(started) != 1:
            self.failures["daemon restarted"].append(f"{len(started)} daemon_started events: {[r[0] for r in started]}")
        if self.max_heartbeat_gap > HUNG_AFTER:
            self.info["longest heartbeat gap"].append(f"{self.max_heartbeat_gap:.1f}s")
        if self.mode == "up":
            wd = db_rows(self.home, "SELECT kind, message FROM events WHERE kind LIKE 'watchdog_daemon%'")
            for r in wd:
                self.failures["watchdog judged the daemon down or restarted it"].append(f"{r['kind']}: {r['message']}")
            status = read_json(self.home.status / "watchdog.json")
            beat = status.get("heartbeat")
            if (
                status.get("restart_owner") != "trainbox up"
                or not isinstance(beat, int | float)
                or beat < self.wall0 + 5
            ):
                self.failures["watchdog not watching"].append(
                    f"status/watchdog.json does not show a watchdog that ran under trainbox up: {status or 'absent'}"
                )
            if status.get("interventions"):
                self.failures["watchdog interventions"].append(
                    f"{status['interventions']}: last {status.get('last_intervention')!r}"
                )
            out = (self.tmp / "up.out").read_text(errors="replace")
            for line in out.splitlines():
                if line.startswith("daemon exited"):
                    self.failures["trainbox up restarted the daemon"].append(line)

    def check_refusals_reported(self) -> None:
        """A symlink, FIFO, socket or folder left in a drop folder (named like a job or sidecar, or a
        folder) is reported: its name appears in a DB event or the daemon log."""
        said = " ".join(f"{r['message']} {r['data']}" for r in db_rows(self.home, "SELECT message, data FROM events"))
        with contextlib.suppress(OSError):
            said += self.log_path.read_text(errors="replace")
        drop_folders = {os.fsencode(self.home.inbox), *(os.fsencode(self.home.inbox / p) for p in fc.PRIORITIES)}
        for case in self.cases:
            for e in case.entries:
                name = os.fsdecode(os.path.basename(e.path))
                looks = e.kind == "dir" or name.lower().endswith((".jsonl", *SIDECAR_SUFFIXES))
                if e.kind == "file" or os.path.dirname(e.path) not in drop_folders or not looks or name == "HIGH":
                    continue
                if not self._lexists(e.path) or name in said:
                    continue
                self.failures["non-regular entries left without a report"].append(f"{case.name}: {e.kind} {e.shown}")

    @staticmethod
    def _lexists(p: bytes) -> bool:
        return os.path.lexists(p)

    def check_spool_settled(self) -> None:
        adm = self.home.queue / "admitting"
        left = [os.path.join(os.fsencode(adm), n) for n in os.listdir(os.fsencode(adm))] if adm.is_dir() else []
        if left:
            self.failures["left in queue/admitting"].append(self.describe_paths(left))
        for r in db_rows(self.home, "SELECT id, name FROM jobs WHERE state = 'admitting'"):
            self.failures["job rows left in state admitting"].append(f"job {r['id']} {r['name']!a}")

    def check_decoy(self) -> None:
        after = tree_snapshot(self.decoy.root)
        droot = str(self.decoy.root)
        pointing: dict[str, set[str]] = defaultdict(set)  # decoy entry -> cases with a link or eval_file into it
        for case in self.cases:
            for e in case.entries:
                if e.target:
                    full = os.path.normpath(os.path.join(os.path.dirname(os.fsdecode(e.path)), e.target))
                    if full == droot or full.startswith(droot + "/"):
                        pointing[os.path.relpath(full, droot)].add(case.name)
        home_by_ino = {(it.st.st_dev, it.st.st_ino): it for it in index_tree(self.home.root, self.quarantine)}
        hb = os.fsencode(self.home.root)
        for key in sorted(set(self.decoy_before) | set(after)):
            before, now = self.decoy_before.get(key), after.get(key)
            if before == now:
                continue
            what = "missing" if now is None else ("new" if before is None else f"changed {before} -> {now}")
            whose = {c for k, cs in pointing.items() if k in (key, ".") or key.startswith(k + "/") for c in cs}
            found = ""
            if now is None and before and before[0] == "file":
                ino = next((i for i, r in self.decoy_inodes.items() if r == key), None)
                it = home_by_ino.get(ino) if ino else None
                found = f"; now at {rel(it.path, hb)}" if it else ""
            self.failures["decoy folder modified"].append(
                f"decoy/{key}: {what}{found}; cases pointing at it: {', '.join(sorted(whose)) or '?'}"
            )

    def check_leaks(self) -> None:
        """No decoy content anywhere in the home (error files, DB rows, status, runs, queue, inbox); the
        logs (not served by the API) are only noted; the DB is checked row by row."""
        hb = os.fsencode(self.home.root)
        mark = fc.DECOY_MARK.encode()
        for it in index_tree(self.home.root, self.quarantine):
            if not it.regular or it.place == "quarantine":
                continue
            relpath = os.path.relpath(it.path, hb)
            if relpath.startswith(b"trainbox.db") or mark not in it.content():
                continue
            hits = sorted({r for m, r in self.decoy.markers.items() if m.encode() in it.content()})
            text = f"{rel(it.path, hb)} holds the content of decoy/{', decoy/'.join(hits)}"
            if relpath.startswith(b"logs/"):
                self.info["decoy content in logs (not API-visible)"].append(text)
            else:
                self.failures["decoy content in the home"].append(text)
        for table in [r[0] for r in db_rows(self.home, "SELECT name FROM sqlite_master WHERE type = 'table'")]:
            for row in db_rows(self.home, f'SELECT * FROM "{table}"'):
                text = " ".join(str(v) for v in tuple(row))
                if fc.DECOY_MARK in text:
                    hits = sorted({r for m, r in self.decoy.markers.items() if m in text})
                    self.failures["decoy content in DB rows"].append(f"{table}: {text[:300]!a} (decoy/{hits})")

    def check_log(self) -> None:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return
        n_tb = text.count("Traceback (most recent call last)")
        if n_tb:
            self.info["daemon log"].append(f"{n_tb} traceback(s) in {self.log_path}")
        seen: dict[str, int] = {}
        for line in text.splitlines():
            m = re.search(r"tick failed \(\d+ in a row\): (.*)", line)
            if m:
                seen[m.group(1)] = seen.get(m.group(1), 0) + 1
        for msg, count in seen.items():
            who = ", ".join(sorted(set(self.cases_named_in(msg)))) or "?"
            self.info["failed ticks (the daemon caught an OSError and went on)"].append(f"{count}x {msg[:200]} [{who}]")

    # --- the report ---
    def report(self) -> str:
        plan_line = ", ".join(c.name for c in self.cases)
        outcome_lines = []
        for case in self.cases:
            parts = [f"{e.role}:{self.outcomes.get(id(e), e.kind)}" for e in case.entries]
            outcome_lines.append(f"  {case.name}: {' '.join(parts)}{'  (' + case.note + ')' if case.note else ''}")
        report = {
            "seed": SEED,
            "mode": self.mode,
            "cases": [c.name for c in self.cases],
            "failures": self.failures,
            "info": self.info,
            "runtime_s": self.now(),
        }
        (self.tmp / "fuzz-report.json").write_text(json.dumps(report, indent=1, default=str))
        (self.tmp / "fuzz-outcomes.txt").write_text("\n".join(outcome_lines) + "\n")
        lines = [
            f"inbox fuzz ({self.mode}): seed {SEED}, {len(self.cases)} cases, {self.now()}s; "
            f"reproduce: TRAINBOX_FUZZ_SEED={SEED} TRAINBOX_FUZZ_{'UP_' if self.mode == 'up' else ''}CASES="
            f"{self.n_cases}" + (f" TRAINBOX_FUZZ_ONLY={','.join(ONLY)}" if ONLY else ""),
            f"report: {self.tmp / 'fuzz-report.json'}; per-case outcomes: {self.tmp / 'fuzz-outcomes.txt'}",
        ]
        for key, items in self.failures.items():
            lines.append(f"FAILED {key} ({len(items)}):")
            lines += [f"  - {x}" for x in items[:60]] + (
                [f"  ... and {len(items) - 60} more"] if len(items) > 60 else []
            )
        for key, items in self.info.items():
            lines.append(f"note: {key}: " + "; ".join(items[:12]))
        lines.append(f"cases: {plan_line}")
        return "\n".join(lines)


def run_fuzz(tmp_path: Path, embedded: Path, mode: str, n: int) -> None:
    h = Harness(tmp_path, embedded, mode, n)
    reported: set[int] = set()
    try:
        h.start()
        if not h.wait(lambda: h.daemon_status().get("state") == "paused", 90, "the daemon started paused"):
            pytest.fail("the daemon did not start paused within 90s:\n" + h.log_tail(30))
        h.drop(fc.plan(SEED, n, ONLY))
        h.entries_after_later()
        h.wait_drained(60 + 0.1 * n)
        h.check_outcomes(h.check_places("after the drain", reported))
        if not h.gave_up:
            h.cancel_waiting()
            h.good_file()
        h.stop()
    finally:
        h.cleanup()
    h.check_places("at the end", reported)
    h.check_daemon_identity()
    h.check_spool_settled()
    h.check_refusals_reported()
    h.check_decoy()
    h.check_leaks()
    h.check_log()
    text = h.report()
    print(text)
    if h.failures:
        pytest.fail(text, pytrace=False)


@pytest.mark.timeout(900)
def test_hostile_inbox_daemon_survives_and_files_everything_once(tmp_path: Path, embedded: Path) -> None:
    run_fuzz(tmp_path, embedded, "daemon", N_CASES)


@pytest.mark.timeout(600)
def test_hostile_inbox_under_trainbox_up_causes_no_restart(tmp_path: Path, embedded: Path) -> None:
    run_fuzz(tmp_path, embedded, "up", N_UP_CASES)
