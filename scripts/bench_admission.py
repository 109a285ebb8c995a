"""Admission at scale: N one-line files renamed into the inbox of a real daemon at once.

Measures, on a fresh home with a paused daemon (so nothing trains meanwhile): the time from the
first rename into the inbox until every file has left it and sits in queue/normal/, the largest gap
between the daemon's heartbeats while it admitted (the watchdog kills a daemon whose heartbeat goes
stale), and whether every file ended in exactly one place. ``--write`` appends the table to
docs/BENCHMARKS.md.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_admission.py --files 10000 --write
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _status(home: Path) -> dict[str, object]:
    try:
        data = json.loads((home / "status" / "daemon.json").read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _wait(cond: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise SystemExit(f"timed out waiting for {what}")


def run(n_files: int) -> dict[str, float | int | str]:
    with tempfile.TemporaryDirectory(prefix="tb-bench-admission-") as tmp:
        home = Path(tmp) / "home"
        (home / "control").mkdir(parents=True)
        staging = Path(tmp) / "staging"
        staging.mkdir()
        for i in range(n_files):
            (staging / f"job-{i:05d}.jsonl").write_text(f'{{"text": "example number {i}"}}\n')
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        cmd = [sys.executable, "-m", "cli"]
        daemon = subprocess.Popen(
            [*cmd, "daemon", "--home", str(home)],
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            _wait(lambda: _status(home).get("state") == "idle", 120, "the daemon to start")
            subprocess.run([*cmd, "pause", "--home", str(home)], env=env, check=True, capture_output=True)
            _wait(lambda: _status(home).get("paused") is True, 60, "the pause")
            inbox = home / "inbox"
            t0 = time.monotonic()
            for f in sorted(staging.iterdir()):
                os.rename(f, inbox / f.name)
            renamed = time.monotonic() - t0
            beats: list[float] = []
            queue = home / "queue" / "normal"

            def all_queued() -> bool:
                beat = _status(home).get("heartbeat")
                if isinstance(beat, float) and (not beats or beat != beats[-1]):
                    beats.append(beat)
                return sum(1 for _ in os.scandir(queue)) >= n_files

            _wait(all_queued, 1800, "every file queued")
            elapsed = time.monotonic() - t0
            left = [p.name for p in inbox.iterdir() if p.is_file()]
            queued = sum(1 for _ in os.scandir(queue))
            failed = sum(1 for _ in os.scandir(home / "queue" / "failed"))
            gaps = [b - a for a, b in itertools.pairwise(beats)]
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(60)
    return {
        "files": n_files,
        "rename_s": round(renamed, 1),
        "all_queued_s": round(elapsed, 1),
        "files_per_s": round(n_files / elapsed, 1),
        "max_heartbeat_gap_s": round(max(gaps, default=0.0), 2),
        "left_in_inbox": len(left),
        "queued": queued,
        "failed": failed,
        "daemon_rc": daemon.returncode,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--write", action="store_true", help="append the result to docs/BENCHMARKS.md")
    args = parser.parse_args()
    result = run(args.files)
    print(json.dumps(result, indent=2))
    if args.write:
        lines = [
            "",
            f"### Run of {time.strftime('%Y-%m-%d')} ({platform.machine()}, {os.cpu_count()} cores)",
            "",
            "| files | renames done | all queued | files/s | largest heartbeat gap | left in inbox | queued | failed |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
            f"| {result['files']} | {result['rename_s']} s | {result['all_queued_s']} s | {result['files_per_s']} "
            f"| {result['max_heartbeat_gap_s']} s | {result['left_in_inbox']} | {result['queued']} "
            f"| {result['failed']} |",
            "",
        ]
        with open(ROOT / "docs" / "BENCHMARKS.md", "a", encoding="utf-8") as f:
            f.write("\n".join(lines))


if __name__ == "__main__":
    main()
