"""The status server against a real daemon training a real job: API consistent with the status
files and DB, control through the API pauses and resumes the real worker, uploads are admitted, and
the dashboard in real headless Chromium follows the training and pauses it."""

from __future__ import annotations

import functools
import json
import os
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest

from management.db import ModelDB
from tests.e2e_helpers import DaemonProc, make_home, metrics, wait_for, write_jsonl
from tests.monitoring_helpers import CHROMIUM, CHROMIUM_ARGS, ServerProc
from trainbox.status import TRAINING_STATUS, TrainingStatus, read_status

pytestmark = pytest.mark.e2e


@functools.cache
def _client() -> httpx.Client:
    """One HTTP client for the many polls: ``httpx.get`` builds a client (and its SSL context, about 35 ms of
    CPU) per call, ten times a second while a test waits."""
    return httpx.Client(timeout=10)


def _get(srv: ServerProc, path: str) -> Any:
    r = _client().get(srv.url + path)
    r.raise_for_status()
    return r.json() if "json" in r.headers.get("content-type", "") else r.text


def _rows(n: int, word: str) -> list[dict[str, str]]:
    return [{"text": f"the {word} walks to the market number {i % 9}"} for i in range(n)]


def test_api_follows_and_steers_a_real_daemon(tmp_path: Path, embedded: Path) -> None:
    home = make_home(tmp_path / "home", embedded, max_steps=60)
    daemon = DaemonProc(home, env={"TRAINBOX_TEST_STEP_SLEEP": "0.05"})
    srv = ServerProc(home)
    try:
        write_jsonl(home.inbox / "first.jsonl", _rows(80, "dog"))
        status = wait_for(
            lambda: (s := _get(srv, "/api/status"))["training"] and s["training"]["status"]["step"] >= 8 and s,
            120,
            "training past step 8 seen through the API",
        )
        # consistent with the status files
        file_status = read_status(home.status / TRAINING_STATUS, TrainingStatus)
        assert file_status is not None
        assert status["daemon"]["liveness"] == "up" and status["daemon"]["status"]["state"] == "training"
        assert status["training"]["status"]["job_id"] == file_status.job_id
        assert status["training"]["current"] and status["training"]["active"]
        job_id = file_status.job_id
        queue = _get(srv, "/api/queue")
        assert [item["job_id"] for item in queue["processing"]] == [job_id]
        series = _get(srv, f"/api/jobs/{job_id}/metrics")
        on_disk = [m for m in metrics(home.run_dir(job_id)) if m["kind"] == "train"]
        assert series["last_step"] >= 8 and len(series["train"]) >= 8
        assert [p["step"] for p in series["train"]][:8] == [m["step"] for m in on_disk][:8]
        assert [p["loss"] for p in series["train"]][:8] == [m["loss"] for m in on_disk][:8]
        later = _get(srv, f"/api/jobs/{job_id}/metrics?since=5")
        assert later["train"][0]["step"] == 6
        prom = _get(srv, "/metrics")
        assert "trainbox_step" in prom and "trainbox_daemon_up 1" in prom

        # control: refused without the token, obeyed with it, through the daemon's own control path
        assert httpx.post(srv.url + "/api/control/pause", timeout=10).status_code == 401
        assert httpx.post(srv.url + "/api/control/pause", headers=srv.auth, timeout=10).status_code == 200
        wait_for(lambda: _get(srv, "/api/status")["daemon"]["status"]["state"] == "paused", 60, "paused via API")
        job = _get(srv, f"/api/jobs/{job_id}")
        assert job["job"]["state"] == "paused" and job["runs"][0]["end_step"] is not None

        # an upload goes through the same admission as the inbox
        body = "".join(json.dumps(r) + "\n" for r in _rows(30, "cat")).encode()
        refused = httpx.post(srv.url + "/api/upload?filename=../../evil.jsonl", content=body, headers=srv.auth)
        assert refused.status_code == 400 and not (tmp_path / "evil.jsonl").exists()
        r = httpx.post(srv.url + "/api/upload?filename=second.jsonl&priority=low", content=body, headers=srv.auth)
        assert r.status_code == 201
        wait_for(lambda: _get(srv, "/api/queue")["counts"]["low"] == 1, 30, "upload admitted to queue/low")

        assert httpx.post(srv.url + "/api/control/resume", headers=srv.auth, timeout=10).status_code == 200
        wait_for(lambda: _get(srv, "/api/queue")["counts"]["done"] == 2, 180, "both jobs done")
        db = ModelDB(home.db_url)
        versions = {v.id: v for v in db.versions()}
        api_versions = {v["id"]: v for v in _get(srv, "/api/models")}
        assert api_versions.keys() == versions.keys() and len(versions) == 2
        for vid, v in versions.items():
            assert api_versions[vid]["job_id"] == v.job_id and api_versions[vid]["parent_id"] == v.parent_id
            assert api_versions[vid]["val_loss"] == pytest.approx(v.val_loss)
        assert len(_get(srv, f"/api/jobs/{job_id}")["runs"]) == 2
        api_jobs = {j["id"]: j["state"] for j in _get(srv, "/api/jobs")["items"]}
        assert api_jobs == {j.id: j.state for j in db.jobs()}
        db.close()
    finally:
        srv.stop()
        assert daemon.stop() == 0, daemon.log_text()


def test_dashboard_follows_a_real_job_and_pauses_it(tmp_path: Path, embedded: Path) -> None:
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing in CI (.ci/run installs it)")
        pytest.skip(f"{CHROMIUM} is missing (apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    home = make_home(tmp_path / "home", embedded, max_steps=400)
    daemon = DaemonProc(home, env={"TRAINBOX_TEST_STEP_SLEEP": "0.05"})
    srv = ServerProc(home)
    try:
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1100})
                errors: list[str] = []
                page.on("pageerror", lambda e: errors.append(str(e)))
                page.add_init_script(f"localStorage.setItem('trainbox-token', {srv.token!r});")
                page.goto(srv.url + "/")
                write_jsonl(home.inbox / "browser-job.jsonl", _rows(120, "horse"))
                page.wait_for_function(
                    "document.getElementById('job-name').textContent.includes('browser-job.jsonl')", timeout=60_000
                )
                page.wait_for_function(
                    "Number(document.getElementById('loss-chart').dataset.points) >= 5", timeout=60_000
                )
                before = int(page.get_attribute("#loss-chart", "data-points") or 0)
                page.evaluate("window.__sameDocument = true")
                page.wait_for_function(
                    f"Number(document.getElementById('loss-chart').dataset.points) >= {before + 10}", timeout=60_000
                )
                assert page.evaluate("window.__sameDocument") is True  # grew in place, no reload
                page.click("#btn-pause")
                wait_for(
                    lambda: _get(srv, "/api/status")["daemon"]["status"]["state"] == "paused", 60, "paused by the page"
                )
                page.wait_for_function(
                    "document.getElementById('daemon-state').textContent.toLowerCase().includes('paused')",
                    timeout=30_000,
                )
                shot = tmp_path / "dashboard.png"
                page.screenshot(path=str(shot), full_page=True)
                if target := os.environ.get("TRAINBOX_SCREENSHOT"):
                    shutil.copyfile(shot, target)
                assert not errors, errors
            finally:
                browser.close()
    finally:
        srv.stop()
        assert daemon.stop() == 0, daemon.log_text()
