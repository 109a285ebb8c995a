"""A costly, read-only test folder (a finished worker or torchrun run) built once per test session.

pytest-xdist runs the tests in several worker processes, and a session- or module-scoped fixture is built in
each worker that needs it; a fixture imported into a second test module is even built again there. A finished
run that tests only read is the same whichever worker builds it, so the first worker builds it in the session's
shared temp folder under a file lock, and the others wait for it and read it: one job's CPU instead of two.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest


def session_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The temp folder of the whole test session: the xdist workers' common parent, else the basetemp."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]) -> Path:
    """``session_root/shared-NAME``, created by ``build(folder)`` in the first process that asks. ``build``
    makes the folder in place (a run records its own path); one left half-made by a failed build is removed and
    built again."""
    root = session_root(tmp_path_factory)
    folder, complete = root / f"shared-{name}", root / f"shared-{name}.complete"
    with open(root / f"shared-{name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also when build fails
        if not complete.exists():
            shutil.rmtree(folder, ignore_errors=True)
            build(folder)
            complete.touch()
    return folder
