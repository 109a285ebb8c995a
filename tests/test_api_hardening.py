"""Hostile input and least privilege at the status server, against real ``python -m monitoring.server``
processes: every integer in a URL is bounded (422, never 500); the OpenAPI schema declares the bearer
scheme where the server enforces it, every status code and the upload body; /docs and /redoc (CDN
pages, blank offline) are off; a bind others can reach warns when reads need no token, and
``server.read_requires_token`` closes every read (API, SSE stream, /metrics); ``trainbox health``
counts failed jobs as the API does.
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from daemon.admission import write_error
from monitoring.server import URL_PREFIX
from safety.checkup import Check, Level, run_checks
from tests.monitoring_helpers import FAKE_JOB, ServerProc, populate
from trainbox.config import Settings
from trainbox.home import Home

HUGE = [2**63, -(2**63) - 1, 10**20, -(10**20)]
KNOWN_500S = [  # what answered 500 before the bounds (SQLite's 64-bit integers overflowed)
    "/api/jobs/9223372036854775808",
    "/api/jobs/-9223372036854775809",
    "/api/events?since_id=99999999999999999999",
    "/api/events?job_id=99999999999999999999",
    "/api/jobs/99999999999999999999/metrics",
]
WARNING_TEXT = "server.read_requires_token"


def guarded_home(root: Path) -> Home:
    home = Home(root)
    populate(home, step=10)
    home.config_file.write_text("[server]\nread_requires_token = true\n", encoding="utf-8")
    return home


@pytest.fixture(scope="module")
def open_srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    home = Home(tmp_path_factory.mktemp("open"))
    populate(home, step=10)
    with ServerProc(home) as srv:
        yield srv


@pytest.fixture(scope="module")
def guarded_srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    with ServerProc(guarded_home(tmp_path_factory.mktemp("guarded"))) as srv:
        yield srv


def operations(spec: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            yield path, method, op


def int_bounds(param: dict[str, Any]) -> tuple[int | None, int | None] | None:
    """(minimum, maximum) of an integer parameter, None for other types."""
    schema = param["schema"]
    for s in [schema, *schema.get("anyOf", [])]:
        if s.get("type") == "integer":
            return s.get("minimum"), s.get("maximum")
    return None


def test_every_integer_parameter_is_bounded(open_srv: ServerProc) -> None:
    spec = httpx.get(f"{open_srv.url}/openapi.json", timeout=10).json()
    tried = 0
    for path, method, op in operations(spec):
        for param in op.get("parameters", []):
            bounds = int_bounds(param)
            if bounds is None:
                continue
            lo, hi = bounds
            assert lo is not None and hi is not None and hi <= 2**62, (method, path, param["name"])
            for bad in [lo - 1, hi + 1, *HUGE]:
                url = path.replace("{job_id}", str(FAKE_JOB))
                value = str(bad)
                params = {}
                if param["in"] == "path":
                    url = path.replace("{" + param["name"] + "}", value)
                else:
                    params[param["name"]] = value
                r = httpx.request(method, open_srv.url + url, params=params, headers=open_srv.auth, timeout=10)
                assert r.status_code == 422, (method, url, params, r.status_code, r.text)
                tried += 1
    assert tried >= 6 * 13  # job ids (4 routes), since_id, before_id, job_id, limits, steps, points, ...
    for url in KNOWN_500S:
        assert httpx.get(open_srv.url + url, timeout=10).status_code == 422, url


def test_the_schema_declares_security_responses_and_the_upload_body(
    open_srv: ServerProc, guarded_srv: ServerProc
) -> None:
    open_spec = httpx.get(f"{open_srv.url}/openapi.json", timeout=10).json()
    schemes = open_spec["components"]["securitySchemes"]
    assert schemes["bearer"] == {"type": "http", "scheme": "bearer", "description": schemes["bearer"]["description"]}
    for path, method, op in operations(open_spec):
        codes = set(op["responses"])
        if method == "post":  # control and upload: always the token
            assert op["security"] == [{"bearer": []}], path
            assert "401" in codes and "422" in codes, (path, codes)
        else:  # reads are open on this server, and the schema says so
            assert "security" not in op and "401" not in codes, path
        if "{job_id}" in path:
            assert {"404" if method == "get" else "409", "422"} <= codes, (path, codes)
    upload = open_spec["paths"]["/api/upload"]["post"]
    assert {"201", "400", "401", "413", "415", "422"} <= set(upload["responses"])
    body = upload["requestBody"]
    assert body["required"] is True
    assert body["content"]["application/octet-stream"]["schema"] == {"type": "string", "format": "binary"}
    assert "400" in open_spec["paths"]["/api/queue"]["get"]["responses"]

    guarded_spec = httpx.get(f"{guarded_srv.url}/openapi.json", timeout=10).json()
    for path, method, op in operations(guarded_spec):
        if method == "get":
            assert op["security"] == [{"bearer": []}, {"query-token": []}], path
            assert "401" in op["responses"], path


def test_docs_pages_are_off_and_the_schema_stays(open_srv: ServerProc) -> None:
    assert httpx.get(f"{open_srv.url}/docs", timeout=10).status_code == 404
    assert httpx.get(f"{open_srv.url}/redoc", timeout=10).status_code == 404
    assert httpx.get(f"{open_srv.url}/openapi.json", timeout=10).status_code == 200


def status_of(url: str, headers: dict[str, str] | None = None, params: dict[str, str] | None = None) -> int:
    """The status of a GET, without reading a streaming body to its (never-coming) end."""
    with httpx.Client(timeout=10) as c, c.stream("GET", url, headers=headers, params=params) as r:
        return r.status_code


def test_read_requires_token_closes_every_read(guarded_srv: ServerProc) -> None:
    spec = httpx.get(f"{guarded_srv.url}/openapi.json", timeout=10).json()
    reads = [path.replace("{job_id}", str(FAKE_JOB)) for path, method, _ in operations(spec) if method == "get"]
    assert {"/api/stream", "/metrics", "/api/status", "/api/queue", "/api/events"} <= set(reads)
    for path in reads:
        url = guarded_srv.url + path
        assert status_of(url) == 401, path
        assert status_of(url, headers={"Authorization": "Bearer wrong"}) == 401, path
        assert status_of(url, params={"token": "wrong"}) == 401, path
        assert status_of(url, headers=guarded_srv.auth) == 200, path
        assert status_of(url, params={"token": guarded_srv.token}) == 200, path
    assert status_of(guarded_srv.url + "/") == 200  # the page itself, so it can ask for the token
    assert status_of(guarded_srv.url + "/openapi.json") == 200


def test_a_public_bind_warns_when_reads_need_no_token(tmp_path: Path) -> None:
    home = Home(tmp_path / "open")
    populate(home, step=1)
    with ServerProc(home, "--host", "0.0.0.0") as srv:
        warning = "".join(srv.output)
        assert "WARNING" in warning and WARNING_TEXT in warning and "0.0.0.0" in warning
        assert httpx.get(srv.url.replace("0.0.0.0", "127.0.0.1") + "/api/status", timeout=10).status_code == 200
    with ServerProc(home, "--host", "127.0.0.1") as srv:
        assert WARNING_TEXT not in "".join(srv.output)
    with ServerProc(guarded_home(tmp_path / "guarded"), "--host", "0.0.0.0") as srv:
        assert WARNING_TEXT not in "".join(srv.output)


def serve_cli_output(home: Home, host: str) -> str:
    """Everything ``trainbox serve --host HOST --port 0`` prints until its URL line, then stops it."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", "serve", "--home", str(home.root), "--host", host, "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    seen: list[str] = []
    try:
        while (line := lines.get(timeout=60)) is not None:
            seen.append(line)
            if line.startswith(URL_PREFIX):
                break
    finally:
        proc.terminate()
        proc.wait(15)
    assert any(line.startswith(URL_PREFIX) for line in seen), seen
    return "".join(seen)


def test_trainbox_serve_warns_on_a_public_bind(tmp_path: Path) -> None:
    home = Home(tmp_path).ensure()
    out = serve_cli_output(home, "0.0.0.0")
    assert "WARNING" in out and WARNING_TEXT in out
    assert WARNING_TEXT not in serve_cli_output(home, "127.0.0.1")


def test_health_and_the_api_count_failed_jobs_alike(tmp_path: Path) -> None:
    home = Home(tmp_path)
    populate(home, step=1)  # two failed: a crashed .jsonl and a rejected .jsonl
    notes = home.failed / "000009__notes.txt"  # a dropped non-JSONL file, rejected at admission
    notes.write_text("hello\n")
    write_error(notes, 9, "bad_input", "not a .jsonl file: notes.txt")
    with ServerProc(home) as srv:
        api_failed = httpx.get(f"{srv.url}/api/status", timeout=10).json()["queue"]["failed"]
        assert httpx.get(f"{srv.url}/api/queue", timeout=10).json()["counts"]["failed"] == api_failed
    checks = run_checks(home, Settings(), gpu=lambda: Check("gpu", Level.OK, "not checked here"))
    queue_check = next(c for c in checks if c.name == "queue")
    assert api_failed == 3
    assert f"failed {api_failed}" in queue_check.detail, queue_check.detail
