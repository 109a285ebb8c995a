"""The status server's API, against a real ``python -m monitoring.server`` process on a random port,
over a home populated the way a daemon leaves it (``tests.monitoring_helpers.populate``)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from management import fleet_controls
from management.db import ModelDB
from tests.monitoring_helpers import FAKE_JOB, ServerProc, append_metrics, populate, prom_samples, write_daemon_status
from trainbox import control
from trainbox.home import Home

STEP = 120


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Home:
    h = Home(tmp_path_factory.mktemp("home"))
    populate(h, step=STEP)
    return h


@pytest.fixture(scope="module")
def server(home: Home) -> Iterator[ServerProc]:
    with ServerProc(home) as srv:
        yield srv


@pytest.fixture()
def client(server: ServerProc) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=10) as c:
        yield c


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()} if root.exists() else set()


def test_url_line_and_token(server: ServerProc, home: Home) -> None:
    assert server.url.startswith("http://127.0.0.1:")
    assert (home.root / "api-token").read_text().strip() == server.token


def test_status(home: Home, client: httpx.Client) -> None:
    write_daemon_status(home)  # a fresh heartbeat
    st = client.get("/api/status").json()
    assert st["daemon"]["liveness"] == "up" and st["daemon"]["alive"] is True
    assert st["daemon"]["status"]["state"] == "training"
    assert st["daemon"]["status"]["current_job"] == FAKE_JOB
    t = st["training"]
    assert t["current"] is True and t["active"] is True
    assert t["status"]["step"] == STEP and t["status"]["total_steps"] == 300
    assert t["progress"] == pytest.approx(STEP / 300)
    assert st["queue"] == {"high": 1, "normal": 1, "low": 1, "processing": 1, "done": 2, "failed": 2}


def test_queue(client: httpx.Client) -> None:
    q = client.get("/api/queue").json()
    assert [(w["job_id"], w["priority"], w["position"]) for w in q["waiting"]] == [
        (8, "high", 1),
        (6, "normal", 2),
        (7, "low", 3),
    ]
    assert [(p["job_id"], p["state"], p["name"]) for p in q["processing"]] == [(5, "running", "current.jsonl")]
    failed = {f["job_id"]: f for f in q["failed"]}
    assert failed[3]["error_class"] == "training" and "RuntimeError: boom" in failed[3]["reason"]
    assert failed[3]["error"]["log_tail"][-1] == "RuntimeError: boom"
    assert failed[4]["error_class"] == "bad_input" and "line 2" in failed[4]["reason"]
    assert failed[4]["name"] == "bad.jsonl"
    assert [(d["job_id"], d["version"]) for d in q["done"]] == [(2, 2), (1, 1)]


def test_jobs_and_job_detail(client: httpx.Client) -> None:
    page = client.get("/api/jobs").json()
    jobs = page["items"]
    assert [j["id"] for j in jobs] == [8, 7, 6, 5, 4, 3, 2, 1] and page["next"] is None
    assert {j["id"]: j["state"] for j in jobs}[4] == "rejected"
    assert client.get("/api/jobs?state=done").json()["items"][0]["version"] == 2
    first = client.get("/api/jobs?limit=3").json()
    assert [j["id"] for j in first["items"]] == [8, 7, 6] and first["next"] == 6
    rest = client.get(f"/api/jobs?limit=5&before={first['next']}").json()
    assert [j["id"] for j in rest["items"]] == [5, 4, 3, 2, 1] and rest["next"] is None

    d = client.get(f"/api/jobs/{FAKE_JOB}").json()
    assert d["job"]["name"] == "current.jsonl" and d["settings"] == {"max_steps": 300}
    assert d["spec"]["training"]["max_steps"] == 300
    assert [r["attempt"] for r in d["runs"]] == [1, 2] and d["runs"][0]["outcome"] == "interrupted"
    assert [c["step"] for c in d["checkpoints"]] == [50, 100]
    assert [w["message"] for w in d["warnings"]] == ["loss spiked at step 40"]
    assert [p["data"]["phase"] for p in d["phase_history"]] == ["predict"]
    assert d["metrics"]["last_step"] >= STEP and d["model_version"] is None and d["error"] is None

    crashed = client.get("/api/jobs/3").json()
    assert crashed["error"]["class"] == "training" and crashed["job"]["error"].startswith("worker exited")
    done = client.get("/api/jobs/2").json()
    assert done["model_version"]["id"] == 2 and done["model_version"]["ancestors"] == [1]
    assert client.get("/api/jobs/999").status_code == 404
    assert client.get("/api/jobs/999/metrics").status_code == 404


def test_metrics_paging_and_downsampling(client: httpx.Client) -> None:
    m = client.get(f"/api/jobs/{FAKE_JOB}/metrics").json()
    assert m["total_train_points"] >= STEP and not m["downsampled"]
    assert [p["step"] for p in m["train"][:3]] == [1, 2, 3]
    assert m["train"][0]["kind"] == "train" and "grad_norm" in m["train"][0] and "lr" in m["train"][0]
    assert [e["step"] for e in m["eval"]][:4] == [25, 50, 75, 100]

    page = client.get(f"/api/jobs/{FAKE_JOB}/metrics?since=100").json()
    assert page["train"][0]["step"] == 101 and page["since"] == 100
    assert page["last_step"] == m["last_step"]

    small = client.get(f"/api/jobs/{FAKE_JOB}/metrics?max_points=20").json()
    assert small["downsampled"] and len(small["train"]) <= 20
    assert small["train"][0]["step"] == 1 and small["train"][-1]["step"] == m["train"][-1]["step"]


def test_metrics_100k_steps_stay_fast(home: Home, client: httpx.Client) -> None:
    run = home.run_dir(42)
    run.mkdir(parents=True, exist_ok=True)
    line = '{"kind":"train","step":%d,"loss":%f,"lr":0.0003,"grad_norm":0.5,"tokens_per_s":5000.0,"epoch":0,"time":0}\n'
    (run / "metrics.jsonl").write_text("".join(line % (i, 1 + 1 / i) for i in range(1, 100_001)))
    first = client.get("/api/jobs/42/metrics?max_points=2000")
    assert first.status_code == 200
    body = first.json()
    assert body["total_train_points"] == 100_000 and len(body["train"]) <= 2000
    t0 = time.perf_counter()
    again = client.get("/api/jobs/42/metrics?max_points=2000")
    elapsed = time.perf_counter() - t0
    assert again.status_code == 200
    assert elapsed < 1.0, f"a cached 100k-step history took {elapsed:.2f}s"


def test_metrics_carry_the_hybrid_engines_latest_fitted_curve(home: Home, client: httpx.Client) -> None:
    """The dashboard's "predicted" line: each ``hybrid_curve`` line's sampled fit replaces the one before."""
    run = home.run_dir(43)
    run.mkdir(parents=True, exist_ok=True)
    lines = [
        {"kind": "train", "step": 10, "loss": 2.0},
        {"kind": "eval", "step": 10, "val_loss": 2.1},
        {"kind": "hybrid_curve", "step": 10, "val_loss": 2.1, "predicted_final": None, "curve": []},
        {"kind": "eval", "step": 20, "val_loss": 1.9},
        {"kind": "hybrid_curve", "step": 20, "val_loss": 1.9, "curve": [[10, 2.0], [40, 1.7]]},
        {"kind": "eval", "step": 30, "val_loss": 1.8},
        {"kind": "hybrid_curve", "step": 30, "val_loss": 1.8, "curve": [[10, 2.05], [25, 1.85], [60, 1.6]]},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    body = client.get("/api/jobs/43/metrics").json()
    assert body["predicted"] == [[10, 2.05], [25, 1.85], [60, 1.6]]
    assert [e["step"] for e in body["eval"]] == [10, 20, 30] and [p["step"] for p in body["train"]] == [10]
    assert client.get(f"/api/jobs/{FAKE_JOB}/metrics").json()["predicted"] == []  # the plain engine: none


def test_models(client: httpx.Client) -> None:
    models = client.get("/api/models").json()
    assert [(v["id"], v["parent_id"], v["current"], v["ancestors"], v["lineage"]) for v in models] == [
        (2, 1, True, [1], "main"),
        (1, None, False, [], "main"),
    ]
    assert models[0]["job_name"] == "second.jsonl" and models[0]["val_loss"] == 1.4
    # issue 17: each version's row of the version x job matrix, and the jobs it was trained on
    assert models[0]["memory_losses"] == {"1": 0.9, "2": 0.7} and models[0]["trained_on"] == [1, 2]
    assert models[1]["memory_losses"] == {"1": 0.5, "2": 3.0} and models[1]["trained_on"] == [1]


def test_system(client: httpx.Client) -> None:
    s = client.get("/api/system").json()
    assert s["cpu_count"] >= 1 and s["ram_total_bytes"] > 0 and s["disk_total_bytes"] > 0
    if s["gpus"]:
        assert s["gpu_state"].startswith("ok") and s["gpus"][0]["memory_total_bytes"] > 0
    else:
        assert s["gpu_state"].startswith("no GPU")


def test_events(client: httpx.Client) -> None:
    page = client.get("/api/events").json()
    events = page["items"]
    assert [e["kind"] for e in events][:3] == ["admitted", "done", "rejected"]
    assert page["newer"] is None and page["older"] is None  # all of them, in one page
    ids = [e["id"] for e in events]
    assert ids == sorted(ids)
    later = client.get(f"/api/events?since_id={ids[4]}").json()
    assert [e["id"] for e in later["items"]] == ids[5:]
    newest = client.get("/api/events?limit=2").json()
    assert [e["kind"] for e in newest["items"]] == ["warning", "phase"]
    assert newest["older"] == ids[-2] and newest["newer"] is None
    back = client.get(f"/api/events?limit=2&before_id={newest['older']}").json()
    assert [e["id"] for e in back["items"]] == ids[-4:-2] and back["newer"] == ids[-3]
    forward = client.get(f"/api/events?limit=2&since_id={ids[0]}").json()
    assert [e["id"] for e in forward["items"]] == ids[1:3] and forward["newer"] == ids[2]
    mine = client.get(f"/api/events?job_id={FAKE_JOB}").json()["items"]
    assert mine and all(e["job_id"] == FAKE_JOB for e in mine)


def test_prometheus(home: Home, client: httpx.Client) -> None:
    write_daemon_status(home)
    r = client.get("/metrics")
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    got = prom_samples(r.text)
    assert got[("trainbox_daemon_up", ())] == 1
    assert ("trainbox_step", (("job_id", str(FAKE_JOB)),)) in got
    assert any(name == "trainbox_loss" for name, _ in got)
    assert any(name == "trainbox_val_loss" for name, _ in got)
    assert got[("trainbox_tokens_per_second", (("job_id", str(FAKE_JOB)),))] == 5120
    assert got[("trainbox_queue_depth", (("priority", "high"),))] == 1
    assert got[("trainbox_jobs", (("state", "done"),))] == 2 and got[("trainbox_jobs", (("state", "queued"),))] == 3
    assert got[("trainbox_jobs_finished_total", (("outcome", "done"),))] == 2  # counters, read from the DB
    assert ("trainbox_step_seconds_count", (("job_id", str(FAKE_JOB)),)) in got  # the current job's histogram


def test_openapi_documents_every_endpoint(client: httpx.Client) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for p in [
        "/api/status",
        "/api/queue",
        "/api/jobs",
        "/api/jobs/{job_id}",
        "/api/jobs/{job_id}/metrics",
        "/api/models",
        "/api/system",
        "/api/events",
        "/api/stream",
        "/metrics",
        "/api/control/{action}",
        "/api/fleet/{action}",
        "/api/upload",
    ]:
        assert p in paths, p


def test_dashboard_is_served(client: httpx.Client) -> None:
    page = client.get("/")
    assert page.status_code == 200 and 'id="loss-chart"' in page.text
    for asset in ("/static/app.js", "/static/style.css"):
        assert client.get(asset).status_code == 200
    assert "http" not in "".join(line for line in page.text.splitlines() if "src=" in line or "href=" in line)


def test_job_report_page_and_its_plots_only(home: Home, client: httpx.Client) -> None:
    """``/jobs/{id}/report``: the run's report.md as HTML with raw HTML off; images point at the plot
    route, which serves the report's own plots and nothing else of the run folder or the home."""
    run_dir = home.run_dir(FAKE_JOB)
    png = b"\x89PNG\r\n\x1a\n fake plot"
    (run_dir / "loss.png").write_bytes(png)
    (run_dir / "report.md").write_text(
        "# Job 5\n\n| a | b |\n| --- | --- |\n| 1 | 2 |\n\n![Loss](loss.png)\n\n![t](../../api-token)\n\n"
        "<script>alert(1)</script>\n"
    )
    page = client.get(f"/jobs/{FAKE_JOB}/report")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert f'<img src="/jobs/{FAKE_JOB}/report/loss.png"' in page.text and "<td>2</td>" in page.text
    assert "<script>" not in page.text and "api-token" not in page.text
    plot = client.get(f"/jobs/{FAKE_JOB}/report/loss.png")
    assert plot.content == png and plot.headers["content-type"] == "image/png"
    for name in ("job.json", "lr.png", "..%2F..%2Fapi-token", "report.md"):
        assert client.get(f"/jobs/{FAKE_JOB}/report/{name}").status_code in (404, 422), name
    assert client.get("/jobs/999/report").status_code == 404


def test_stream_sends_status_and_new_metric_lines(home: Home, server: ServerProc) -> None:
    with httpx.Client(base_url=server.url, timeout=10) as c, c.stream("GET", "/api/stream") as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        seen: dict[str, list[dict]] = {}
        event = ""
        appended = False
        deadline = time.monotonic() + 15
        for line in r.iter_lines():
            if time.monotonic() > deadline:
                break
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                seen.setdefault(event, []).append(json.loads(line[6:]))
                if event == "status" and not appended:
                    last = client_last_step(server)
                    append_metrics(home, last + 1, last + 5)  # the worker logs five more steps
                    appended = True
                if event == "metrics":
                    break
        assert seen["status"][0]["daemon"]["status"]["current_job"] == FAKE_JOB
        new = seen["metrics"][0]
        assert new["job_id"] == FAKE_JOB and len(new["train"]) == 5  # only lines after connecting


def client_last_step(server: ServerProc) -> int:
    return int(httpx.get(f"{server.url}/api/jobs/{FAKE_JOB}/metrics?since=1000000").json()["last_step"])


def test_control_requires_the_token(home: Home, server: ServerProc, client: httpx.Client) -> None:
    before = files_under(home.control)
    assert client.post("/api/control/pause").status_code == 401
    assert client.post("/api/control/pause", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert client.post("/api/control/pause", headers={"Authorization": server.token}).status_code == 401
    assert files_under(home.control) == before
    assert client.post("/api/control/explode", headers=server.auth).status_code == 422

    r = client.post("/api/control/pause", headers=server.auth)
    assert r.status_code == 200 and r.json()["action"] == "pause"
    requests = control.pending(home.control)
    assert [q.action.value for q in requests] == ["pause"] and requests[0].path.name == r.json()["file"]
    assert client.get("/api/status").json()["pending_controls"] == ["pause"]
    for action in ("resume", "stop"):
        assert client.post(f"/api/control/{action}", headers=server.auth).status_code == 200
    assert [q.action.value for q in control.pending(home.control)] == ["pause", "resume", "stop"]
    for q in control.pending(home.control):
        control.consume(q)


def test_fleet_controls_need_the_token_and_reach_the_db(home: Home, server: ServerProc, client: httpx.Client) -> None:
    """issue 18: /api/fleet/{action} writes the fleet's request (management/fleet_controls.py) as
    `trainbox pause|resume|stop --host H | --fleet` does; a daemon of the fleet applies it."""
    assert client.post("/api/fleet/pause").status_code == 401
    assert client.post("/api/fleet/explode", headers=server.auth).status_code == 422
    everyone = client.post("/api/fleet/pause", headers=server.auth)
    one = client.post("/api/fleet/resume", params={"host": "gpu-2"}, headers=server.auth)
    assert everyone.status_code == one.status_code == 202, one.text
    assert (everyone.json()["host"], one.json()["host"]) == ("", "gpu-2")
    db = ModelDB(home.db_url)
    try:
        seen = fleet_controls.addressed(db, "gpu-2", 0)
        assert [(r.action, r.host) for r in seen] == [("pause", ""), ("resume", "gpu-2")]
        assert [r.action for r in fleet_controls.addressed(db, "gpu-1", 0)] == ["pause"]  # not gpu-2's resume
        assert fleet_controls.starting_state(db, "gpu-1")[0] is True
        assert fleet_controls.starting_state(db, "gpu-2")[0] is False
    finally:
        db.close()


def test_cancel_and_prioritize_need_the_token_and_a_live_job(
    home: Home, server: ServerProc, client: httpx.Client
) -> None:
    before = files_under(home.control)
    assert client.post("/api/jobs/7/cancel").status_code == 401
    assert client.post("/api/jobs/7/priority", params={"priority": "high"}).status_code == 401
    training = client.post(f"/api/jobs/{FAKE_JOB}/priority", params={"priority": "high"}, headers=server.auth)
    assert training.status_code == 409  # only a waiting job moves between queues
    assert client.post("/api/jobs/999/cancel", headers=server.auth).status_code == 409
    assert client.post("/api/jobs/7/priority", params={"priority": "urgent"}, headers=server.auth).status_code == 422
    assert client.post("/api/control/cancel", headers=server.auth).status_code == 422  # needs a job: not here
    assert files_under(home.control) == before
    assert client.post("/api/jobs/7/cancel", headers=server.auth).status_code == 202
    assert client.post("/api/jobs/6/priority", params={"priority": "high"}, headers=server.auth).status_code == 202
    assert client.post(f"/api/jobs/{FAKE_JOB}/cancel", headers=server.auth).status_code == 202  # training: stopped
    pending = control.pending(home.control)
    expected = ["cancel job 7", "prioritize job 6 high", f"cancel job {FAKE_JOB}"]
    assert [q.describe() for q in pending] == expected
    assert client.get("/api/status").json()["pending_controls"] == expected
    for q in pending:
        control.consume(q)


@pytest.mark.parametrize("name", ["../../evil.jsonl", "/tmp/evil.jsonl", "..\\x.jsonl", "sub/x.jsonl", "x.txt"])
def test_upload_bad_names_write_nothing(home: Home, server: ServerProc, client: httpx.Client, name: str) -> None:
    outside = home.root.parent
    before, before_outside = files_under(home.root), {p.name for p in outside.iterdir()}
    r = client.post("/api/upload", params={"filename": name}, content=b'{"text": "x"}\n', headers=server.auth)
    assert r.status_code == 400, r.text
    assert files_under(home.root) == before
    assert {p.name for p in outside.iterdir()} == before_outside
    assert not Path("/tmp/evil.jsonl").exists()


def test_upload_requires_the_token(home: Home, client: httpx.Client) -> None:
    before = files_under(home.inbox)
    r = client.post("/api/upload", params={"filename": "a.jsonl"}, content=b'{"text": "x"}\n')
    assert r.status_code == 401 and files_under(home.inbox) == before


def test_upload_lands_in_the_inbox(home: Home, server: ServerProc, client: httpx.Client) -> None:
    body = b'{"text": "hello"}\n{"prompt": "a", "completion": "b"}\n'
    r = client.post("/api/upload?priority=high&filename=my data.jsonl", content=body, headers=server.auth)
    assert r.status_code == 201, r.text
    assert r.json() == {
        "file": "my_data.jsonl",
        "path": "inbox/high/my_data.jsonl",
        "priority": "high",
        "lineage": "main",
        "bytes": len(body),
    }
    assert (home.inbox / "high" / "my_data.jsonl").read_bytes() == body
    again = client.post("/api/upload?priority=high&filename=my data.jsonl", content=b"{}\n", headers=server.auth)
    assert again.json()["file"] == "my_data.1.jsonl"  # never replaces a file
    assert (home.inbox / "high" / "my_data.jsonl").read_bytes() == body
    assert not [p for p in home.inbox.rglob(".*")]  # no temp file left behind
    assert client.post("/api/upload?filename=x.jsonl", content=b"", headers=server.auth).status_code == 400
    bad_priority = client.post("/api/upload?priority=urgent&filename=x.jsonl", content=b"{}", headers=server.auth)
    assert bad_priority.status_code == 422
    # issue 18: a lineage's upload lands in its folder; a name that could not be one is refused, nothing written
    chat = client.post("/api/upload?lineage=chat&filename=c.jsonl", content=body, headers=server.auth)
    assert chat.status_code == 201 and chat.json()["path"] == "inbox/chat/normal/c.jsonl"
    before = files_under(home.inbox)
    for bad in ("../x", "Chat", "high"):
        r = client.post(
            "/api/upload", params={"lineage": bad, "filename": "x.jsonl"}, content=b"{}", headers=server.auth
        )
        assert r.status_code == 422 and "lineage" in r.json()["detail"], bad
    assert files_under(home.inbox) == before


def test_upload_size_limit(tmp_path: Path) -> None:
    home = Home(tmp_path).ensure()
    with ServerProc(home, "--max-upload-bytes", "1000") as srv, httpx.Client(base_url=srv.url, timeout=10) as c:
        ok = c.post("/api/upload?filename=ok.jsonl", content=b"x" * 1000, headers=srv.auth)
        assert ok.status_code == 201
        before = files_under(home.root)
        declared = c.post("/api/upload?filename=big.jsonl", content=b"x" * 1001, headers=srv.auth)
        assert declared.status_code == 413

        def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is enforced while streaming
            for _ in range(10):
                yield b"x" * 300

        streamed = c.post("/api/upload?filename=big2.jsonl", content=chunks(), headers=srv.auth)
        assert streamed.status_code == 413
        assert files_under(home.root) == before


def test_shutdown_with_an_open_stream_is_prompt(tmp_path: Path) -> None:
    home = Home(tmp_path)
    populate(home, step=10)
    srv = ServerProc(home)
    try:
        with httpx.Client(base_url=srv.url, timeout=10) as c, c.stream("GET", "/api/stream") as r:
            lines = r.iter_lines()
            next(lines)
            t0 = time.monotonic()
            code = srv.stop(timeout=10)
            took = time.monotonic() - t0
            rest = list(lines)  # the stream ends rather than hanging
        assert took < 4, f"shutdown took {took:.1f}s with a stream open"
        assert code in (0, -15), srv.output
        assert isinstance(rest, list)
    finally:
        srv.stop()


def test_a_closed_stream_frees_the_server(server: ServerProc) -> None:
    for _ in range(5):
        with httpx.Client(base_url=server.url, timeout=5) as c, c.stream("GET", "/api/stream") as r:
            next(r.iter_lines())
    assert httpx.get(f"{server.url}/api/status", timeout=5).status_code == 200
