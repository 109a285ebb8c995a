"""Drop to done with and without the warm worker (daemon.warm_worker), side by side in one run.

For each round and each variant (alternating): a fresh home with the embedded model, a real daemon
left idle for ``--idle`` seconds (what a user's daemon is between drops: long enough for the standby's
imports), then one small JSONL file renamed into the inbox; the time until it sits in queue/done/
(admission, the worker's start, training, saving, the version and its gate). Prints medians and the
ratio; ``--write`` appends the table to docs/BENCHMARKS.md.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_warm_worker.py --rounds 3 --write

``--examples``: the README's three example files (examples/*.jsonl) dropped together into the daemon's
inbox, timed until all three sit in queue/done/, with the training settings a user gets (no [training]
keys but the thread count). Variants: "before" (warm_worker = false, compile = false: the defaults before
issue 15 added them) and "after" (today's defaults), so a slowdown from the warm worker or compilation
would show (issue 15's acceptance).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_warm_worker.py --examples --rounds 3 --write
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


EXAMPLES_CONFIG = """
[daemon]
poll_interval = 0.2
settle_seconds = 0.5
{daemon}
[training]
threads = 1
{training}
"""
BEFORE = {"daemon": "warm_worker = false", "training": "compile = false"}  # the defaults before issue 15
AFTER = {"daemon": "", "training": ""}  # today's defaults


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
    config = CONFIG.format(warm=str(warm).lower(), steps=steps)
    job = "".join(json.dumps({"text": f"line {k}: the warm worker"}) + "\n" for k in range(64))
    return _timed_drop(model, config, {"job.jsonl": job}, idle)


def _timed_drop(model: Path, config: str, files: dict[str, str], idle: float) -> float:
    """Seconds from renaming ``files`` into an idle daemon's inbox to all of them in queue/done/."""
    with tempfile.TemporaryDirectory(prefix="tb-bench-warm-") as tmp:
        home = Path(tmp) / "home"
        home.mkdir()
        (home / "trainbox.toml").write_text(config)
        shutil.copytree(model, home / "cache" / "embedded-model")
        staged = Path(tmp) / "staged"
        staged.mkdir()
        for name, text in files.items():
            (staged / name).write_text(text)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
        daemon = subprocess.Popen(
            [sys.executable, "-m", "cli", "daemon", "--home", str(home)],
            env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            _wait(lambda: _state(home) == "idle", 120, "the daemon to start")
            time.sleep(idle)
            t0 = time.monotonic()
            for name in files:
                os.rename(staged / name, home / "inbox" / name)
            _wait(lambda: _finished(home) >= len(files), 900, "the jobs done")
            if failed := list((home / "queue" / "failed").glob("*.jsonl")):
                raise SystemExit(f"a job failed: {failed[0].name} (see its .error.json)")
            return time.monotonic() - t0
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(120)


def _finished(home: Path) -> int:
    return sum(len(list((home / "queue" / q).glob("*.jsonl"))) for q in ("done", "failed"))


def examples_drop_to_done(model: Path, variant: dict[str, str], idle: float) -> float:
    files = {p.name: p.read_text(encoding="utf-8") for p in sorted((ROOT / "examples").glob("*.jsonl"))}
    return _timed_drop(model, EXAMPLES_CONFIG.format(**variant), files, idle)


def _runs(times: list[float]) -> str:
    return ", ".join(f"{t:.1f}" for t in times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--idle", type=float, default=20.0, help="seconds the daemon idles before the drop")
    parser.add_argument("--write", action="store_true", help="append the result to docs/BENCHMARKS.md")
    parser.add_argument("--examples", action="store_true", help="the README's three examples, before vs after")
    args = parser.parse_args()
    from core.embedded import ensure_embedded_model

    if args.examples:
        return examples_main(args.rounds, args.idle, args.write)

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


def examples_main(rounds: int, idle: float, write: bool) -> None:
    from core.embedded import ensure_embedded_model

    with tempfile.TemporaryDirectory(prefix="tb-bench-model-") as tmp:
        model = ensure_embedded_model(Path(tmp) / "model")
        times: dict[str, list[float]] = {"before": [], "after": []}
        for r in range(rounds):
            order = ("before", "after") if r % 2 == 0 else ("after", "before")
            for name in order:
                times[name].append(examples_drop_to_done(model, BEFORE if name == "before" else AFTER, idle))
                print(f"{name}: {times[name][-1]:.1f} s", flush=True)
    before, after = statistics.median(times["before"]), statistics.median(times["after"])
    print(json.dumps({"before_s": times["before"], "after_s": times["after"], "ratio": round(before / after, 2)}))
    if write:
        lines = [
            "",
            f"### Drop to done, the README's three examples ({time.strftime('%Y-%m-%d')}, {platform.machine()}, "
            f"{os.cpu_count()} cores, CPU, default training settings, daemon idle {idle:.0f} s first)",
            "",
            f"`OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_warm_worker.py --examples --rounds {rounds} "
            f"--idle {idle:g}`: examples/*.jsonl renamed together into the inbox of a real idle daemon, timed until "
            "all three sit in queue/done/; the variants alternate (order rotated each round) in one run.",
            "",
            "| variant | runs (s) | median | speed-up |",
            "| --- | --- | ---: | ---: |",
            f"| before issue 15 (warm_worker = false, compile = false) | {_runs(times['before'])} | {before:.1f} s "
            "| 1.00x |",
            f"| defaults (warm worker, compile auto) | {_runs(times['after'])} | {after:.1f} s "
            f"| {before / after:.2f}x |",
            "",
        ]
        with open(ROOT / "docs" / "BENCHMARKS.md", "a", encoding="utf-8") as f:
            f.write("\n".join(lines))


if __name__ == "__main__":
    main()
