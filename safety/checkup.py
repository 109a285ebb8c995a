"""``trainbox health``: one look at everything that keeps an instance alive, for people and monitors.

Each check returns (name, level, detail); the exit code is the worst level: 0 ok, 1 warning,
2 critical. Read-only: the lock is inspected through /proc/locks (never taken, so a daemon starting
at that moment is not refused), the DB is opened read-only.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from enum import IntEnum
from functools import partial
from pathlib import Path

from trainbox.atomic import read_json
from trainbox.config import Settings
from trainbox.home import Home
from trainbox.outcomes import DELIBERATE_KILL
from trainbox.spool import Spool
from trainbox.spool_states import disagreement, places
from trainbox.states import DaemonState, Priority
from trainbox.status import (
    DAEMON_STATUS,
    TRAINING_STATUS,
    DaemonStatus,
    TrainingStatus,
    daemon_liveness,
    pid_alive,
    read_status,
)

RECENT_CRASH_S = 24 * 3600
BENIGN_DETAILS = ("stopped_on_request", DELIBERATE_KILL)  # crash-report details that are not a fault
ADMITTING_STUCK_S = 300


class Level(IntEnum):
    OK = 0
    WARNING = 1
    CRITICAL = 2


@dataclass
class Check:
    name: str
    level: Level
    detail: str

    def to_json(self) -> dict[str, str]:
        d = asdict(self)
        d["level"] = self.level.name.lower()
        return d


def _job_id(name: str) -> int | None:
    head = name.partition("__")[0]
    return int(head) if head.isdigit() else None


def check_daemon(home: Home, settings: Settings, now: float) -> list[Check]:
    d = read_status(home.status / DAEMON_STATUS, DaemonStatus)
    live = daemon_liveness(d, now, settings.daemon.poll_interval)
    out = []
    if live == "up" and d is not None:
        out.append(Check("daemon", Level.OK, f"{d.state.value}, pid {d.pid}, heartbeat {now - d.heartbeat:.1f}s ago"))
    elif live in ("absent", "stopped"):
        out.append(Check("daemon", Level.WARNING, f"not running ({live})"))
    else:
        age = f"{now - d.heartbeat:.0f}s" if d else "?"
        out.append(Check("daemon", Level.CRITICAL, f"{live}: pid {d.pid if d else '?'}, last heartbeat {age} ago"))
    if live == "up" and d is not None and d.worker_pid:
        t = read_status(home.status / TRAINING_STATUS, TrainingStatus)
        wd = read_json(home.status / "watchdog.json") or {}
        limits = wd.get("limits_s", {}) if isinstance(wd, dict) else {}
        if not pid_alive(d.worker_pid):
            out.append(Check("worker", Level.WARNING, f"pid {d.worker_pid} is gone (the daemon reaps it next tick)"))
        elif t is None or t.pid != d.worker_pid:
            out.append(Check("worker", Level.OK, f"pid {d.worker_pid} starting"))
        else:
            beat_age = now - t.heartbeat
            limit = limits.get(t.phase)
            level = Level.WARNING if (limit is not None and beat_age > limit) else Level.OK
            lim = f" (limit {limit:.0f}s)" if limit is not None else ""
            where = f"job {t.job_id} {t.phase} step {t.step}/{t.total_steps}"
            out.append(Check("worker", level, f"{where}, heartbeat {beat_age:.1f}s{lim}"))
    return out


def check_sibling(home: Home, name: str, file: str, stale_after: float, now: float) -> Check:
    data = read_json(home.status / file)
    if not isinstance(data, dict):
        return Check(name, Level.WARNING, "never ran here")
    pid, hb = int(data.get("pid") or 0), float(data.get("heartbeat") or 0)
    if not pid_alive(pid):
        return Check(name, Level.WARNING, f"not running (pid {pid} gone, last heartbeat {now - hb:.0f}s ago)")
    if now - hb > stale_after:
        return Check(name, Level.WARNING, f"pid {pid} alive but heartbeat {now - hb:.0f}s old")
    extra = f"; {data['last_intervention']}" if data.get("last_intervention") else ""
    return Check(name, Level.OK, f"pid {pid}, heartbeat {now - hb:.1f}s ago{extra}")


def lock_holders(lock_file: Path) -> list[int]:
    """Pids holding a flock on ``lock_file``, from /proc/locks (inspected, never taken)."""
    try:
        st = os.stat(lock_file)
        text = Path("/proc/locks").read_text()
    except OSError:
        return []
    pids = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5].count(":") == 2:
            _maj, _min, ino = parts[5].split(":")
            if ino.isdigit() and int(ino) == st.st_ino and parts[4].isdigit():
                pids.append(int(parts[4]))
    return pids


def check_lock(home: Home, settings: Settings, now: float) -> Check:
    lock = home.root / "trainbox.lock"
    d = read_status(home.status / DAEMON_STATUS, DaemonStatus)
    live = daemon_liveness(d, now, settings.daemon.poll_interval)
    holders = lock_holders(lock)
    if not holders:
        if live == "up":
            return Check("lock", Level.CRITICAL, "the daemon runs but nobody holds trainbox.lock")
        return Check("lock", Level.OK, "free (no daemon)")
    if d is not None and live == "up" and d.pid not in holders:
        return Check("lock", Level.CRITICAL, f"held by pid {holders}, but the daemon heartbeat is from pid {d.pid}")
    return Check("lock", Level.OK, f"held by pid {holders[0]}")


def check_disk(home: Home, settings: Settings) -> list[Check]:
    where = home.root
    while not where.exists() and where != where.parent:
        where = where.parent  # a home not created yet: the disk it would be on
    st = os.statvfs(where)
    free_share = st.f_bavail / st.f_blocks if st.f_blocks else 1.0
    inode_share = st.f_favail / st.f_files if st.f_files else 1.0
    want = max(settings.retention.min_free_share, 0.05)
    out = []
    free_gb = st.f_bavail * st.f_frsize / 1e9
    level = Level.CRITICAL if free_share < 0.02 else Level.WARNING if free_share < want else Level.OK
    out.append(Check("disk", level, f"{free_gb:.1f} GB free ({free_share:.1%}; want >= {want:.0%})"))
    if st.f_files:
        level = Level.CRITICAL if inode_share < 0.02 else Level.WARNING if inode_share < 0.1 else Level.OK
        out.append(Check("inodes", level, f"{st.f_favail} free ({inode_share:.1%})"))
    return out


def check_gpu() -> Check:
    try:
        import pynvml

        pynvml.nvmlInit()
    except ImportError:
        return Check("gpu", Level.OK, "no GPU: nvidia-ml-py not installed")
    except Exception as e:  # NVMLError_LibraryNotFound, DriverNotLoaded: a CPU-only machine is a state
        return Check("gpu", Level.OK, f"no GPU ({type(e).__name__})")
    try:
        parts, worst = [], Level.OK
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            name = pynvml.nvmlDeviceGetName(h)
            name = name.decode() if isinstance(name, bytes) else str(name)
            parts.append(f"{i}: {name} {int(mem.used) / 2**30:.1f}/{int(mem.total) / 2**30:.1f} GiB")
        return Check("gpu", worst, "; ".join(parts) or "NVML found no device")
    except pynvml.NVMLError as e:
        return Check("gpu", Level.CRITICAL, f"NVML error: {e}")
    finally:
        with contextlib.suppress(pynvml.NVMLError):
            pynvml.nvmlShutdown()


def check_db(home: Home, url: str | None = None) -> Check:
    """SQLite: the file's integrity check; a server (``[db] url``): reachable, and its schema revision."""
    if url is not None and url != home.db_url:
        from safety.db_server import describe_server

        ok, detail = describe_server(url)
        return Check("db", Level.OK if ok else Level.CRITICAL, detail)
    if not home.db_file.exists():
        return Check("db", Level.OK, "no DB yet")
    try:
        con = sqlite3.connect(f"file:{home.db_file}?mode=ro", uri=True, timeout=10)
        try:
            rows = con.execute("PRAGMA integrity_check").fetchall()
        finally:
            con.close()
    except sqlite3.Error as e:
        return Check("db", Level.CRITICAL, f"cannot read {home.db_file.name}: {e}")
    result = "; ".join(str(r[0]) for r in rows[:5])
    return Check("db", Level.OK if result == "ok" else Level.CRITICAL, f"integrity_check: {result}")


def check_queue(home: Home, settings: Settings, now: float) -> list[Check]:
    places: dict[int, list[str]] = {}
    folders = [(p.value, home.waiting(p)) for p in Priority] + [
        ("processing", home.processing),
        ("done", home.done),
        ("failed", home.failed),
    ]
    for label, folder in folders:
        if folder.is_dir():
            for f in folder.glob("*.jsonl"):
                jid = _job_id(f.name)
                if jid is not None:
                    places.setdefault(jid, []).append(label)
    out = []
    dup = {j: w for j, w in places.items() if len(w) > 1}
    if dup:
        out.append(Check("queue", Level.CRITICAL, f"jobs in two places: {dup}"))
    processing = [j for j, w in places.items() if "processing" in w]
    d = read_status(home.status / DAEMON_STATUS, DaemonStatus)
    live = daemon_liveness(d, now, settings.daemon.poll_interval)
    if live == "up" and d is not None and processing:
        busy = d.worker_pid is not None and pid_alive(d.worker_pid)
        resting = d.state in (DaemonState.PAUSED, DaemonState.STOPPING) or bool(d.message)
        if not busy and not resting and now - d.started_at > 10:
            out.append(Check("queue", Level.WARNING, f"job(s) {processing} in processing/ without a live worker"))
    if len(processing) > 1:
        out.append(Check("queue", Level.WARNING, f"{len(processing)} jobs in processing/: {processing}"))
    admitting = home.queue / "admitting"
    stuck = []
    if admitting.is_dir():
        stuck = [f.name for f in admitting.glob("*") if now - f.stat().st_mtime > ADMITTING_STUCK_S]
    if stuck:
        out.append(Check("queue", Level.WARNING, f"left in queue/admitting/: {stuck[:5]} (recovered at daemon start)"))
    if not out:
        counts = {k: sum(1 for w in places.values() if k in w) for k, _ in folders}
        # failed jobs counted as the API, the dashboard and `trainbox status` count them (one error
        # file each), not by data files: a rejected non-.jsonl drop has an error file but no .jsonl
        counts["failed"] = Spool(home).counts()["failed"]
        out.append(Check("queue", Level.OK, ", ".join(f"{k} {v}" for k, v in counts.items())))
    return out


def _rows(db_file: Path) -> tuple[dict[int, str], set[int]]:
    """Every job row's state and the jobs with a model version, read-only."""
    con = sqlite3.connect(f"file:{db_file}?mode=ro", uri=True, timeout=10)
    try:
        states = {int(i): str(st) for i, st in con.execute("SELECT id, state FROM jobs")}
        versions = {int(j) for (j,) in con.execute("SELECT job_id FROM model_versions WHERE job_id IS NOT NULL")}
    finally:
        con.close()
    return states, versions


def check_spool_db(home: Home, url: str | None = None) -> Check:
    """Rows against files (``trainbox/spool_states.py``, the rules the daemon's start-up reconciliation
    fixes by). Rows, then the folders, then rows again: only a disagreement both readings show is
    reported, so a move the running daemon makes between its rename and its row update is not."""
    errors: tuple[type[Exception], ...] = (sqlite3.Error,)
    if url is not None and url != home.db_url:
        from sqlalchemy.exc import SQLAlchemyError

        from safety.db_server import server_rows

        errors = (sqlite3.Error, SQLAlchemyError)
        read: Callable[[], tuple[dict[int, str], set[int]]] = partial(server_rows, url)
    elif not home.db_file.exists():
        return Check("spool-db", Level.OK, "no DB yet")
    else:
        read = partial(_rows, home.db_file)
    try:
        before, _ = read()
        where = places(home)
        after, versions = read()
    except errors as e:
        if "no such table" in str(e) or "does not exist" in str(e):
            return Check("spool-db", Level.OK, "no job table yet")
        return Check("spool-db", Level.WARNING, f"cannot compare: {e}")
    wrong: dict[int, str] = {}
    for job_id, state in after.items():
        if before.get(job_id) != state:
            continue  # changing while we looked: the daemon is at work on it
        problem = disagreement(state, where.get(job_id, []), job_id in versions)
        if problem:
            wrong[job_id] = problem
    if not wrong:
        return Check("spool-db", Level.OK, f"{len(after)} job rows agree with the spool")
    shown = "; ".join(f"job {j}: {p}" for j, p in sorted(wrong.items())[:10])
    more = f" (and {len(wrong) - 10} more)" if len(wrong) > 10 else ""
    return Check(
        "spool-db",
        Level.WARNING,
        f"{len(wrong)} job(s) {sorted(wrong)[:20]} disagree with the spool: {shown}{more}; "
        "the daemon sets these rows from the files at its next start",
    )


def recent_crashes(home: Home, now: float, window: float = RECENT_CRASH_S) -> list[dict[str, object]]:
    found = []
    if home.runs.is_dir():
        for report in home.runs.glob("job-*/crash-report.json"):
            data = read_json(report)
            if isinstance(data, dict) and now - float(data.get("time") or 0) <= window:
                found.append(data)
    return sorted(found, key=lambda r: float(r.get("time") or 0))  # type: ignore[arg-type]


def _crash_label(report: dict[str, object]) -> str:
    cls, detail = report.get("failure_class") or "stopped", report.get("detail")
    return f"{cls} ({detail})" if detail else str(cls)


def check_crashes(home: Home, now: float) -> Check:
    """Crashes of the last day warn; a stop that was asked for and a deliberate kill (someone's SIGKILL,
    the kernel's OOM killer ruled out: ``trainbox/outcomes.py``) are information, not warnings."""
    crashes = recent_crashes(home, now)
    if not crashes:
        return Check("crashes", Level.OK, "none in the last 24 h")
    alarming = [c for c in crashes if c.get("detail") not in BENIGN_DETAILS]
    last = (alarming or crashes)[-1]
    benign = len(crashes) - len(alarming)
    info = f" ({benign} of them stopped on request or killed on purpose)" if alarming and benign else ""
    return Check(
        "crashes",
        Level.WARNING if alarming else Level.OK,
        f"{len(crashes)} in 24 h{info}; latest{' alarming' if alarming and benign else ''} job {last.get('job_id')}: "
        f"{_crash_label(last)}: {last.get('summary')} -> {last.get('action')}",
    )


def run_checks(
    home: Home, settings: Settings, now: float | None = None, gpu: Callable[[], Check] = check_gpu
) -> list[Check]:
    now = time.time() if now is None else now
    checks = check_daemon(home, settings, now)
    checks.append(check_sibling(home, "watchdog", "watchdog.json", max(15.0, 10 * settings.watchdog.interval), now))
    checks.append(check_sibling(home, "retention", "retention.json", 3 * settings.retention.interval + 60, now))
    checks.append(check_lock(home, settings, now))
    checks += check_disk(home, settings)
    checks.append(gpu())
    url = settings.db.url_for(home.db_url)
    checks.append(check_db(home, url))
    checks += check_queue(home, settings, now)
    checks.append(check_spool_db(home, url))
    checks.append(check_crashes(home, now))
    checks.append(check_fleet(url, now))
    return checks


def check_fleet(url: str, now: float) -> Check:
    """The fleet's hosts (issue 18): a warning naming any that went stale."""
    from sqlalchemy.exc import SQLAlchemyError

    from management.fleet import summary
    from safety.fleet_read import read_hosts

    try:
        hosts = read_hosts(url)
    except SQLAlchemyError as e:
        return Check("fleet", Level.WARNING, f"cannot read the hosts: {type(e).__name__}")
    if hosts is None:
        return Check("fleet", Level.OK, "no hosts table yet (a daemon's start adds it)")
    fine, detail = summary(hosts, now)
    return Check("fleet", Level.OK if fine else Level.WARNING, detail)


def overall(checks: list[Check]) -> Level:
    return max((c.level for c in checks), default=Level.OK)
