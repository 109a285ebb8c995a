"""The dashboard in real headless Chromium (Debian's ``chromium``, driven by Playwright for Python):
the page shows the running job, its loss chart gains points from the event stream without a reload,
and the pause button (token stored beforehand) writes a pause request the API then reports.

Skipped when ``/usr/bin/chromium`` or the ``playwright`` package is missing. Set
``TRAINBOX_SCREENSHOT=docs/dashboard.png`` to refresh the README's screenshot.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.monitoring_helpers import (
    CHROMIUM,
    CHROMIUM_ARGS,
    FAKE_JOB,
    ServerProc,
    append_metrics,
    populate,
    write_daemon_status,
    write_training_status,
)
from trainbox import control
from trainbox.home import Home

if not Path(CHROMIUM).exists():
    pytest.skip(f"{CHROMIUM} is missing (apt-get install -y chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")


@pytest.fixture()
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


def wait_until(cond: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def test_dashboard_follows_training_and_pauses(tmp_path: Path, browser: Any) -> None:
    home = Home(tmp_path / "home")
    populate(home, step=40)
    with ServerProc(home) as srv:
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.add_init_script(f"localStorage.setItem('trainbox-token', {srv.token!r});")
        page.goto(srv.url + "/")

        page.wait_for_function(
            "document.getElementById('job-name').textContent.includes('current.jsonl')", timeout=10_000
        )
        page.wait_for_function("document.getElementById('job-step').textContent.startsWith('40 / 300')", timeout=10_000)
        page.wait_for_function("Number(document.getElementById('loss-chart').dataset.points) >= 40", timeout=10_000)
        before = int(page.get_attribute("#loss-chart", "data-points") or 0)
        page.evaluate("window.__sameDocument = true")
        for selector, text in [
            ("daemon-state", "daemon training"),
            ("queue-table", "urgent.jsonl"),
            ("jobs-table", "RuntimeError: boom"),
            ("models-table", "v2"),
            ("memory-table", "first.jsonl"),
            ("sys-cpu", "cores"),
        ]:
            page.wait_for_function(
                f"document.getElementById('{selector}').textContent.includes('{text}')", timeout=10_000
            )

        # the memory matrix is colour-scaled per job: job 1's lowest loss (v1, 0.5) green, its highest (v2) red
        colours = page.evaluate(
            "[...document.querySelectorAll('#memory-table td.memory-cell')].map(c => [c.closest('tr').dataset.version,"
            " c.dataset.loss, getComputedStyle(c).backgroundColor])"
        )
        by_cell = {(v, float(loss)): colour for v, loss, colour in colours}
        assert len(by_cell) == 4 and by_cell[("1", 0.5)] != by_cell[("2", 0.9)]
        assert by_cell[("1", 0.5)] == by_cell[("2", 0.7)]  # each job's best loss: the same green
        for step in range(41, 81, 10):  # the worker trains on: new metric lines, a new status
            append_metrics(home, step, step + 9)
            write_training_status(home, step + 9)
            write_daemon_status(home)
            time.sleep(0.3)
        page.wait_for_function("document.getElementById('job-step').textContent.startsWith('80 / 300')", timeout=10_000)
        page.wait_for_function(
            f"Number(document.getElementById('loss-chart').dataset.points) >= {before + 40}", timeout=10_000
        )
        assert page.evaluate("window.__sameDocument") is True  # updated in place, not reloaded
        # the hybrid engine's fitted curve arrives by the stream and is drawn as the "predicted" line
        drawn = int(page.get_attribute("#loss-chart", "data-points") or 0)
        curve = {"kind": "hybrid_curve", "step": 80, "val_loss": 2.0, "curve": [[40, 2.2], [80, 2.0], [200, 1.8]]}
        with open(home.run_dir(FAKE_JOB) / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(curve) + "\n")
        page.wait_for_function(
            f"Number(document.getElementById('loss-chart').dataset.points) === {drawn + 3}", timeout=10_000
        )

        page.click("#btn-pause")
        wait_until(
            lambda: [r for r in control.pending(home.control) if r.action.value == "pause"],
            10,
            "a pause request under control/",
        )
        status = httpx.get(f"{srv.url}/api/status", timeout=5).json()
        assert status["pending_controls"] == ["pause"]
        page.wait_for_function(
            "document.getElementById('toast').textContent.includes('pause requested')", timeout=5_000
        )
        page.select_option('#queue-table tr[data-job="7"] select.job-priority', "high")  # a waiting job
        wait_until(
            lambda: "prioritize job 7 high" in [r.describe() for r in control.pending(home.control)],
            10,
            "a prioritize request from the queue table",
        )

        shot = tmp_path / "dashboard.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000
        target = os.environ.get("TRAINBOX_SCREENSHOT")
        if target:
            shutil.copyfile(shot, target)
        assert not errors, errors
        assert int(page.get_attribute("#loss-chart", "data-points") or 0) <= 6000
        assert FAKE_JOB == 5


def test_dashboard_reattaches_after_server_restart(tmp_path: Path, browser: Any) -> None:
    home = Home(tmp_path / "home")
    populate(home, step=20)
    srv = ServerProc(home)
    try:
        page = browser.new_page()
        page.goto(srv.url + "/")
        page.wait_for_function("document.getElementById('conn-state').dataset.state === 'live'", timeout=10_000)
        port = srv.url.rsplit(":", 1)[1]
        srv.stop()
        page.wait_for_function("document.getElementById('conn-state').dataset.state !== 'live'", timeout=10_000)
        append_metrics(home, 21, 30)
        write_training_status(home, 30)
        write_daemon_status(home)
        srv = ServerProc(home, "--port", port)  # the same address: the page's EventSource reconnects
        page.wait_for_function("document.getElementById('conn-state').dataset.state === 'live'", timeout=15_000)
        page.wait_for_function("document.getElementById('job-step').textContent.startsWith('30 / 300')", timeout=10_000)
    finally:
        srv.stop()
