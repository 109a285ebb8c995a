"""Notifications (issue 19): webhooks fed from the DB's events through a persistent outbox.

The message and mapping rules are pure and tested as such; delivery is tested against a real HTTP
receiver on 127.0.0.1 (``tests/webhook_receiver.py``): once per event across a real daemon process
killed with SIGKILL and restarted, and an unreachable URL retried, then given up with an event, while
the job's outcome stays what the worker made it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from daemon.main import Daemon
from daemon.notify_outbox import (
    DAEMON_CRASHED,
    GIVEN_UP_EVENT,
    EventFacts,
    JobNumbers,
    Outbox,
    build_body,
    entries_for,
    notification_kinds,
    redact,
    retry_delay,
    server_base,
    unclean_exit,
)
from management.db import ModelDB
from tests.daemon_stubs import daemon_factory, tick_until
from tests.e2e_helpers import wait_for
from tests.webhook_receiver import receiver
from trainbox.config import ServerConfig, Settings, WebhookConfig
from trainbox.home import Home
from trainbox.states import DaemonState
from trainbox.status import DaemonStatus

REPO = Path(__file__).resolve().parent.parent
FAST = {"settle_seconds": 0.05, "rescan_interval": 0.05, "poll_interval": 0.05, "warm_worker": False}


def _event(kind: str, **data: object) -> EventFacts:
    return EventFacts(id=7, time=1.0, kind=kind, job_id=3, message="m", data=dict(data))


def test_which_events_notify() -> None:
    assert notification_kinds(_event("job_failed")) == ["failed"]
    assert notification_kinds(_event("spool_reconciled", state="failed")) == ["failed"]
    assert notification_kinds(_event("spool_reconciled", state="done")) == []  # its gate verdict said done
    assert notification_kinds(_event("version_promoted", promoted=True)) == ["done"]
    assert notification_kinds(_event("version_not_promoted", promoted=False)) == ["done", "gate_refused"]
    assert notification_kinds(_event("version_promoted", version=2)) == []  # `models promote`: no job ended
    assert notification_kinds(_event("job_paused")) == ["paused"]
    assert notification_kinds(_event("job_disk_full")) == ["disk_full"]
    assert notification_kinds(_event(DAEMON_CRASHED)) == ["daemon_crash"]
    assert notification_kinds(_event("job_retry")) == []


def test_body_numbers_links_and_slack_text(tmp_path: Path) -> None:
    job = JobNumbers(id=3, name="a.jsonl", state="done", steps=120, val_loss=1.23456, version=4)
    body = build_body(
        "done", _event("version_promoted", promoted=True), job, "/h/runs/job-000003/report.md", "http://x:1"
    )
    assert body["numbers"] == {"steps": 120, "val_loss": 1.23456, "train_loss": None, "version": 4}
    assert body["report"] == {"path": "/h/runs/job-000003/report.md", "url": "http://x:1/jobs/3/report"}
    assert body["outcome"] == "promoted" and body["job"]["name"] == "a.jsonl"
    assert body["text"].startswith("trainbox: job 3 (a.jsonl) done (120 steps, val loss 1.235, model version 4)")
    assert body["text"].endswith("Report: http://x:1/jobs/3/report")
    hooks = [WebhookConfig(url="http://a/1", events=["failed"]), WebhookConfig(url="http://b/2")]
    entries = entries_for(_event("version_not_promoted", promoted=False), job, hooks, tmp_path, "")
    assert sorted(e.event for e in entries) == ["done", "gate_refused"]  # the first hook wants neither
    assert all(e.body["report"]["url"] is None and e.body["id"] == e.id for e in entries)
    again = entries_for(_event("version_not_promoted", promoted=False), job, hooks, tmp_path, "")
    assert [e.id for e in again] == [e.id for e in entries]  # stable: a re-read writes the same files


def test_small_rules() -> None:
    assert [retry_delay(n, 5, 60) for n in (1, 2, 3, 5)] == [5, 10, 20, 60]
    assert server_base("", ServerConfig(host="0.0.0.0", port=8377)) == "http://127.0.0.1:8377"
    assert server_base("", ServerConfig(port=0)) == ""
    assert server_base("https://tb.example/", ServerConfig()) == "https://tb.example"
    assert redact("https://hooks.slack.com/services/T0/B0/secret") == "https://hooks.slack.com"
    assert unclean_exit(None) is None
    stopped = DaemonStatus(state=DaemonState.STOPPED, pid=5, started_at=0, heartbeat=0)
    assert unclean_exit(stopped) is None
    died = DaemonStatus(state=DaemonState.TRAINING, pid=5, started_at=0, heartbeat=0, current_job=2)
    assert unclean_exit(died) == (
        "the previous daemon (pid 5) ended without stopping: its last heartbeat said training, training job 2"
    )


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def make_daemon(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    yield from daemon_factory(Home(tmp_path / "home").ensure(), Settings.model_validate({"daemon": FAST}))


def test_unreachable_webhook_is_given_up_and_the_job_is_still_done(
    tmp_path: Path, make_daemon: Callable[..., Daemon]
) -> None:
    url = f"http://127.0.0.1:{_closed_port()}/hook"
    notify = {"webhooks": [{"url": url}], "max_attempts": 3, "retry_backoff": 0.02, "poll_interval": 0.02}
    d = make_daemon(Settings.model_validate({"daemon": FAST, "notify": notify}))
    (d.home.inbox / "a.jsonl").write_text(json.dumps({"text": "an example"}) + "\n")
    assert d.db is not None
    db = d.db
    tick_until(d, lambda: db.events(kind=GIVEN_UP_EVENT), "the notification given up")
    assert [j.state for j in db.jobs()] == ["done"]
    (given_up,) = db.events(kind=GIVEN_UP_EVENT)
    assert given_up.data["attempts"] == 3 and given_up.job_id == db.jobs()[0].id
    assert f"done to {redact(url)} given up after 3 tries" in given_up.message
    outbox = Outbox(d.home.root / "outbox")
    assert outbox.counts() == {"pending": 0, "given-up": 1}


class _StubDaemon:
    def __init__(self, home: Home) -> None:
        self.log = open(home.root / "daemon.log", "ab")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / "tests" / "stub_daemon.py"), str(home.root)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.wait()

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.wait()

    def wait(self) -> None:
        try:
            self.proc.wait(30)
        finally:
            self.log.close()


def test_one_notification_per_event_across_sigkill_and_restart(tmp_path: Path) -> None:
    home = Home(tmp_path / "home").ensure()
    (home.root / "stub-plan.json").write_text(json.dumps({"b.jsonl": ["crash"]}))
    with receiver() as rec:
        daemon = "\n".join(f"{k} = {json.dumps(v)}" for k, v in {**FAST, "max_retries": 0}.items())
        notify = "poll_interval = 0.05\nretry_backoff = 0.05\nmax_backoff = 0.2"
        home.config_file.write_text(f'[daemon]\n{daemon}\n[notify]\n{notify}\n[[notify.webhooks]]\nurl = "{rec.url}"\n')
        first = _StubDaemon(home)
        try:
            (home.inbox / "a.jsonl").write_text(json.dumps({"text": "a"}) + "\n")
            wait_for(lambda: [b["event"] for b in rec.accepted()] == ["done"], 30, "a's done notification")
            rec.refusing = True  # b's failure waits in the outbox, tried and refused
            (home.inbox / "b.jsonl").write_text(json.dumps({"text": "b"}) + "\n")
            wait_for(lambda: len(rec.refused()) >= 2, 30, "b's failed notification refused twice")
        finally:
            first.kill()
        assert Outbox(home.root / "outbox").counts()["pending"] == 1
        (home.root / "outbox" / "pending" / ".000000000001-done-x.json.abc.tmp").write_text("{")  # a killed write
        rec.refusing = False
        second = _StubDaemon(home)
        try:
            wanted = {"done", "failed", "daemon_crash"}
            wait_for(lambda: {b["event"] for b in rec.accepted()} == wanted, 30, "the rest delivered")
        finally:
            second.stop()
    accepted = rec.accepted()
    assert Counter(b["event"] for b in accepted) == {"done": 1, "failed": 1, "daemon_crash": 1}
    assert len({b["id"] for b in accepted}) == 3 and all(b["_idempotency_key"] == b["id"] for b in accepted)
    assert {b["id"] for b in rec.refused()} == {b["id"] for b in accepted if b["event"] == "failed"}
    failed = next(b for b in accepted if b["event"] == "failed")
    assert failed["job"]["name"] == "b.jsonl" and failed["outcome"] == "failed (crash)"
    assert failed["report"]["path"].endswith("report.md") and "b.jsonl" in failed["text"]
    assert Outbox(home.root / "outbox").counts() == {"pending": 0, "given-up": 0}
    assert not list((home.root / "outbox" / "pending").iterdir())  # the killed write's temp file swept
    db = ModelDB(home.db_url)
    try:
        assert len(db.events(kind=DAEMON_CRASHED)) == 1
    finally:
        db.close()
