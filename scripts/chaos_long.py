"""The long chaos run of issue 14: N jobs of continual training, 100+ SIGKILLs aimed at the code's crash
points (trainbox/crashpoints.py) with the default ``daemon.max_retries``, the daemon restarted after each
death; then the lineage is checked: every job done, one chain of N versions (each version's parent the one
before, each gated once and promoted), ``models/current`` the last one (so it holds every job's training),
every run closed, no temp leftovers, and ``trainbox health`` exit 0 with the daemon running.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/chaos_long.py --jobs 30
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

from management.db import ModelDB  # noqa: E402
from management.versions import current_id  # noqa: E402
from trainbox import crashpoints  # noqa: E402
from trainbox.home import Home  # noqa: E402

CONFIG = """
[daemon]
poll_interval = 0.2
settle_seconds = 0.5
rescan_interval = 1.0
retry_backoff = 0
warm_worker = false  # each of 100+ daemon restarts would start a standby's imports for nothing

[training]
max_steps = 6
eval_every = 3
checkpoint_every = 2
batch_size = 8
max_length = 64
threads = 1
"""


def armed(jobs: int) -> dict[str, list[int]]:
    """Hits to kill, spread so that no job's worker is killed more often than ``max_retries`` allows
    (worker kills count as attempts; daemon kills do not)."""
    every_other = list(range(1, jobs + 1, 2))
    return {
        "admission.between_renames": list(range(1, jobs + 1)),
        "spawn.before_popen": list(range(1, 2 * jobs, 3)),
        "spawn.after_popen": list(range(3, jobs, 6)),
        "version.row_pending": every_other,  # odd jobs die before their folder is placed ...
        "version.renamed": list(range(1, jobs // 2 + 1, 2)),  # ... some even ones right after
        "gate.applied": list(range(2, jobs + 1, 2)),
        "filing.moved": every_other,
        "worker.checkpoint_saving": list(range(10, 3 * jobs, 20)),
        "worker.final_saving": list(range(5, jobs, 10)),
    }


def daemon(home: Path, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "cli", "daemon", "--home", str(home)],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=30)
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--check", type=Path, help="only check the home of an earlier run")
    args = parser.parse_args()
    if args.check:
        print(json.dumps(check(Home(args.check), args.jobs, 0.0), indent=2))
        return
    from core.embedded import ensure_embedded_model

    tmp = Path(tempfile.mkdtemp(prefix="tb-chaos-long-"))
    home = Home(tmp / "home").ensure()
    home.config_file.write_text(CONFIG)
    ensure_embedded_model(tmp / "model")
    shutil.copytree(tmp / "model", home.embedded_model)
    hits = tmp / "hits"
    hits.mkdir()
    plan = armed(args.jobs)
    spec = crashpoints.arming(plan)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", crashpoints.CRASH_ENV: spec}
    env[crashpoints.CRASH_DIR_ENV] = str(hits)
    log = tmp / "daemon.log"
    started = time.monotonic()
    proc = daemon(home.root, env, log)
    for i in range(args.jobs):
        (home.inbox / f"job{i:02d}.toml").write_text('priority = "normal"\n')
        rows = [{"text": f"job {i} line {k}: the {k % 3} owls of {i}"} for k in range(24)]
        (home.inbox / f"job{i:02d}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    restarts, other_exits = 0, []
    while len(list(home.done.glob("*.jsonl"))) + len(list(home.failed.glob("*.jsonl"))) < args.jobs:
        if time.monotonic() - started > args.timeout:
            raise SystemExit(f"timed out after {restarts} restarts: {crashpoints.fired(plan, hits)}")
        if proc.poll() is not None:
            if proc.returncode != -9:
                other_exits.append(proc.returncode)
            restarts += 1
            proc = daemon(home.root, env, log)
        time.sleep(0.05)
    proc.terminate()
    proc.wait(120)
    print(json.dumps(check(home, args.jobs, time.monotonic() - started) | {
        "kills": sum(crashpoints.fired(plan, hits).values()),
        "kills_by_point": crashpoints.fired(plan, hits),
        "daemon_restarts": restarts,
        "other_daemon_exits": other_exits,
    }, indent=2))  # fmt: skip


def service_health(home: Home) -> subprocess.CompletedProcess[bytes]:
    """The crash window is over: the whole service (``trainbox up``: daemon, watchdog, retention, status
    server) without armed kills, then ``trainbox health`` once every sibling has reported."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TRAINBOX_TEST_")}
    clean |= {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    up = subprocess.Popen([sys.executable, "-m", "cli", "up", "--home", str(home.root)], cwd=ROOT, env=clean,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while True:
            health = subprocess.run(
                [sys.executable, "-m", "cli", "health", "--home", str(home.root)],
                cwd=ROOT, env=clean, capture_output=True,
            )  # fmt: skip
            if health.returncode == 0 or time.monotonic() > deadline:
                return health
            time.sleep(2)
    finally:
        up.send_signal(signal.SIGINT)
        up.wait(120)


def check(home: Home, jobs_expected: int, elapsed: float) -> dict[str, object]:
    health = service_health(home)
    db = ModelDB(home.db_url)
    jobs = db.jobs()
    versions = sorted(db.versions(), key=lambda v: v.id)
    chain_ok = [v.parent_id for v in versions] == [None, *[v.id for v in versions[:-1]]]
    gated = [len(db.gates(v.id)) for v in versions]
    promoted = [bool(g and g[0].promoted) for g in (db.gates(v.id) for v in versions)]
    open_runs = sum(1 for j in jobs for r in db.runs(j.id) if r.ended_at is None)
    leftovers = [str(p) for p in [*home.runs.rglob(".tmp*"), *home.models.rglob(".tmp*")]]
    result = {
        "jobs": jobs_expected,
        "done": sum(1 for j in jobs if j.state == "done"),
        "failed": [j.name for j in jobs if j.state != "done"],
        "versions": len(versions),
        "one_chain": chain_ok,
        "gated_once": all(n == 1 for n in gated),
        "all_promoted": all(promoted),
        "current_is_last": bool(versions) and current_id(home) == versions[-1].id,
        "open_runs": open_runs,
        "temp_leftovers": leftovers,
        "health_rc": health.returncode,
        "health": health.stdout.decode(errors="replace").strip().splitlines()[-6:],
        "elapsed_s": round(elapsed, 1),
        "home": str(home.root),
    }
    db.close()
    return result


if __name__ == "__main__":
    main()
