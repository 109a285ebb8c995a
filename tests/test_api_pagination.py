"""Listings a page at a time: 10,000 waiting job files (made directly in the spool, with their DB rows,
no daemon) behind a real server. Every response is bounded, and following the cursors visits every
waiting job, job row and event exactly once, in order. ``trainbox queue`` shows the first N per queue
with counts, and everything with ``--all``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from daemon.admission import write_error
from management.db import Event, Job, ModelDB
from tests.monitoring_helpers import ServerProc, add_many_waiting, add_waiting, populate
from trainbox.home import Home
from trainbox.spool import Spool
from trainbox.states import Priority

BULK = 10_000
FIRST = 1000
EVENTS = 2_500


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Home:
    h = Home(tmp_path_factory.mktemp("home"))
    populate(h, step=10)  # waiting: 8 high, 6 normal, 7 low
    add_many_waiting(h, FIRST, BULK, Priority.NORMAL)
    add_waiting(h, 20_000, "late-high.jsonl", Priority.HIGH)
    db = ModelDB(h.db_url)
    try:
        with db.session() as s:
            now = time.time()
            rows = [
                {"time": now, "job_id": None, "kind": "bulk", "message": f"event {i}", "data": {}}
                for i in range(EVENTS)
            ]
            s.execute(Event.__table__.insert(), rows)
    finally:
        db.close()
    return h


@pytest.fixture(scope="module")
def server(home: Home) -> Iterator[ServerProc]:
    with ServerProc(home) as srv:
        yield srv


@pytest.fixture()
def client(server: ServerProc) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def get(client: httpx.Client, path: str, **params: Any) -> Any:
    r = client.get(path, params=params)
    assert r.status_code == 200, r.text
    return r.json()


def test_the_queue_response_is_bounded(client: httpx.Client) -> None:
    r = client.get("/api/queue")
    q = r.json()
    assert q["counts"]["normal"] == BULK + 1 and q["counts"]["high"] == 2 and q["counts"]["low"] == 1
    by_queue = {p: [w for w in q["waiting"] if w["priority"] == p] for p in ("high", "normal", "low")}
    assert [w["job_id"] for w in by_queue["high"]] == [8, 20_000]
    assert len(by_queue["normal"]) == 100 and by_queue["normal"][0]["job_id"] == 6
    assert [w["job_id"] for w in by_queue["low"]] == [7]
    assert q["next"]["high"] is None and q["next"]["low"] is None and q["next"]["normal"] is not None
    assert [w["position"] for w in q["waiting"][:4]] == [1, 2, 3, 4]  # absolute dispatch positions
    assert by_queue["low"][0]["position"] == 2 + BULK + 1 + 1
    assert len(r.content) < 100_000  # a page, not 10,000 rows

    small = get(client, "/api/queue", limit=5)
    assert len(small["waiting"]) == 2 + 5 + 1


def walk_queue(client: httpx.Client, priority: str, limit: int) -> tuple[list[dict[str, Any]], int]:
    items: list[dict[str, Any]] = []
    page = get(client, "/api/queue", priority=priority, limit=limit)
    pages = 1
    while True:
        assert set(page["next"]) == {priority} and len(page["waiting"]) <= limit
        items += page["waiting"]
        cursor = page["next"][priority]
        if cursor is None:
            return items, pages
        page = get(client, "/api/queue", after=cursor, limit=limit)
        pages += 1


def test_the_cursor_walks_every_waiting_job_exactly_once(client: httpx.Client, home: Home) -> None:
    walked: list[dict[str, Any]] = []
    for p in ("high", "normal", "low"):
        items, pages = walk_queue(client, p, 1000)
        assert all(i["priority"] == p for i in items)
        if p == "normal":
            assert pages == 11  # 10,001 jobs in pages of 1000
        walked += items
    ids = [i["job_id"] for i in walked]
    assert len(ids) == len(set(ids)) == BULK + 4
    assert ids == [w.job_id for w in Spool(home).waiting()]  # the daemon's dispatch order
    assert [i["position"] for i in walked] == list(range(1, len(walked) + 1))
    assert [i["file"] for i in walked] == [w.path.name for w in Spool(home).waiting()]


def test_bad_cursors_and_limits_are_refused(client: httpx.Client) -> None:
    cursor = get(client, "/api/queue", limit=3)["next"]["normal"]
    assert client.get("/api/queue", params={"after": cursor, "priority": "low"}).status_code == 400
    for params in ({"after": "urgent:000001__x.jsonl"}, {"after": "normal:../x"}, {"limit": 0}, {"limit": 1001}):
        assert client.get("/api/queue", params=params).status_code == 422, params
    past_the_end = get(client, "/api/queue", after="normal:999999999__zzz.jsonl")
    assert past_the_end["waiting"] == [] and past_the_end["next"] == {"normal": None}


def test_the_jobs_cursor_walks_every_row_exactly_once(client: httpx.Client, home: Home) -> None:
    db = ModelDB(home.db_url)
    try:
        with db.session() as s:
            total = int(s.scalar(select(func.count()).select_from(Job)) or 0)
    finally:
        db.close()
    ids: list[int] = []
    page = get(client, "/api/jobs", limit=1000)
    while True:
        assert len(page["items"]) <= 1000
        ids += [j["id"] for j in page["items"]]
        if page["next"] is None:
            break
        page = get(client, "/api/jobs", limit=1000, before=page["next"])
    assert len(ids) == len(set(ids)) == total
    assert ids == sorted(ids, reverse=True)


def test_the_events_cursors_walk_every_event_once_both_ways(client: httpx.Client) -> None:
    forward: list[int] = []
    page = get(client, "/api/events", since_id=0, limit=1000)
    while True:
        forward += [e["id"] for e in page["items"]]
        if page["newer"] is None:
            break
        page = get(client, "/api/events", since_id=page["newer"], limit=1000)
    assert len(forward) == len(set(forward)) and forward == sorted(forward) and len(forward) >= EVENTS

    backward: list[int] = []
    page = get(client, "/api/events", limit=1000)
    while True:
        backward = [e["id"] for e in page["items"]] + backward
        if page["older"] is None:
            break
        page = get(client, "/api/events", before_id=page["older"], limit=1000)
    assert backward == forward


def cli(home: Home, *args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "cli", "queue", "--home", str(home.root), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "200"},
        check=True,
    )
    return out.stdout


def test_cli_queue_shows_the_first_n_per_queue_with_counts(home: Home) -> None:
    data = json.loads(cli(home, "--json", "--limit", "5"))
    waiting = [r for r in data["rows"] if r["where"] in ("high", "normal", "low")]
    assert [r["job"] for r in waiting] == [8, 20_000, 6, FIRST, FIRST + 1, FIRST + 2, FIRST + 3, 7]
    assert data["more"] == {"high": 0, "normal": BULK + 1 - 5, "low": 0}
    assert data["counts"]["normal"] == BULK + 1

    text = cli(home, "--limit", "5")
    assert f"normal {BULK + 1}" in text and f"{BULK + 1 - 5} more (--all to list them)" in text
    assert len(text.splitlines()) < 60

    everything = json.loads(cli(home, "--json", "--all"))
    assert sum(1 for r in everything["rows"] if r["where"] == "normal") == BULK + 1
    assert everything["more"] == {"high": 0, "normal": 0, "low": 0}


def test_cli_queue_shows_hostile_text_as_text(home: Home) -> None:
    bad = home.failed / "000099__x.jsonl"
    bad.write_text("{}\n")
    write_error(bad, 99, "bad_input", "not a .jsonl file: invoice\u202egnp.exe [red]boom[/red] \x1b[2J")
    (home.failed / "000098__y.jsonl.error.json").write_text("{not json")
    try:
        text = cli(home, "--limit", "1")
        assert "\u202e" not in text and "\x1b" not in text
        assert "<U+202E>gnp.exe" in text and "[red]boom[/red]" in text and "<U+001B>" in text
        assert "unreadable error file" in text
    finally:
        for p in home.failed.glob("00009[89]__*"):
            p.unlink()
