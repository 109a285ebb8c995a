"""The daemon's notifier: a background thread that turns new DB events into outbox files and delivers them.

It only does I/O (SQLite reads, small files, HTTP with ``notify.timeout``), on its own DB engine and its
own thread, so a slow or dead webhook never delays the daemon's tick and never changes a job's outcome:
the daemon's part is to start it and stop it. Each pass: new events since the cursor become outbox
entries (``daemon/notify_outbox.py``), then the cursor moves; then every due entry is POSTed; a 2xx
deletes it, anything else schedules the next try with back-off, and after ``notify.max_attempts`` tries
it is given up with a ``notification_given_up`` DB event. Delivery is at least once: a daemon killed
between a receiver's 2xx and the file's deletion sends it again after its restart, with the same ``id``
(also the ``Idempotency-Key`` header) for the receiver to drop.
"""

from __future__ import annotations

import logging
import threading
import time

import httpx
from sqlalchemy import func, select

from daemon.notify_outbox import (
    GIVEN_UP_EVENT,
    OUTBOX,
    SOURCE_KINDS,
    EventFacts,
    JobNumbers,
    Outbox,
    OutboxEntry,
    entries_for,
    redact,
    retry_delay,
    server_base,
)
from management.db import Event, ModelDB, Run
from trainbox.config import Settings
from trainbox.home import Home

log = logging.getLogger("trainbox.notify")
BATCH = 200  # events read per pass


class Notifier:
    """Built at daemon start before anything writes events (so none is missed), started once the daemon is
    up; ``cycle`` is one pass, called by the thread (and by tests, with their own clock)."""

    def __init__(self, home: Home, settings: Settings) -> None:
        self.home, self.config = home, settings.notify
        self.server = server_base(self.config.server_url, settings.server)
        self.outbox = Outbox(home.root / OUTBOX)
        # its own engine: its thread never shares a connection with the tick
        self.db = ModelDB(settings.db.url_for(home.db_url))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.outbox.sweep()  # no thread runs yet: any temp file is a killed predecessor's
        if self.outbox.cursor() is None:  # first start with webhooks: only what happens from now on
            self.outbox.set_cursor(self._last_event_id())

    @classmethod
    def open(cls, home: Home, settings: Settings) -> Notifier | None:
        """None when no webhook is configured (no thread, no outbox)."""
        return cls(home, settings) if settings.notify.webhooks else None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="trainbox-notifier", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 1.0) -> None:
        """Ask the thread to end and wait a moment; a delivery in flight is sent again at the next start."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self.db.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.cycle(time.time())
            except Exception:  # boundary: the notifier must outlive any failure of a pass (DB busy, disk full)
                log.exception("notification pass failed; trying again")
            self._stop.wait(self.config.poll_interval)

    def cycle(self, now: float) -> None:
        self.produce()
        self.deliver(now)

    # --- events to outbox entries ----------------------------------------------------------------

    def _last_event_id(self) -> int:
        with self.db.session() as s:
            return int(s.scalar(select(func.max(Event.id))) or 0)

    def produce(self) -> int:
        """New events' entries into the outbox, then the cursor past them; returns the entries written."""
        cursor = self.outbox.cursor() or 0
        with self.db.session() as s:
            last = int(s.scalar(select(func.max(Event.id))) or 0)
            rows = s.scalars(
                select(Event)
                .where(Event.id > cursor, Event.id <= last, Event.kind.in_(SOURCE_KINDS))
                .order_by(Event.id)
                .limit(BATCH)
            ).all()
            events = [EventFacts(e.id, e.time, e.kind, e.job_id, e.message, dict(e.data or {})) for e in rows]
        if len(events) == BATCH:
            last = events[-1].id  # the rest next pass
        written = 0
        for ev in events:
            job = self._job_numbers(ev.job_id) if ev.job_id is not None else None
            run_dir = self.home.run_dir(ev.job_id) if ev.job_id is not None else None
            for entry in entries_for(ev, job, self.config.webhooks, run_dir, self.server):
                if not self.outbox.known(entry.id):  # a pass that died before its cursor moved
                    self.outbox.put(entry)
                    written += 1
        if last != cursor:
            self.outbox.set_cursor(last)
        return written

    def _job_numbers(self, job_id: int) -> JobNumbers | None:
        job = self.db.job(job_id)
        if job is None:
            return None
        version = self.db.version_of_job(job_id)
        with self.db.session() as s:
            steps = s.scalar(select(func.max(Run.end_step)).where(Run.job_id == job_id))
        return JobNumbers(
            id=job.id,
            name=job.name,
            state=job.state,
            steps=version.steps if version is not None else steps,
            val_loss=version.val_loss if version is not None else None,
            train_loss=version.train_loss if version is not None else None,
            version=version.id if version is not None and version.path else None,
            failure_class=job.failure_class,
        )

    # --- delivery --------------------------------------------------------------------------------

    def deliver(self, now: float) -> None:
        due = self.outbox.due(now)
        if not due:
            return
        with httpx.Client(timeout=self.config.timeout, follow_redirects=False) as client:
            for entry in due:
                if self._stop.is_set():
                    return
                self._send(client, entry, time.time())

    def _send(self, client: httpx.Client, entry: OutboxEntry, now: float) -> None:
        headers = {"Idempotency-Key": entry.id, "X-Trainbox-Event": entry.event}
        try:
            r = client.post(entry.url, json=entry.body, headers=headers)
            error = "" if r.is_success else f"HTTP {r.status_code}"
        except httpx.HTTPError as e:
            error = f"{type(e).__name__}: {e}"
        if not error:
            self.outbox.delivered(entry)
            log.info("notification %s delivered to %s", entry.id, redact(entry.url))
            return
        entry.attempts += 1
        entry.last_error = error[:300]
        if entry.attempts >= self.config.max_attempts:
            self.outbox.give_up(entry)
            message = f"{entry.event} to {redact(entry.url)} given up after {entry.attempts} tries: {entry.last_error}"
            job = entry.body.get("job") or {}
            self.db.event(GIVEN_UP_EVENT, message, job.get("id"), id=entry.id, attempts=entry.attempts)
            log.warning("notification %s", message)
            return
        entry.next_at = now + retry_delay(entry.attempts, self.config.retry_backoff, self.config.max_backoff)
        self.outbox.put(entry)
        log.info("notification %s to %s failed (%s): try %d", entry.id, redact(entry.url), error, entry.attempts + 1)
