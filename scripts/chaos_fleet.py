"""The fleet's chaos acceptance (issue 18): ``--jobs`` files over ``--lineages`` lineages trained by ``--hosts``
real daemons on one PostgreSQL database and one shared folder (``[fleet] enabled``), the real worker on the
tiny model, while ``--kills`` random SIGKILLs land (seeded): either a host dies (its daemon and its worker)
and comes back after a while, or a daemon dies alone and is restarted at once (what systemd does). Then
the fleet is checked:
- every file in ``done/`` exactly once, nothing in the queues, ``failed/`` or the inbox;
- one version per job, each lineage one chain (every version's parent the lineage's version before);
- every job's metrics hold each step once (nothing trained twice across hosts);
- each job's runs name the hosts that trained it; the kills and the claims that resumed a job are counted.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/chaos_fleet.py --jobs 20 --lineages 4 --hosts 3 --kills 5
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from management.db import ModelDB  # noqa: E402
from tests.e2e_helpers import DaemonProc, fleet_home, metrics, wait_for, write_jsonl  # noqa: E402
from tests.postgres import start_server  # noqa: E402
from tests.test_fleet_chaos import SLOW, STEPS, training_worker  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=20)
    ap.add_argument("--lineages", type=int, default=4)
    ap.add_argument("--hosts", type=int, default=3)
    ap.add_argument("--kills", type=int, default=5)
    ap.add_argument("--seed", type=int, default=20261202)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    from core.embedded import ensure_embedded_model

    rng = random.Random(args.seed)
    server = start_server()
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="chaos-fleet-") as tmp:
        root = Path(tmp)
        embedded = ensure_embedded_model(root / "embedded")
        db_url = str(server.create_database())
        shared = root / "nfs"
        names = [chr(ord("a") + i) for i in range(args.hosts)]
        homes = {h: fleet_home(root / f"host-{h}", shared, embedded, db_url, h, STEPS) for h in names}
        storage = homes[names[0]]
        storage.ensure()
        lineages = ["main"] + [f"l{i}" for i in range(1, args.lineages)]
        for lineage in lineages[1:]:
            (storage.inbox / lineage).mkdir(parents=True, exist_ok=True)
        daemons = {h: DaemonProc(home, env=SLOW) for h, home in homes.items()}
        files = []
        for j in range(args.jobs):
            lineage = lineages[j % len(lineages)]
            folder = storage.inbox if lineage == "main" else storage.inbox / lineage
            name = f"job{j:02d}-{lineage}"
            write_jsonl(folder / f"{name}.jsonl", [{"text": f"{name} says {k % 7} things"} for k in range(40)])
            files.append(name)
        kills: list[dict[str, object]] = []
        down: dict[str, float] = {}  # host -> when it comes back
        try:
            while len(kills) < args.kills:
                for h, back in list(down.items()):  # dead hosts come back
                    if time.monotonic() >= back:
                        daemons[h] = DaemonProc(homes[h], env=SLOW)
                        del down[h]
                up = [h for h in names if h not in down]
                victim = wait_for(
                    lambda up=up: next((h for h in up if training_worker(homes[h])), None), 300, "a host training"
                )
                time.sleep(rng.uniform(0.1, 1.0))
                worker = training_worker(homes[victim])
                dies = rng.random() < 0.5 and len(down) < args.hosts - 1 and worker is not None
                kind = "host" if dies else "daemon"
                daemons[victim].proc.send_signal(signal.SIGKILL)
                daemons[victim].proc.wait(10)
                daemons[victim].log.close()
                if kind == "host" and worker is not None:
                    os.kill(worker, signal.SIGKILL)  # the whole host: its worker dies with it
                    down[victim] = time.monotonic() + rng.uniform(2.0, 10.0)
                else:
                    daemons[victim] = DaemonProc(homes[victim], env=SLOW)
                done_now = len(list(storage.done.glob("*.jsonl")))
                kills.append(
                    {"kind": kind, "host": victim, "at_s": round(time.monotonic() - t_start, 1), "done": done_now}
                )
                print(f"kill {len(kills)}: {kind} {victim} ({done_now} jobs done)", flush=True)
                time.sleep(rng.uniform(3.0, 12.0))  # spread the kills over the run
            for h in list(down):
                daemons[h] = DaemonProc(homes[h], env=SLOW)
            wait_for(lambda: len(list(storage.done.glob("*.jsonl"))) == args.jobs, 3600, "every job done")
        finally:
            for d in daemons.values():
                if d.alive():
                    d.stop()
                elif not d.log.closed:
                    d.log.close()
        elapsed = time.monotonic() - t_start
        problems: list[str] = []
        filed = sorted(p.name.partition("__")[2] for p in storage.done.glob("*.jsonl"))
        if filed != sorted(f"{n}.jsonl" for n in files):
            problems.append(f"done/ holds {filed}")
        for folder in ("failed", "processing", "admitting", "high", "normal", "low"):
            if list((storage.queue / folder).glob("*.jsonl")):
                problems.append(f"files left in {folder}/")
        if [p for p in storage.inbox.rglob("*") if p.is_file()]:
            problems.append("files left in the inbox")
        db = ModelDB(db_url)
        jobs = db.jobs()
        if {j.state for j in jobs} != {"done"} or len(jobs) != args.jobs:
            problems.append(f"job states {sorted({j.state for j in jobs})}, {len(jobs)} jobs")
        versions = db.versions()
        if sorted(v.job_id for v in versions) != sorted(j.id for j in jobs):
            problems.append("not one version per job")
        for lineage in lineages:
            chain = db.versions(lineage=lineage)
            if [v.parent_id for v in chain[1:]] != [v.id for v in chain[:-1]] or (chain[:1] and chain[0].parent_id):
                problems.append(f"lineage {lineage} is not one chain: {[(v.id, v.parent_id) for v in chain]}")
        for job in jobs:
            steps = [m["step"] for m in metrics(storage.run_dir(job.id)) if m["kind"] == "train"]
            if steps != list(range(1, STEPS + 1)):
                problems.append(f"job {job.name}: steps {steps}")
        hosts_per_job = {j.name: sorted({r.host or "?" for r in db.runs(j.id)}) for j in jobs}
        resumed = sum(1 for e in db.events() if e.kind == "job_claimed" and (e.data or {}).get("resumed"))
        lost = sum(1 for e in db.events() if e.kind == "lease_lost")
        db.close()
        report = {
            "jobs": args.jobs,
            "lineages": args.lineages,
            "hosts": args.hosts,
            "kills": kills,
            "elapsed_s": round(elapsed, 1),
            "resumed_claims": resumed,
            "lease_lost": lost,
            "jobs_on_several_hosts": sum(1 for hs in hosts_per_job.values() if len(hs) > 1),
            "runs_per_host": {h: sum(h in hs for hs in hosts_per_job.values()) for h in names},
            "problems": problems,
        }
        print(json.dumps(report, indent=2))
        if args.json:
            args.json.write_text(json.dumps(report, indent=2))
    server.stop()
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
