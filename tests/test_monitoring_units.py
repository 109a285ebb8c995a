"""Unit tests of the status server's pure parts: downsampling, Prometheus text, token, upload names,
the incremental metrics reader, and read protection (in-process, with a stand-in settings object)."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from monitoring import prometheus
from monitoring.app import create_app
from monitoring.downsample import downsample
from monitoring.metrics_log import MetricsCache
from monitoring.token import bearer_matches, load_or_create_token, read_token, token_path
from monitoring.upload import UploadError, checked_name
from monitoring.views import daemon_view
from tests.monitoring_helpers import prom_samples
from trainbox.config import ServerConfig, Settings
from trainbox.home import Home
from trainbox.states import DaemonState
from trainbox.status import DAEMON_STATUS, DaemonStatus, write_status


def pts(values: list[float]) -> list[dict[str, Any]]:
    return [{"step": i, "loss": v} for i, v in enumerate(values)]


def test_downsample_keeps_short_series_whole() -> None:
    series = pts([3.0, 2.0, 1.0])
    assert downsample(series, 10) == series
    assert downsample(series, 0) == []


def test_downsample_bounds_size_keeps_ends_order_and_extremes() -> None:
    values = [1.0] * 100_000
    values[31_337] = 50.0  # a spike a stride would drop
    values[77_777] = -5.0  # and a dip
    series = pts(values)
    out = downsample(series, 500)
    assert len(out) <= 500
    assert out[0] is series[0] and out[-1] is series[-1]
    steps = [p["step"] for p in out]
    assert steps == sorted(steps) and len(set(steps)) == len(steps)
    assert {31_337, 77_777} <= set(steps)


def test_downsample_tiny_budgets_and_missing_values() -> None:
    series = [{"step": i, "loss": float("nan") if i % 2 else float(i)} for i in range(100)]
    for n in (1, 2, 3, 4, 5, 17):
        out = downsample(series, n)
        assert 1 <= len(out) <= n
    assert all(p["loss"] == p["loss"] for p in downsample(series, 20)[1:-1])  # NaN never picked as extreme


def test_prometheus_render() -> None:
    text = prometheus.render(
        prometheus.Snapshot(
            daemon_up=True,
            job_id=7,
            step=120,
            loss=2.5,
            val_loss=None,
            tokens_per_second=5120.0,
            queue_depth={"high": 1, "normal": 0, "low": 2},
            jobs={"done": 3, "failed": 1},
            gpus=[prometheus.GpuReading(0, 'H100 "SXM"', 1024, 80 * 1024**3, 0.5)],
        )
    )
    got = prom_samples(text)
    assert got[("trainbox_daemon_up", ())] == 1
    assert got[("trainbox_step", (("job_id", "7"),))] == 120
    assert got[("trainbox_loss", (("job_id", "7"),))] == 2.5
    assert got[("trainbox_tokens_per_second", (("job_id", "7"),))] == 5120
    assert not any(name == "trainbox_val_loss" for name, _ in got)  # unknown: left out, not 0
    assert got[("trainbox_queue_depth", (("priority", "low"),))] == 2
    assert got[("trainbox_jobs", (("state", "done"),))] == 3
    assert got[("trainbox_gpu_memory_used_bytes", (("gpu", "0"), ("name", 'H100 "SXM"')))] == 1024
    lines = text.splitlines()
    for name, _ in got:  # every reading is declared a gauge (the step time is the current job's histogram)
        assert f"# TYPE {name} gauge" in lines or name.startswith("trainbox_step_seconds_")
    assert text.endswith("\n")


def test_prometheus_without_job_or_gpu() -> None:
    text = prometheus.render(prometheus.Snapshot(daemon_up=False))
    assert prom_samples(text) == {("trainbox_daemon_up", ()): 0}
    assert "gpu" not in text and "trainbox_step" not in text


def test_token_created_0600_and_reused(tmp_path: Path) -> None:
    home = Home(tmp_path)
    assert read_token(home) is None
    old_umask = os.umask(0)  # even a permissive umask must not widen the file
    try:
        token = load_or_create_token(home)
    finally:
        os.umask(old_umask)
    assert len(token) >= 40
    assert stat.S_IMODE(token_path(home).stat().st_mode) == 0o600
    assert load_or_create_token(home) == token == read_token(home)
    token_path(home).write_text("")  # a crash left it empty: a new one is made
    assert load_or_create_token(home) not in ("", token)


def test_bearer_matches() -> None:
    assert bearer_matches("abc", "Bearer abc")
    assert bearer_matches("abc", "bearer  abc ")
    assert not bearer_matches("abc", "Bearer abd")
    assert not bearer_matches("abc", "Basic abc")
    assert not bearer_matches("abc", "Bearer ")
    assert not bearer_matches("abc", None)


@pytest.mark.parametrize(
    "name",
    ["../../evil.jsonl", "/etc/evil.jsonl", "..\\x.jsonl", "a/b.jsonl", "..", "~root.jsonl", "x\x00.jsonl", ""],
)
def test_upload_names_that_name_folders_are_refused(name: str) -> None:
    with pytest.raises(UploadError) as e:
        checked_name(name)
    assert e.value.status == 400


@pytest.mark.parametrize("name", ["data.txt", "data.jsonl.exe", "data", ".jsonl", "data.json"])
def test_upload_names_must_be_jsonl(name: str) -> None:
    with pytest.raises(UploadError):
        checked_name(name)


def test_upload_names_are_sanitised() -> None:
    assert checked_name("my data (v2).jsonl") == "my_data_v2_.jsonl"
    assert checked_name(".hidden.jsonl") == "hidden.jsonl"  # a dotfile would be ignored by intake
    assert ServerConfig().max_upload_bytes == 64 * 1024**2


def test_metrics_cache_reads_only_new_lines_and_rereads_a_cut_file(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    cache = MetricsCache()
    assert cache.get(path).last_step == -1
    path.write_text('{"kind":"train","step":1,"loss":3}\n{"kind":"eval","step":1,"val_loss":3.5}\n')
    s = cache.get(path)
    assert (len(s.train), len(s.eval), s.last_step) == (1, 1, 1)
    with open(path, "a") as f:
        f.write('{"kind":"train","step":2,"loss":2.5}\n{"kind":"train","st')  # the last line is half written
    s2 = cache.get(path)
    assert s2 is s and [p["step"] for p in s.train] == [1, 2]
    with open(path, "a") as f:
        f.write('ep":3,"loss":2}\nnot json\n')
    assert [p["step"] for p in cache.get(path).train_since(1)] == [2, 3]
    tmp = tmp_path / "m.tmp"  # a resumed run cuts the file back by atomic replace
    tmp.write_text('{"kind":"train","step":1,"loss":3}\n')
    os.replace(tmp, path)
    s3 = cache.get(path)
    assert s3 is not s and s3.last_step == 1


def test_daemon_liveness(tmp_path: Path) -> None:
    home = Home(tmp_path).ensure()
    assert daemon_view(home, 0.5, 1000.0).liveness == "absent"
    path = home.status / DAEMON_STATUS
    write_status(path, DaemonStatus(state=DaemonState.IDLE, pid=os.getpid(), heartbeat=1000.0))
    assert daemon_view(home, 0.5, 1001.0).liveness == "up"
    assert daemon_view(home, 0.5, 1014.0).liveness == "up"
    assert daemon_view(home, 0.5, 1016.0).liveness == "stale"  # 15 s: heartbeat_limit(0.5)
    dead = 2**22 + 12345  # above Linux's default pid_max: no such process
    write_status(path, DaemonStatus(state=DaemonState.TRAINING, pid=dead, heartbeat=1000.0))
    assert daemon_view(home, 0.5, 1001.0).liveness == "down"
    write_status(path, DaemonStatus(state=DaemonState.STOPPED, pid=dead, heartbeat=1000.0))
    view = daemon_view(home, 0.5, 1001.0)
    assert view.liveness == "stopped" and not view.alive


def test_reads_can_require_the_token(tmp_path: Path) -> None:
    """``server.read_requires_token`` closes the reads."""
    home = Home(tmp_path).ensure()
    settings = Settings(server=ServerConfig(port=0, read_requires_token=True))
    with TestClient(create_app(home, settings)) as client:
        token = read_token(home)
        assert client.get("/api/status").status_code == 401
        assert client.get("/api/status", headers={"Authorization": f"Bearer {token}"}).status_code == 200
        assert client.get(f"/api/queue?token={token}").status_code == 200
        assert client.get("/").status_code == 200  # the page itself is open, so it can ask for the token
        assert client.get("/static/app.js").status_code == 200
