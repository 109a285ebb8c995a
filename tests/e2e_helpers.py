"""Helpers for end-to-end tests: a real daemon subprocess on a temporary home."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trainbox.home import Home

# warm_worker off: a standby started by every test's daemon would cost each test a worker's imports
# (seconds of CPU) whether or not it trains; tests/test_warm_worker.py and tests/test_chaos.py run it.
FAST_CONFIG = """
[daemon]
poll_interval = 0.2
settle_seconds = 1.0
rescan_interval = 1.0
worker_stop_timeout = 60
warm_worker = false

[training]
max_steps = {max_steps}
eval_every = 10
checkpoint_every = 10
batch_size = 8
max_length = 64
learning_rate = {lr}
warmup_ratio = 0.1
threads = 1
"""


def wait_for(cond: Callable[[], Any], timeout: float, what: str, every: float = 0.1) -> Any:
    """Poll ``cond`` until it returns something truthy; fail with ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def make_home(root: Path, embedded: Path, max_steps: int = 30, lr: float = 3e-3, extra: str = "") -> Home:
    home = Home(root).ensure()
    home.config_file.write_text(FAST_CONFIG.format(max_steps=max_steps, lr=lr) + extra)
    shutil.copytree(embedded, home.embedded_model)  # built once per test session
    return home


# one host's part of a fleet (issue 18): the shared DB and folder, its name (scripts/bench_fleet.py uses it too)
FLEET_TOML = """
[db]
url = "{db_url}"

[storage]
shared = "{shared}"

[fleet]
enabled = true
host = "{host}"
"""


def fleet_home(
    root: Path, shared: Path, embedded: Path, db_url: str, host: str, max_steps: int, daemon: str = ""
) -> Home:
    """A fleet host's home: fast settings, a checkpoint every step, an evaluation every 4, one DB and one shared
    folder, short leases (3 s) and beats; ``daemon``: lines added to its ``[daemon]`` table."""
    home = make_home(root, embedded, max_steps=max_steps)
    text = home.config_file.read_text().replace("checkpoint_every = 10", "checkpoint_every = 1")
    text = text.replace("eval_every = 10", "eval_every = 4").replace("[daemon]\n", f"[daemon]\n{daemon}")
    text += FLEET_TOML.format(db_url=db_url, shared=shared, host=host) + "lease_seconds = 3\nheartbeat_seconds = 0.5\n"
    home.config_file.write_text(text)
    return Home.resolve(root)


def cli(home: Home, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli", *args, "--home", str(home.root)],
        capture_output=True,
        text=True,
        timeout=60,
        check=check,
    )


class DaemonProc:
    def __init__(self, home: Home, env: dict[str, str] | None = None) -> None:
        self.home = home
        self.log = open(home.root / "daemon-test.log", "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cli", "daemon", "--home", str(home.root)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )

    def status(self) -> dict[str, Any]:
        """What ``trainbox status --json`` prints, computed in this process by the CLI's own function: tests
        poll this in loops, and a Python start per poll (about 0.4 s of CPU) kept a core busy while they waited
        on 2-core CI. Tests that check the command itself call ``cli(home, "status", ...)``."""
        from cli.main import _status_data

        return json.loads(json.dumps(_status_data(self.home)))  # the JSON the command prints, read back

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGUSR1)  # a hung daemon writes its threads' stacks to its log
                time.sleep(1)
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.log.close()
        return self.proc.returncode

    def log_text(self) -> str:
        return (self.home.root / "daemon-test.log").read_text(errors="replace")


def metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)
    return path


def retrain_in_process(home: Home, job_id: int, run_dir: Path, **training: Any) -> dict[str, Any]:
    """A finished job of ``home`` trained again, uninterrupted, in this process (the worker's code path
    without its start-up) from its saved spec and its done/ file, with ``training`` overrides; returns its
    final weights (the reference a chaos-hit or multi-process run must equal)."""
    from safetensors.torch import load_file

    from tests.test_core_worker import rehome, run_in_process
    from trainbox.jobspec import JobSpec

    spec = JobSpec.load(home.run_dir(job_id))
    spec = spec.model_copy(update={"training": spec.training.model_copy(update=training)})
    (data,) = home.done.glob(f"*__{spec.job_name}")
    code, result = run_in_process(rehome(spec, run_dir, data))
    assert code == 0, result
    return load_file(run_dir / "final" / "model.safetensors")
