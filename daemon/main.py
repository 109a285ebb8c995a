"""The daemon's main loop: wait, handle signals and control requests, admit, reap, dispatch.

Signal handlers only count signals (STYLE 3). First SIGTERM/SIGINT: warm stop (no new dispatch,
the worker checkpoints and exits, then the daemon exits). Second: cold stop (the worker's process
group is killed at once; its job resumes from its last checkpoint next time).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import shutil
import signal
import subprocess
import time
from types import FrameType
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from daemon.admission import Admission
from daemon.fleet_member import FleetMember
from daemon.gate import Gates
from daemon.host_beat import HostBeat
from daemon.inbox_report import InboxHousekeeping
from daemon.intake import InboxWatcher
from daemon.job_checks import visible_gpus
from daemon.jobs import JobRunner
from daemon.lock import InstanceLock
from daemon.node_join import NodeJoiner, stop_orphan
from daemon.notifier import Notifier
from daemon.notify_outbox import DAEMON_CRASHED, unclean_exit
from daemon.orphans import LockWait
from daemon.outcome import JobVerdict
from daemon.reports import Reports
from daemon.spool import move
from daemon.spool_reconcile import reconcile_spool
from daemon.standby import WarmWorker
from daemon.startup_runs import recover_runs
from daemon.worker_process import WorkerCommand, WorkerProcess
from management.db import Job, ModelDB
from management.leases import LeaseLost, leases
from management.version_recovery import recover_versions
from trainbox import control, sdnotify
from trainbox.config import Settings
from trainbox.home import Home
from trainbox.jobspec import WorkerResult
from trainbox.spool import Spool, job_id_of
from trainbox.states import DaemonState, JobState, WorkerOutcome
from trainbox.status import DAEMON_STATUS, DaemonStatus, read_status, write_status

log = logging.getLogger("trainbox.daemon")
MAX_TICK_FAILURES = 100  # consecutive OSError ticks (about a minute) before the daemon gives up
STATUS_REFRESH_S = 2.0  # an unchanged status file is rewritten this often (``Daemon.write_status``)


class Daemon:
    def __init__(
        self,
        home: Home,
        settings: Settings,
        worker_command: WorkerCommand | None = None,
        evaluate_entry: str | None = None,
        report_entry: str | None = None,
    ) -> None:
        """``worker_command`` (argv for a run folder), ``evaluate_entry`` (``MODULE:FUNCTION`` its kept gate
        child serves, replacing ``core.evaluate:main``) and ``report_entry`` (``management.job_report:main``):
        None runs the real ones; tests pass stubs, so ``tick`` is tested without training
        (tests/test_daemon_tick.py)."""
        self.home = home.ensure()
        self.settings = settings
        self.worker_command = worker_command
        self.evaluate_entry = evaluate_entry
        self.report_entry = report_entry
        self.lock = InstanceLock(home.root / "trainbox.lock")
        self.spool = Spool(home)
        self.db: ModelDB | None = None
        self.worker: WorkerProcess | None = None
        self.paused = False
        self.stopping = False
        self.finished = False
        self.signals = 0
        self.again = False  # work is left (admission): the loop ticks again without waiting
        self.started_at = time.time()
        self.last_rescan = 0.0
        self.message = ""
        self.disk_full_needs: int | None = None  # set while paused for lack of disk space
        # a cancel of the running job: its request (consumed once the worker is reaped, so a daemon that
        # dies meanwhile still cancels the job on its next start) and the phase the worker was in
        self.cancelling: tuple[control.ControlRequest, str] | None = None
        self.warm: WarmWorker | None = None  # the standby worker (set in start when the real worker runs)
        self.gpus = 0  # visible GPUs, counted once at start
        self.lock_wait: LockWait | None = None  # a run folder another process holds (our worker exited locked)
        self.notifier: Notifier | None = None  # webhooks' thread (daemon/notifier.py); None without [notify]
        self.host: HostBeat | None = None  # our row in the fleet's hosts table (daemon/host_beat.py)
        self.fleet: FleetMember | None = None  # [fleet] enabled: our leases (daemon/fleet_member.py)
        self.joiner: NodeJoiner | None = None  # a fleet's real workers: nodes of other hosts' multi-node jobs
        self.woken: set[int] = set()  # children whose exit ended the last wait (``wait``)
        self.job_name: tuple[int | None, str | None] = (None, None)  # the running job's id and name
        self.status_written: tuple[float, dict[str, Any] | None] = (0.0, None)  # when, and what but the heartbeat

    # signals: flag only. The loop's wait is woken by the kernel (``signal.set_wakeup_fd`` writes a byte to
    # a pipe the wait selects on), not by the handler: an Event's set() in a handler deadlocks when the
    # signal lands while the main thread holds that Event's lock inside its own wait (seen under load:
    # a daemon that never stopped on SIGTERM).
    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self.signals += 1

    def run(self) -> None:
        self.lock.acquire()  # before anything touches the spool
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        previous_fd = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        try:
            self.start()
            failures = 0
            while not self.finished:
                try:
                    self.tick(time.time())
                    failures = 0
                except (OSError, SQLAlchemyError) as e:  # boundary: a full disk must not kill the daemon
                    failures += 1
                    log.error("tick failed (%d in a row): %s", failures, e)
                    if failures >= MAX_TICK_FAILURES:
                        raise
                if not self.again:
                    self.wait(wake_r)
                self.again = False
        finally:
            self.shutdown()
            signal.set_wakeup_fd(previous_fd)
            os.close(wake_r)
            os.close(wake_w)

    def wait(self, wake_r: int) -> None:
        """Until the next tick: ``daemon.poll_interval`` at most, less when a signal arrives (its byte on
        ``wake_r``) or when a child the tick reaps exits (the worker: a pidfd is readable
        then). So a finished job's gate, and the next job after a gate, start at once rather than up to an
        interval later, and the interval can stay long: each tick costs DB queries and a status write, and
        in a fleet that CPU is taken from the workers of the same machine. A kept child (gate, reports) wakes
        it by answering (its pipe is readable) or dying (the pipe's end). A child still unreaped after
        the tick it woke (a tick that failed) is not waited on again: the loop never spins."""
        fds: dict[int, int] = {}
        children = {popen.pid for popen in self._children()}
        self.woken &= children
        try:
            for pid in children - self.woken:
                with contextlib.suppress(OSError, AttributeError):  # not Linux 5.3+, or the pid is gone
                    fds[os.pidfd_open(pid)] = pid
            answers = self._answer_fds()
            ready, _, _ = select.select([wake_r, *fds, *answers], [], [], self.settings.daemon.poll_interval)
            self.woken |= {fds[fd] for fd in ready if fd in fds}
        finally:
            for fd in fds:
                os.close(fd)
        with contextlib.suppress(BlockingIOError):
            os.read(wake_r, 512)  # the signals' bytes: the handler counted them already

    def _children(self) -> list[subprocess.Popen[bytes]]:
        """The children whose exit the tick acts on, not yet reaped (their pids cannot have been reused)."""
        found = [self.worker.popen] if self.worker is not None else []
        if self.joiner is not None and self.joiner.joined is not None:
            found.append(self.joiner.joined.agent.popen)
        return [p for p in found if p.returncode is None]

    def _answer_fds(self) -> list[int]:
        """The pipes the kept children (eval gate, reports) answer on, while each has a request in hand."""
        kept = [k.served for k in [getattr(self, "gates", None)] if k is not None]
        kept += [k.child for k in [getattr(self, "reports", None)] if k is not None]
        return [fd for served in kept if (fd := served.answer_fd()) is not None]

    def start(self) -> None:
        self.spool.ensure()
        db_url = self.settings.db.url_for(self.home.db_url)  # [db] url, else the home's SQLite file
        self.db = ModelDB(db_url)
        self.gpus = visible_gpus()
        self.host = HostBeat(self.db, self.settings.fleet, self.home.root, self.gpus)
        # before this daemon touches a job: another live daemon with our fleet name refuses us
        self.host.claim(self.started_at, self.lock.previous_pid)
        previous = read_status(self.home.status / DAEMON_STATUS, DaemonStatus)
        self.notifier = Notifier.open(self.home, self.settings)  # before any event of this start is written
        crashed = unclean_exit(previous)
        if crashed:
            self.db.event(DAEMON_CRASHED, crashed, pid=previous.pid if previous else None)
        self.paused = bool(previous and previous.paused)
        if self.settings.fleet.enabled:
            fleet = self.settings.fleet
            self.fleet = FleetMember(self.db, fleet.host, fleet.lease_seconds, fleet.heartbeat_seconds)
            self.fleet.beat(time.time())
            paused = self.fleet.start_controls()
            if paused is not None:  # the fleet's newest pause or resume for this host outranks the last run's
                self.paused = paused
            if self.worker_command is None:
                stop_orphan(self.home, self.db, fleet.host, previous.joined if previous else None)
                self.joiner = NodeJoiner(self.home, self.db, fleet.host, fleet.lease_seconds, fleet.heartbeat_seconds)
        self.admission = Admission(
            self.home, self.spool, self.db, self.settings.daemon, self.settings.training, gpus=self.gpus
        )
        self.housekeeping = InboxHousekeeping(self.home, self.db, self.settings.daemon)
        real_worker = self.worker_command is None and self.settings.daemon.warm_worker
        self.warm = WarmWorker(self.home.embedded_model) if real_worker else None
        self.runner = JobRunner(self.home, self.spool, self.db, self.settings, self.worker_command, self.warm)
        only = self.fleet.holds if self.fleet is not None else None
        self.gates = Gates(self.home, self.db, self.settings, self.runner.file_done, self.evaluate_entry, only)
        self.reports = Reports(self.home, self.db, self.report_entry, db_url)  # requests a killed daemon left
        self.runner.reports = self.reports
        if self.fleet is None:
            for admitted in self.admission.recover():
                log.info("recovered admission of job %s: %s", admitted.job_id, admitted.state.value)
            self._stop_orphans()
            recover_versions(self.home, self.db)  # pending rows, orphan folders, pointers: before any gate or job
            self.gates.stop_orphans()
            self._reconcile()
        else:
            self._start_in_fleet()
        self.watcher = InboxWatcher(
            self.home.inbox, self.settings.daemon.settle_seconds, self.settings.daemon.polling_observer, time.time
        )
        self.watcher.start()
        self.db.event("daemon_started", f"pid {os.getpid()}, home {self.home.root}")
        log.info("trainbox daemon started: home %s, pid %d", self.home.root, os.getpid())
        self.write_status(time.time())
        if self.notifier is not None:
            self.notifier.start()
        sdnotify.ready(f"daemon pid {os.getpid()}")  # systemd Type=notify: started

    def _start_in_fleet(self) -> None:
        """A fleet's daemon repairs only what is its own: the runs its host started (their workers are
        processes here); its jobs are resumed by claiming them again (its own leases are free to it). The
        leader also recovers interrupted admissions and the version rows, folders and pointers no other
        live host is working on; the rows a crash left behind their files wait for a leader's start."""
        assert self.db is not None and self.fleet is not None
        recover_runs(self.home, self.spool, self.db, self.settings.daemon.worker_stop_timeout, self.settings.fleet.host)
        if self.fleet.leading:
            for admitted in self.admission.recover():
                log.info("recovered admission of job %s: %s", admitted.job_id, admitted.state.value)
            now = time.time()
            busy = frozenset(
                h.job_id
                for h in leases(self.db)
                if h.job_id is not None and h.holder not in ("", self.settings.fleet.host) and h.expires_at > now
            )
            recover_versions(self.home, self.db, busy)

    def _stop_orphans(self) -> None:
        """A worker outlives a daemon killed with -9 (it has its own session): stop it (it checkpoints)
        before a new one is started for the same job, then close the runs left open and sweep the
        leftovers of interrupted saves (``daemon/startup_runs.py``)."""
        assert self.db is not None
        recover_runs(self.home, self.spool, self.db, self.settings.daemon.worker_stop_timeout)

    def _reconcile(self) -> None:
        """At start-up no worker is ours: a job the DB calls running is paused, to be resumed; a job
        whose model version was registered before a crash is filed as done once its gate has decided."""
        assert self.db is not None
        for path in self.spool.processing():
            job_id = job_id_of(path.name)
            assert job_id is not None
            if self.db.version_of_job(job_id) is not None:
                log.info("job %d: its model version exists; filing it once its gate has decided", job_id)
                self.runner.complete(job_id, WorkerResult(outcome=WorkerOutcome.COMPLETED))
                continue
            job = self.db.job(job_id)
            if job is not None and job.state != JobState.PAUSED:
                with self.db.session() as s:
                    row = s.get(Job, job_id)
                    if row is not None:
                        row.state = JobState.PAUSED.value
                self.db.event("job_interrupted", "daemon restarted: job will resume from its checkpoint", job_id)
        reconcile_spool(self.home, self.db)  # rows a crash left behind their files (issue 14, D5)

    def tick(self, now: float) -> None:
        self.handle_signals(now)
        self.handle_controls(now)
        self.check_disk(now)
        self.keep_leases(now)
        if self.fleet is None or self.fleet.leading:
            self.admit_ready(now)
        self.reap_worker(now)
        self.reap_node(now)
        self.reap_gate(now)
        self.release_finished(now)
        if not self.stopping:
            self.reports.tick(now)  # job reports: children, never blocking (daemon/reports.py)
        self.maybe_dispatch(now)
        self.keep_warm(now)
        self.write_status(now)
        self.beat(now)
        sdnotify.watchdog_ping()  # systemd WatchdogSec: alive

    def handle_signals(self, now: float) -> None:
        if self.signals >= 2 and self.worker is not None and self.worker.killed_at is None:
            log.warning("second stop signal: killing the worker")
            self.worker.kill()
        if self.signals >= 1:
            self.begin_stop(now)

    def begin_stop(self, now: float) -> None:
        if not self.stopping:
            log.info("stopping: the current job checkpoints first")
        self.stopping = True
        if hasattr(self, "gates"):
            self.gates.stop()  # an interrupted gate runs again at the next start
            self.reports.stop()  # and an interrupted report is drawn again
        if self.warm is not None:
            self.warm.stop()
        if self.joiner is not None:
            self.joiner.request_stop(now)  # its ranks stop with the run's other nodes at one step boundary
        if self.worker is not None:
            self.worker.request_stop(now)
        elif not self.joined:
            self.finished = True

    def handle_controls(self, now: float) -> None:
        for request in control.pending(self.home.control):
            assert self.db is not None
            if request.job_id is not None:
                if self.job_control(request, now):
                    control.consume(request)
                continue
            self.apply_daemon_action(request.action, now, "")
            control.consume(request)
        if self.fleet is not None:
            for fleet_request in self.fleet.controls(now):
                scope = f"for host {fleet_request.host}" if fleet_request.host else "for the fleet"
                self.apply_daemon_action(control.Action(fleet_request.action), now, f" ({scope})")

    def apply_daemon_action(self, action: control.Action, now: float, scope: str) -> None:
        """Pause, resume or stop, from this home's ``control/`` or the fleet's requests (``scope`` says which)."""
        assert self.db is not None
        if action == control.Action.PAUSE:
            self.paused = True
            if self.worker is not None:
                self.worker.request_stop(now)
        elif action == control.Action.RESUME:
            self.paused = False
        elif action == control.Action.STOP:
            self.begin_stop(now)
        self.db.event("control", f"{action.value} applied{scope}")
        log.info("control request applied: %s%s", action.value, scope)

    def job_control(self, request: control.ControlRequest, now: float) -> bool:
        """Apply a request about one job; False while it waits for the job's worker to stop. Cancelling
        the running job stops its worker the way pause does (SIGTERM: it checkpoints at its next step
        boundary); the reap then files it as cancelled instead of resuming it."""
        assert self.db is not None and request.job_id is not None
        worker = self.worker
        if request.action == control.Action.CANCEL and worker is not None and worker.job_id == request.job_id:
            if self.cancelling is None:
                phase = self.runner.worker_phase(worker) or "starting"
                self.cancelling = (request, phase)
                worker.request_stop(now)
                self.db.event("control", f"cancel job {request.job_id}: stopping its worker ({phase})", request.job_id)
                log.info("control request cancel job %d: stopping its worker (%s)", request.job_id, phase)
            return False
        outcome = self.runner.change_waiting(request.job_id, request.action, request.priority)
        self.db.event("control", f"{request.action.value} job {request.job_id}: {outcome}", request.job_id)
        log.info("control request %s job %d: %s", request.action.value, request.job_id, outcome)
        return True

    def _finish_worker(self, worker: WorkerProcess, rc: int, stop_was_requested: bool) -> JobVerdict | None:
        """The reap's decision, with a pending cancel of this worker's job applied (and its request
        consumed: the job is filed by now). None: this fleet host's lease of the job was taken while it
        was cut off, so it filed nothing (``fenced``)."""
        assert self.db is not None
        cancel, self.cancelling = self.cancelling, None
        try:
            with self.fenced():
                decision = self.runner.finish(worker, rc, stop_was_requested, cancelled_in=cancel[1] if cancel else "")
        except LeaseLost as e:
            self.worker = None
            self.drop_lost_job(worker.job_id, str(e))
            return None
        if cancel is not None:
            late = "" if decision.verdict == JobVerdict.CANCELLED else "came too late: "  # it had just completed
            self.db.event("control", f"cancel job {worker.job_id}: {late}{decision.reason}", worker.job_id)
            control.consume(cancel[0])
        log.info("job %d: %s: %s", worker.job_id, decision.verdict.value, decision.reason)
        if decision.verdict == JobVerdict.DISK_FULL:
            needed = int(decision.evidence.get("needed_bytes", 0) * 1.1)
            self.disk_full_needs = max(needed, self.settings.daemon.disk_resume_free_bytes)
            self.message = f"disk full: {decision.reason}; waiting for {self.disk_full_needs} bytes free"
            log.warning(self.message)
        return decision.verdict

    def check_disk(self, now: float) -> None:
        """After a disk-full pause, resume intake and training once there is room again."""
        if self.disk_full_needs is None:
            return
        free = shutil.disk_usage(self.home.storage).free  # where checkpoints are written
        if free >= self.disk_full_needs:
            assert self.db is not None
            self.db.event("disk_ok", f"{free} bytes free again (needed {self.disk_full_needs}): resuming")
            log.info("disk space is back (%d bytes free): resuming", free)
            self.disk_full_needs = None
            self.message = ""

    def admit_ready(self, now: float) -> None:
        """Admit what is complete, within the tick's admission budget; when work is left the loop does
        not sleep, so 10,000 dropped files are taken at full speed while controls are still served."""
        if self.disk_full_needs is not None:
            return  # intake waits too: admitting copies nothing, but the job could not be trained
        if now - self.last_rescan >= self.settings.daemon.rescan_interval:
            self.last_rescan = now
            try:
                self.housekeeping.on_listing(self.watcher.rescan(), now)
            except Exception:  # boundary: reporting the inbox never stops admission
                log.exception("inbox housekeeping failed; admission goes on")
        ready = self.watcher.ready()
        if not ready and not self.admission.busy:
            return
        try:
            held = self.housekeeping.held(ready) if ready else set()
        except Exception:  # boundary: without the holds an eval file is at worst admitted as a job
            log.exception("could not list the sidecars' eval files")
            held = set()
        ready = [p for p in ready if p not in held]
        for result in self.admission.work(ready, self.settings.daemon.admission_budget):
            log.info("job %d %s: %s %s", result.job_id, result.state.value, result.path.name, result.reason)
        for path in self.admission.handled:
            self.watcher.readiness.forget(path)
        if self.admission.busy or len(self.admission.handled) < len(ready):
            self.again = True

    def reap_worker(self, now: float) -> None:
        worker = self.worker
        if worker is None:
            return
        rc = worker.poll()
        if rc is None:
            timeout = self.settings.daemon.worker_stop_timeout
            stop_at = worker.stop_requested_at
            if stop_at is not None and now - stop_at > timeout and worker.killed_at is None:
                log.warning("worker did not stop within %.0fs: killing it", timeout)
                worker.kill()
            return
        # None: a fleet host cut off from its lease filed nothing (the job is another host's now)
        verdict = self._finish_worker(worker, rc, stop_was_requested=worker.stop_requested_at is not None)
        if verdict == JobVerdict.LOCKED:  # another process holds its folder: wait it out before a new start
            self.lock_wait = LockWait(worker.job_id, worker.run_dir, now)
        self.gates.refresh()  # a completed job has requested its version's gate
        self.worker = None
        if self.stopping and not self.joined:
            self.finished = True

    @property
    def joined(self) -> bool:
        """Whether this host runs a node of another host's multi-node job (``daemon/node_join.py``)."""
        return self.joiner is not None and self.joiner.busy

    def reap_node(self, now: float) -> None:
        if self.joiner is None or not self.joiner.busy:
            return
        self.joiner.tick(now, self.settings.daemon.worker_stop_timeout)
        if self.stopping and self.worker is None and not self.joiner.busy:
            self.finished = True

    def locked_out(self, now: float) -> bool:
        """Whether dispatch waits for a process outside this daemon to let go of a run folder
        (``daemon/orphans.py`` ``LockWait``: a worker of that run is stopped the way an orphan is)."""
        if self.lock_wait is None:
            return False
        if self.lock_wait.holding(now, self.settings.daemon.worker_stop_timeout):
            return True
        assert self.db is not None
        self.db.event("run_lock_free", "the run folder's lock is free again: the job can resume", self.lock_wait.job_id)
        self.lock_wait = None
        return False

    def reap_gate(self, now: float) -> None:
        """The eval gate of a finished job's version: a child reaped like a worker (``daemon/gate.py``).
        Not while stopping: an interrupted gate runs again at the next start."""
        if self.stopping:
            return
        try:
            with self.fenced():
                self.gates.tick(now)
        except LeaseLost as e:
            self.drop_lost_job(self.fleet.job.job_id if self.fleet and self.fleet.job else None, str(e))

    def fenced(self) -> contextlib.AbstractContextManager[None]:
        """A fleet's daemon records a job's end (run, version, gate, state) only while the job's lease is
        still its own, checked in each of those transactions (``ModelDB.guarded``); alone, no check."""
        if self.fleet is None:
            return contextlib.nullcontext()
        assert self.db is not None
        return self.db.guarded(self.fleet.fence)

    def keep_leases(self, now: float) -> None:
        """A fleet's daemon renews its leases; one whose job's lease another host took (it was cut off
        past the TTL, and that host resumed the job) drops the job at once without filing anything."""
        if self.fleet is None or self.fleet.beat(now):
            return
        self.drop_lost_job(self.worker.job_id if self.worker is not None else None, "found at its renewal")

    def drop_lost_job(self, job_id: int | None, how: str) -> None:
        """This host's job was taken over by another host (its lease expired while this one was cut off):
        its worker and gate stop here, nothing of it is filed here, the new holder finishes it."""
        assert self.db is not None and self.fleet is not None
        self.fleet.job = None
        if self.worker is not None:
            self.worker.kill()  # its process group: the new holder trains from the last checkpoint
            self.worker.wait(10)
            self.worker = None
        self.cancelling = None
        self.gates.stop()
        self.gates.refresh()
        self.message = f"the lease of this host's job was taken by another host ({how}): job dropped here"
        log.error(self.message)
        self.db.event("lease_lost", self.message, job_id, host=self.settings.fleet.host)

    def release_finished(self, now: float) -> None:
        """Give the lineage's lease up once the job has left this host: filed, back in the queue, or this
        daemon stopping (a paused job is then resumed by another host); kept while it trains, waits for
        its gate, or is paused here (pause, disk full, a locked run folder)."""
        if self.fleet is None or self.fleet.job is None or self.worker is not None or self.gates.busy:
            return
        assert self.db is not None
        job = self.db.job(self.fleet.job.job_id or 0)
        if job is None or job.state not in (JobState.RUNNING, JobState.PAUSED) or self.stopping:
            self.fleet.release_job()

    def maybe_dispatch(self, now: float) -> None:
        if self.worker is not None or self.joined or self.paused or self.stopping or self.disk_full_needs is not None:
            return
        if self.locked_out(now):
            return
        if self.gates.busy:
            return  # the next job starts from the models/current the pending gate decides
        assert self.db is not None
        if self.fleet is not None:
            self._dispatch_claimed(now)
            return
        processing = self.spool.processing()
        if processing:
            target = processing[0]  # a paused or interrupted job goes first
        else:
            backing_off = {j.id for j in self.db.jobs([JobState.QUEUED]) if j.retry_at and j.retry_at > now}
            waiting = [w for w in self.spool.waiting() if w.job_id not in backing_off]
            if not waiting:
                return
            target = move(waiting[0].path, self.home.processing)
        self.worker = self.runner.start(target)
        log.info("job %s: training (worker pid %d)", job_id_of(target.name), self.worker.pid)

    def _dispatch_claimed(self, now: float) -> None:
        """A fleet's dispatch: this host's own job again (paused here), else the job ``claim_job`` gives it,
        in priority order across the fleet among the lineages no other host holds."""
        assert self.db is not None and self.fleet is not None
        if self.fleet.job is None:
            if self.joiner is not None and self.joiner.try_join(now, self._can_run):
                return  # a multi-node job another host claimed waits for its nodes: it was first in the order
            claim = self.fleet.claim(now, self._can_run)
            if claim is None:
                return
            self.db.event(
                "job_claimed",
                f"claimed by host {self.settings.fleet.host} (lease generation {claim.lease.generation})",
                claim.job_id,
                host=self.settings.fleet.host,
                resumed=claim.resumed,
            )
            self.gates.refresh()
        job_id = self.fleet.job.job_id if self.fleet.job is not None else None
        assert job_id is not None
        target = next((p for p in self.spool.processing() if job_id_of(p.name) == job_id), None)
        if target is None:
            waiting = next((w for w in self.spool.waiting() if w.job_id == job_id), None)
            if waiting is None:  # its file is elsewhere (filed by a host that lost the lease, or by hand)
                log.warning("job %d: claimed, but its file is in no queue: lease released", job_id)
                self.fleet.release_job()
                return
            target = move(waiting.path, self.home.processing)
        if self.db.version_of_job(job_id) is not None:  # its host died between registration and filing
            self.runner.complete(job_id, WorkerResult(outcome=WorkerOutcome.COMPLETED))
            self.gates.refresh()
            return
        self.worker = self.runner.start(target, self.fleet.job.generation if self.fleet.job is not None else None)
        log.info("job %s: training (worker pid %d)", job_id, self.worker.pid)

    def _can_run(self, job: Job) -> bool:
        """Whether this host can take the job: its settings pass this host's checks (a job that needs a GPU
        this host lacks is left for another host)."""
        return not self.admission.settings_check.problems(job.settings or {})

    def keep_warm(self, now: float) -> None:
        """One worker started ahead for the next job (daemon/standby.py). Without a GPU only while no
        job trains: there its imports would take CPU time from the training itself."""
        if self.warm is None or self.stopping:
            return
        if (self.worker is None and not self.joined) or self.gpus > 0:
            self.warm.ensure(now)

    def state(self) -> DaemonState:
        if self.finished:
            return DaemonState.STOPPED
        if self.stopping:
            return DaemonState.STOPPING
        if self.disk_full_needs is not None:
            return DaemonState.DISK_FULL
        if self.worker is not None or self.joined:
            return DaemonState.TRAINING
        return DaemonState.PAUSED if self.paused else DaemonState.IDLE

    def write_status(self, now: float) -> None:
        """The daemon's status file. Written when it changed; an unchanged one (only its heartbeat newer) at most
        every ``STATUS_REFRESH_S``: each write is two fsyncs, readers judge the heartbeat against at least 15 s
        (``heartbeat_limit``), and in a fleet every tick's cost is taken from the workers of the same cores.
        The running job's name is read from the DB once per job, not once per tick."""
        current = self.worker.job_id if self.worker else None
        if current is not None and self.job_name[0] != current and self.db is not None:
            job = self.db.job(current)
            self.job_name = (current, job.name if job else None)
        status = DaemonStatus(
            state=self.state(),
            pid=os.getpid(),
            started_at=self.started_at,
            heartbeat=now,
            paused=self.paused,
            current_job=current,
            current_job_name=self.job_name[1] if current is not None else None,
            worker_pid=self.worker.pid if self.worker else None,
            queue=self.spool.counts(),
            pending_controls=[r.describe() for r in control.pending(self.home.control)],
            message=self.message or (self.gates.describe() if hasattr(self, "gates") else ""),
            inbox_refused=self.housekeeping.refused_lines() if hasattr(self, "housekeeping") else [],
            joined=self.joiner.joined.describe() if self.joiner is not None and self.joiner.joined else None,
        )
        reading = status.model_dump(mode="json", exclude={"heartbeat"})
        last_at, last = self.status_written
        if reading == last and 0 <= now - last_at < STATUS_REFRESH_S:
            return
        write_status(self.home.status / DAEMON_STATUS, status)
        self.status_written = (now, reading)

    def beat(self, now: float) -> None:
        """The fleet's heartbeat (when due); a daemon whose host name another daemon took, after this one was
        silent past the stale limit, stops: two daemons must not act under one name."""
        if self.host is None:
            return
        joined = self.joiner.joined if self.joiner is not None else None
        job = self.worker.job_id if self.worker else joined.agent.job_id if joined else None
        if not self.host.tick(now, self.state(), job, self.paused):
            assert self.db is not None
            self.message = f"fleet host {self.settings.fleet.host!r} was taken by another daemon: stopping"
            log.error(self.message)
            self.db.event("host_taken", self.message)
            self.begin_stop(now)

    def shutdown(self) -> None:
        if self.worker is not None:  # only on an unexpected exception: do not leave an orphan
            worker, self.worker = self.worker, None
            worker.request_stop(time.time())
            rc = worker.wait(self.settings.daemon.worker_stop_timeout)
            if rc is None:
                worker.kill()
                rc = worker.wait(10) or -signal.SIGKILL
            self._finish_worker(worker, rc, stop_was_requested=True)  # the job is paused (or cancelled), not lost
        if self.joiner is not None:  # only on an unexpected exception: its node stops with the run's others
            self.joiner.stop(self.settings.daemon.worker_stop_timeout)
        if self.fleet is not None:
            self.fleet.stop()  # a job paused by this stop may be resumed by another host at once
        for helper in (getattr(self, "gates", None), getattr(self, "reports", None), self.warm, self.notifier):
            if helper is not None:
                helper.stop()
        watcher = getattr(self, "watcher", None)
        if watcher is not None:
            watcher.stop()
        self.finished = True
        if self.db is not None:
            self.write_status(time.time())
            if self.host is not None:
                self.host.stop(time.time())
            self.db.event("daemon_stopped", f"pid {os.getpid()}")
            self.db.close()
        self.lock.release()
        log.info("trainbox daemon stopped")
