"""Schemathesis against a real ``python -m monitoring.server`` (uvicorn, 127.0.0.1, random port):
every operation in /openapi.json, with generated valid and invalid inputs, must never answer 5xx
and must answer only what the schema documents (status codes, content types, headers, bodies).

Run twice: reads open and no token sent (so every control and upload answer is the documented 401),
and ``server.read_requires_token`` on with the token sent (so controls really write control files
and uploads really land in the inbox). The home has no daemon, so nothing acts on those requests;
the SSE stream never ends by design and is left out (its parameters are checked in
tests/test_api_hardening.py). Examples per operation are bounded so the whole module stays short.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

schemathesis = pytest.importorskip("schemathesis", reason="the schemathesis package is not installed (dev extra)")

from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from monitoring.app import create_app  # noqa: E402
from tests.monitoring_helpers import ServerProc, populate  # noqa: E402
from trainbox.config import ServerConfig, Settings  # noqa: E402
from trainbox.home import Home  # noqa: E402

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
MAX_EXAMPLES = 15
CONFIG = {
    "seed": 20240611,
    # the token is the test's to send or withhold: schemathesis neither generates nor strips one
    "generation": {"mode": "all", "max-examples": MAX_EXAMPLES, "database": "none", "with-security-parameters": False},
    "phases": {"coverage": {"enabled": False}, "stateful": {"enabled": False}},
    "request-timeout": 10,
}


def _home(root: Path, read_requires_token: bool) -> Home:
    home = Home(root)
    populate(home, step=40)
    if read_requires_token:
        home.config_file.write_text("[server]\nread_requires_token = true\n", encoding="utf-8")
    return home


@pytest.fixture(scope="module")
def open_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    with ServerProc(_home(tmp_path_factory.mktemp("open"), False)) as srv:
        yield srv


@pytest.fixture(scope="module")
def guarded_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    with ServerProc(_home(tmp_path_factory.mktemp("guarded"), True)) as srv:
        yield srv


def _schema(read_requires_token: bool) -> Any:
    """The schema the server will serve, built in-process at collection time (schemathesis's lazy
    fixture loader does not run under pytest 9); ``test_the_fuzzed_schema_is_the_served_one`` checks
    that the real servers serve exactly this."""
    settings = Settings(server=ServerConfig(port=0, read_requires_token=read_requires_token))
    spec = create_app(Home(Path("/nonexistent-home")), settings).openapi()
    config = schemathesis.Config.from_dict(CONFIG)
    return schemathesis.openapi.from_dict(spec, config=config).exclude(path="/api/stream")


without_token = _schema(read_requires_token=False)
with_token = _schema(read_requires_token=True)
FAST = settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


@without_token.parametrize()
@FAST
def test_api_without_a_token(case: Any, open_server: ServerProc) -> None:
    response = case.call_and_validate(base_url=open_server.url, checks=CHECKS, timeout=10)
    if case.operation.method.upper() == "POST":
        assert response.status_code == 401, (case.path, response.status_code)


@with_token.parametrize()
@FAST
def test_api_with_the_token(case: Any, guarded_server: ServerProc) -> None:
    response = case.call_and_validate(
        base_url=guarded_server.url, headers=guarded_server.auth, checks=CHECKS, timeout=10
    )
    assert response.status_code != 401, (case.path, response.text)


def test_the_fuzzed_schema_is_the_served_one(open_server: ServerProc, guarded_server: ServerProc) -> None:
    for srv, schema in ((open_server, without_token), (guarded_server, with_token)):
        served = httpx.get(f"{srv.url}/openapi.json", timeout=10).json()
        assert served == schema.raw_schema
