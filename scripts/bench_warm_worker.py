"""Drop to done with and without the warm worker (daemon.warm_worker), side by side in one run.

For each round and each variant (alternating): a fresh home with the embedded model, a real daemon
left idle for ``--idle`` seconds (what a user's daemon is between drops: long enough for the standby's
imports), then one small JSONL file renamed into the inbox; the time until it sits in queue/done/
(admission, the worker's start, training, saving, the version and its gate). Prints medians and the
ratio; ``--write`` appends the table to docs/BENCHMARKS.md.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_warm_worker.py --rounds 3 --write
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # the model build's save bar
os.environ.setdefault("TQDM_DISABLE", "1")

CONFIG = """
[daemon]
poll_interval = 0.2
settle_seconds = 0.5
warm_worker = {warm}

[training]
max_steps = {steps}
eval_every = 100
checkpoint_every = 100
batch_size = 8
max_length = 64
threads = 1
"""


def _wait(cond: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return
        time.sleep(0.02)
    raise SystemExit(f"timed out waiting for {what}")


def _state(home: Path) -> str:
    try:
        return str(json.loads((home / "status" / "daemon.json").read_text()).get("state"))
    except (OSError, ValueError):
        return ""


def drop_to_done(model: Path, warm: bool, steps: int, idle: float) -> float:
    with tempfile.TemporaryDirectory(prefix="tb-bench-warm-") as tmp:
        home = Path(tmp) / "home"
        home.mkdir()
        (home / "trainbox.toml").write_text(CONFIG.format(warm=str(warm).lower(), steps=steps))
        shutil.copytree(model, home / "cache" / "embedded-model")
        staged = Path(tmp) / "job.jsonl"
        staged.write_text("".join(json.dumps({"text": f"line {k}: the warm worker"}) + "\n" for k in range(64)))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
        daemon = subprocess.Popen(
            [sys.executable, "-m", "cli", "daemon", "--home", str(home)],
            env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            _wait(lambda: _state(home) == "idle", 120, "the daemon to start")
            time.sleep(idle)
            t0 = time.monotonic()
            os.rename(staged, home / "inbox" / "job.jsonl")
            _wait(lambda: any((home / "queue" / "done").glob("*.jsonl")), 600, "the job done")
            return time.monotonic() - t0
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(120)


def _runs(times: list[float]) -> str:
    return ", ".join(f"{t:.1f}" for t in times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--idle", type=float, default=20.0, help="seconds the daemon idles before the drop")
    parser.add_argument("--write", action="store_true", help="append the result to docs/BENCHMARKS.md")
    args = parser.parse_args()
    from core.embedded import ensure_embedded_model

    with tempfile.TemporaryDirectory(prefix="tb-bench-model-") as tmp:
        model = ensure_embedded_model(Path(tmp) / "model")
        times: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(args.rounds):
            for warm in (False, True):
                times[warm].append(drop_to_done(model, warm, args.steps, args.idle))
                print(f"warm={warm}: {times[warm][-1]:.1f} s", flush=True)
    cold, hot = statistics.median(times[False]), statistics.median(times[True])
    print(json.dumps({"cold_s": times[False], "warm_s": times[True], "ratio": round(cold / hot, 2)}))
    if args.write:
        lines = [
            "",
            f"### Drop to done, warm worker ({time.strftime('%Y-%m-%d')}, {platform.machine()}, "
            f"{os.cpu_count()} cores, CPU, embedded model, {args.steps} steps, daemon idle {args.idle:.0f} s first)",
            "",
            "| variant | runs (s) | median | speed-up |",
            "| --- | --- | ---: | ---: |",
            f"| cold start (warm_worker = false) | {_runs(times[False])} | {cold:.1f} s | 1.00x |",
            f"| warm worker (default) | {_runs(times[True])} | {hot:.1f} s | {cold / hot:.2f}x |",
            "",
        ]
        with open(ROOT / "docs" / "BENCHMARKS.md", "a", encoding="utf-8") as f:
            f.write("\n".join(lines))


if __name__ == "__main__":
    main()
