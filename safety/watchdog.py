"""The watchdog process (``trainbox watchdog``): keeps the daemon alive and unhangs workers.

Each ``loop(now)`` (STYLE 1) reads the two heartbeats, ``status/daemon.json`` and
``status/training.json``, and decides:

- **daemon dead** (pid gone while its state is not "stopped") or **hung** (heartbeat older than
  ``daemon_liveness`` allows): restarted in its own session, logging to ``logs/daemon.log``; a hung
  one is SIGTERMed, then SIGKILLed, first, and a worker it orphaned is stopped (it checkpoints) so
  two workers never train one job. Not when systemd (``$INVOCATION_ID``) or ``trainbox up``
  (``$TRAINBOX_SUPERVISED``) runs it: they restart it themselves (``watchdog.restart_daemon``).
  A daemon stopped on purpose, or never started here, is left alone.
- **worker hung**: only while the daemon reports a live worker (an idle daemon has none, so it is
  never judged). The limit of each phase (loading, training, evaluating, checkpointing) is
  ``hang_factor`` times the longest heartbeat interval measured in that phase, clamped to the
  phase's floor and ceiling; the ceiling until something is measured. Measurements persist in
  ``status/watchdog.json``. A hung worker gets the kill marker (``trainbox/markers.py``, so the daemon
  resumes its job from the last checkpoint), SIGTERM, then SIGKILL of its process group after
  ``kill_grace`` without a heartbeat.
- **crashes**: every run the daemon recorded as ended abnormally gets a crash report
  (``safety/crash.py``).

Every intervention is a DB event carrying its evidence.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from management.db import Event, ModelDB, schema_ready
from safety.crash_scan import CrashScanner
from safety.phase_clock import ACTIVE_PHASES, PhaseClock
from safety.worker_sample import GapWatch, sample
from trainbox.atomic import atomic_write_json, read_json
from trainbox.config import Settings
from trainbox.home import Home
from trainbox.markers import write_kill_marker
from trainbox.processes import cmdline, is_worker_pid, kill_tree, spawn_logged
from trainbox.sdnotify import under_systemd
from trainbox.status import (
    DAEMON_STATUS,
    TRAINING_STATUS,
    DaemonStatus,
    TrainingStatus,
    daemon_liveness,
    pid_alive,
    read_status,
)

log = logging.getLogger("trainbox.watchdog")

WATCHDOG_STATUS = "watchdog.json"
SUPERVISED_ENV = "TRAINBOX_SUPERVISED"
CRASH_SCAN_EVERY = 5.0


# --- process helpers -------------------------------------------------------------------------------


def is_daemon(pid: int | None) -> bool:
    text = " ".join(cmdline(pid or 0)) if pid else ""
    return bool(pid) and pid_alive(pid) and "trainbox" in text and " daemon" in text


def process_start_time(pid: int) -> float | None:
    try:
        import psutil

        return float(psutil.Process(pid).create_time())
    except Exception:  # gone, or no access: no start time
        return None


def _signal(pid: int, sig: signal.Signals, group: bool = False) -> bool:
    """``group`` (with SIGKILL): ``pid``'s group and each rank's under it (``kill_tree``), listed before the kill."""
    try:
        os.kill(pid, 0 if group else sig)  # a pid that is gone raises here
        if group:
            kill_tree(pid)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def daemon_command(home: Home) -> list[str]:
    return [sys.executable, "-m", "cli", "daemon", "--home", str(home.root)]


# --- the watchdog ----------------------------------------------------------------------------------


@dataclass
class Kill:
    """A hung process being stopped: SIGTERM sent at ``term_at``; SIGKILL due after the grace."""

    pid: int
    term_at: float
    heartbeat: float
    evidence: dict[str, Any] = field(default_factory=dict)
    killed: bool = False


class Watchdog:
    name = "watchdog"

    def __init__(self, home: Home, settings: Settings, db: ModelDB | None = None) -> None:
        self.home = home
        self.settings = settings
        self.cfg = settings.watchdog
        self.interval = self.cfg.interval
        self._db = db
        saved = read_json(home.status / WATCHDOG_STATUS) or {}
        self.clock = PhaseClock(self.cfg, saved.get("longest_interval_s") if isinstance(saved, dict) else None)
        self.gaps = GapWatch()  # whether the worker's current heartbeat gap is healthy (learnable)
        self.worker_kill: Kill | None = None
        self.daemon_kill: Kill | None = None
        self.orphan_kill: Kill | None = None
        self.children: list[subprocess.Popen[bytes]] = []
        self.restarts_in_a_row = 0
        self.next_restart_at = 0.0
        self.restarted_at: float | None = None
        self.left_alone_reported = False
        self.interventions = 0
        self.last_intervention = ""
        self.crashes = CrashScanner(home, self.db_ready, lambda: self.db, self._event)
        self.last_crash_scan = 0.0
        self.started_at = time.time()

    @property
    def db(self) -> ModelDB:
        """Opened once the daemon has created the schema: two processes creating it at once can collide."""
        if self._db is None:
            self._db = ModelDB(self.settings.db.url_for(self.home.db_url))
        return self._db

    def db_ready(self) -> bool:
        return self._db is not None or schema_ready(self.settings.db.url_for(self.home.db_url))

    # who restarts the daemon
    def restart_owner(self) -> str | None:
        """None when the watchdog restarts the daemon itself, else who does."""
        mode = self.cfg.restart_daemon
        if mode == "never":
            return "nobody (watchdog.restart_daemon = never)"
        if mode == "always":
            return None
        if under_systemd():
            return "systemd"
        if os.environ.get(SUPERVISED_ENV):
            return "trainbox up"
        return None

    def loop(self, now: float) -> None:
        self._reap_children()
        daemon = read_status(self.home.status / DAEMON_STATUS, DaemonStatus)
        self.check_daemon(daemon, now)
        self.check_worker(daemon, now)
        if now - self.last_crash_scan >= CRASH_SCAN_EVERY:
            self.last_crash_scan = now
            self.crashes.scan(now)
        self.write_status(now)

    # --- the daemon ---
    def check_daemon(self, status: DaemonStatus | None, now: float) -> None:
        if self.daemon_kill is not None:
            self._continue_daemon_kill(now)
            return
        if self.restarted_at is not None and now - self.restarted_at < self.cfg.startup_grace:
            fresh = status is not None and status.heartbeat >= self.restarted_at
            if not fresh:
                return  # give the new daemon time to write its first heartbeat
        liveness = daemon_liveness(status, now, self.settings.daemon.poll_interval)
        if liveness in ("absent", "stopped", "up"):
            if liveness == "up":
                self.restarts_in_a_row = 0
                self.restarted_at = None
                self.left_alone_reported = False
            return
        assert status is not None
        evidence = {
            "liveness": liveness,
            "pid": status.pid,
            "state": status.state.value,
            "heartbeat_age_s": round(now - status.heartbeat, 1),
            "worker_pid": status.worker_pid,
            "current_job": status.current_job,
        }
        owner = self.restart_owner()
        if owner is not None:
            if not self.left_alone_reported:
                self.left_alone_reported = True
                self._event("watchdog_daemon_down", f"daemon {liveness}; restart left to {owner}", None, evidence)
            return
        if liveness == "stale" and is_daemon(status.pid):
            self._event("watchdog_daemon_hung", f"daemon pid {status.pid} hung: stopping it", None, evidence)
            _signal(status.pid, signal.SIGTERM)
            self.daemon_kill = Kill(status.pid, now, status.heartbeat, evidence)
            return
        if status.worker_pid and is_worker_pid(status.worker_pid):
            self._stop_orphan(status.worker_pid, status.current_job, now, evidence)
            return
        if now >= self.next_restart_at:
            self.restart_daemon(now, evidence)

    def _continue_daemon_kill(self, now: float) -> None:
        k = self.daemon_kill
        assert k is not None
        if is_daemon(k.pid):
            if not k.killed and now - k.term_at > self.cfg.kill_grace:
                _signal(k.pid, signal.SIGKILL)
                k.killed = True
                self._event("watchdog_daemon_killed", f"daemon pid {k.pid} SIGKILLed", None, k.evidence)
            return
        self.daemon_kill = None  # gone: the next loop sees it down and restarts it

    def _stop_orphan(self, pid: int, job_id: int | None, now: float, evidence: dict[str, Any]) -> None:
        """A worker left by a dead daemon: it checkpoints and exits before a new daemon resumes its job."""
        k = self.orphan_kill
        if k is None or k.pid != pid:
            self.orphan_kill = Kill(pid, now, now, evidence)
            _signal(pid, signal.SIGTERM)
            self._event(
                "watchdog_orphan_stopped",
                f"daemon died leaving worker pid {pid}: asked it to checkpoint and exit",
                job_id,
                evidence,
            )
        elif not k.killed and now - k.term_at > self.settings.daemon.worker_stop_timeout:
            _signal(pid, signal.SIGKILL, group=True)
            k.killed = True
            self._event("watchdog_orphan_killed", f"orphaned worker pid {pid} SIGKILLed", job_id, evidence)

    def restart_daemon(self, now: float, evidence: dict[str, Any]) -> None:
        argv = daemon_command(self.home)
        proc = spawn_logged(argv, self.home.root / "logs" / "daemon.log")
        self.children.append(proc)
        self.restarts_in_a_row += 1
        self.restarted_at = now
        backoff = min(600.0, self.cfg.restart_backoff * 2 ** (self.restarts_in_a_row - 1))
        self.next_restart_at = now + backoff
        self.orphan_kill = None
        self._event(
            "watchdog_daemon_restarted",
            f"daemon {evidence['liveness']}: restarted as pid {proc.pid}",
            None,
            {**evidence, "new_pid": proc.pid, "restarts_in_a_row": self.restarts_in_a_row},
        )

    def _reap_children(self) -> None:
        self.children = [p for p in self.children if p.poll() is None]  # no zombie looks alive

    # --- the worker ---
    def check_worker(self, daemon: DaemonStatus | None, now: float) -> None:
        k = self.worker_kill
        if k is not None:
            self._continue_worker_kill(k, now)
            return
        pid = daemon.worker_pid if daemon is not None and daemon.state.value != "stopped" else None
        if not pid or not is_worker_pid(pid):
            self.crashes.observe(None)  # a worker seen before is gone: its OOM-kill count at its end
            return
        self.crashes.observe(pid)
        training = read_status(self.home.status / TRAINING_STATUS, TrainingStatus)
        if training is not None and training.pid == pid:
            healthy = self.gaps.update(pid, training.heartbeat, sample(pid))
            self.clock.observe(pid, training.phase, training.heartbeat, healthy)
            phase, since = training.phase, training.heartbeat
        else:  # not written yet: judge the start-up as loading, from the process start
            phase, since = "loading", process_start_time(pid) or now
            training = None
        if phase not in ACTIVE_PHASES:
            return
        age, limit = now - since, self.clock.limit(phase)
        if age <= limit:
            return
        job_id = daemon.current_job if daemon is not None else None
        evidence = {
            "pid": pid,
            "job_id": job_id,
            "phase": phase,
            "step": training.step if training else None,
            "heartbeat": since,
            # to 0.1 s, age rounded up and limit down: the evidence shows age > limit, as judged
            "heartbeat_age_s": math.ceil(age * 10) / 10,
            "limit_s": math.floor(limit * 10) / 10,
            "longest_interval_s": self.clock.longest.get(phase),
            "floor_s": self.clock.bounds(phase)[0],
            "ceiling_s": self.clock.bounds(phase)[1],
            "time": now,
        }
        if job_id is not None:
            write_kill_marker(self.home.run_dir(job_id), evidence)
        _signal(pid, signal.SIGTERM)
        self.worker_kill = Kill(pid, now, since, evidence)
        self._event(
            "watchdog_worker_hung",
            f"worker pid {pid} hung in {phase}: no heartbeat for {age:.0f}s (limit {limit:.0f}s); SIGTERM sent",
            job_id,
            evidence,
        )

    def _continue_worker_kill(self, k: Kill, now: float) -> None:
        if not is_worker_pid(k.pid):
            self.worker_kill = None
            return
        training = read_status(self.home.status / TRAINING_STATUS, TrainingStatus)
        last_sign = max(k.term_at, training.heartbeat if training and training.pid == k.pid else 0.0)
        if not k.killed and now - last_sign > self.cfg.kill_grace:
            _signal(k.pid, signal.SIGKILL, group=True)
            k.killed = True
            self._event(
                "watchdog_worker_killed",
                f"worker pid {k.pid} did not stop {self.cfg.kill_grace:.0f}s after SIGTERM: SIGKILLed",
                k.evidence.get("job_id"),
                k.evidence,
            )

    # --- crash reports ---
    # --- bookkeeping ---
    def _event(
        self, kind: str, message: str, job_id: int | None, data: dict[str, Any] | None = None, count: bool = True
    ) -> None:
        if count:
            log.warning("%s: %s", kind, message)
            self.interventions += 1
            self.last_intervention = f"{kind}: {message}"
        else:
            log.info("%s: %s", kind, message)
        payload = {k: v for k, v in (data or {}).items() if k not in ("kind", "message", "job_id")}  # columns
        try:
            self.db.event(kind, message, job_id, **payload)
        except Exception as e:  # boundary: a locked DB must not stop the watchdog from watching
            log.warning("could not record event %s: %s", kind, e)

    def write_status(self, now: float) -> None:
        with contextlib.suppress(OSError):
            atomic_write_json(
                self.home.status / WATCHDOG_STATUS,
                {
                    "pid": os.getpid(),
                    "started_at": self.started_at,
                    "heartbeat": now,
                    "longest_interval_s": self.clock.longest,
                    "unlearned_gaps_s": [[p, round(g, 1)] for p, g in self.clock.unlearned],
                    "limits_s": {p: round(self.clock.limit(p), 1) for p in ACTIVE_PHASES},
                    "restart_owner": self.restart_owner() or "watchdog",
                    "interventions": self.interventions,
                    "last_intervention": self.last_intervention,
                },
            )

    def shutdown(self) -> None:
        self._reap_children()  # restarted daemons live on in their own sessions
        if self._db is not None:
            self._db.close()


def recent_events(db: ModelDB, kinds: list[str], since: float) -> list[Event]:
    with db.session() as s:
        return list(s.query(Event).filter(Event.kind.in_(kinds), Event.time >= since).order_by(Event.id))
