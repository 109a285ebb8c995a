"""Fleet throughput (issue 18): a queue of small jobs over several lineages, trained by one daemon and by
two daemons sharing one PostgreSQL database and one storage folder (``[fleet] enabled``), side by side in
one run, rounds alternating the order; and the cost of a claim.

Each side: fresh homes (the embedded tiny model copied in), a throwaway PostgreSQL server from the
distribution's binaries (``tests/postgres.py``), ``--jobs`` small files spread over ``--lineages`` lineages
dropped at once into the shared inbox, timed from the drop until every file sits in ``queue/done/``
(admission, claims, workers, training, versions and their gates). Jobs per hour and the ratio against one
daemon are printed, with linear scaling being the number of daemons. One CPU thread per worker.

The claim cost: ``claim_job`` and ``release`` timed in this process against a database holding
``--claim-jobs`` queued jobs in ``--lineages`` lineages (the SQL a daemon runs per job, without the files).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_fleet.py --rounds 2 --write
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

CONFIG = """
[daemon]
poll_interval = 0.2
settle_seconds = 0.5
warm_worker = false

[training]
max_steps = {steps}
eval_every = 100
checkpoint_every = 100
batch_size = 8
max_length = 64
threads = 1

[db]
url = "{db_url}"

[storage]
shared = "{shared}"

[fleet]
enabled = true
host = "{host}"
heartbeat_seconds = 1
"""
SECTION = "## Fleet throughput: one daemon against two on one PostgreSQL (issue 18)"


def _wait(cond: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise SystemExit(f"timed out waiting for {what}")


def queue_time(model: Path, daemons: int, jobs: int, lineages: int, steps: int) -> float:
    """Seconds from dropping ``jobs`` files until all are done, with ``daemons`` fleet daemons."""
    from tests.postgres import start_server

    server = start_server()
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
        try:
            db_url = str(server.create_database())
            shared = Path(tmp) / "shared"
            for i in range(daemons):
                home = Path(tmp) / f"host-{i}"
                (home / "cache").mkdir(parents=True)
                shutil.copytree(model, home / "cache" / "embedded-model")
                config = CONFIG.format(steps=steps, db_url=db_url, shared=shared, host=f"h{i}")
                (home / "trainbox.toml").write_text(config)
                log = open(home / "daemon.log", "ab")  # noqa: SIM115 - closed with the process
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "cli", "daemon", "--home", str(home)],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        cwd=ROOT,
                        start_new_session=True,
                    )
                )
            done = shared / "queue" / "done"
            _wait(
                lambda: all((Path(tmp) / f"host-{i}" / "status" / "daemon.json").exists() for i in range(daemons)),
                120,
                "daemons up",
            )
            names = [f"l{j % lineages}" for j in range(jobs)]
            for lin in set(names):
                (shared / "inbox" / lin).mkdir(parents=True, exist_ok=True)
            t0 = time.monotonic()
            for j, lin in enumerate(names):
                tmpfile = shared / "inbox" / lin / f".job{j}.part"
                tmpfile.write_text("".join(f'{{"text": "job {j} line {k} of lineage {lin}"}}\n' for k in range(40)))
                tmpfile.rename(shared / "inbox" / lin / f"job{j}.jsonl")
            _wait(lambda: len(list(done.glob("*.jsonl"))) == jobs, 3600, f"{jobs} jobs done")
            return time.monotonic() - t0
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                try:
                    p.wait(60)
                except subprocess.TimeoutExpired:
                    p.kill()
            server.stop()


def claim_cost(jobs: int, lineages: int) -> tuple[float, float]:
    """Median milliseconds of one ``claim_job`` and of one ``release``, on a DB with ``jobs`` queued jobs."""
    from management.db import Job, ModelDB
    from management.leases import claim_job, release
    from tests.postgres import start_server

    server = start_server()
    try:
        db = ModelDB(str(server.create_database()))
        with db.session() as s:
            s.add_all(
                Job(name=f"j{i}", lineage=f"l{i % lineages}", state="queued", admitted_at=float(i)) for i in range(jobs)
            )
        claims, releases = [], []
        for _ in range(min(jobs, 200)):
            t0 = time.perf_counter()
            c = claim_job(db, "bench", ttl=30)
            t1 = time.perf_counter()
            assert c is not None
            with db.session() as s:
                row = s.get(Job, c.job_id)
                assert row is not None
                row.state = "done"
            t2 = time.perf_counter()
            release(db, c.lease)
            t3 = time.perf_counter()
            claims.append((t1 - t0) * 1000)
            releases.append((t3 - t2) * 1000)
        db.close()
        return statistics.median(claims), statistics.median(releases)
    finally:
        server.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--jobs", type=int, default=12)
    ap.add_argument("--lineages", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--daemons", type=int, default=2)
    ap.add_argument("--claim-jobs", type=int, default=2000)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    from core.embedded import ensure_embedded_model

    with tempfile.TemporaryDirectory(prefix="bench-fleet-model-") as tmp:
        model = ensure_embedded_model(Path(tmp) / "model")
        times: dict[int, list[float]] = {1: [], args.daemons: []}
        for r in range(args.rounds):
            order = [1, args.daemons] if r % 2 == 0 else [args.daemons, 1]
            for n in order:
                t = queue_time(model, n, args.jobs, args.lineages, args.steps)
                times[n].append(t)
                print(f"round {r} daemons {n}: {t:.1f} s, {args.jobs / t * 3600:.0f} jobs/hour", flush=True)
    claim_ms, release_ms = claim_cost(args.claim_jobs, args.lineages)
    one, many = statistics.median(times[1]), statistics.median(times[args.daemons])
    ratios = [a / b for a, b in zip(times[1], times[args.daemons], strict=True)]
    lines = [
        SECTION,
        "",
        f"Measured {time.strftime('%Y-%m-%d')} on {platform.machine()}, {os.cpu_count()} cores, CPU, one thread per "
        f"worker; {args.jobs} jobs of 40 lines over {args.lineages} lineages, {args.steps} steps each, the embedded "
        f"tiny model; {args.rounds} rounds alternating the order; PostgreSQL from the distribution's binaries.",
        f"Command: `OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_fleet.py --rounds {args.rounds} "
        f"--jobs {args.jobs} --lineages {args.lineages} --steps {args.steps} --write`",
        "",
        "| daemons | drop to all done (median) | per round | jobs/hour | speed-up | of linear |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| 1 | {one:.1f} s | {', '.join(f'{t:.1f}' for t in times[1])} | {args.jobs / one * 3600:.0f} | 1.00x | |",
        f"| {args.daemons} | {many:.1f} s | {', '.join(f'{t:.1f}' for t in times[args.daemons])} | "
        f"{args.jobs / many * 3600:.0f} | {statistics.median(ratios):.2f}x (per round "
        f"{', '.join(f'{x:.2f}' for x in ratios)}) | {statistics.median(ratios) / args.daemons:.0%} |",
        "",
        f"Claim cost (in one process, {args.claim_jobs} queued jobs in {args.lineages} lineages): `claim_job` "
        f"{claim_ms:.1f} ms, `release` {release_ms:.1f} ms (medians of 200).",
    ]
    text = "\n".join(lines)
    print(text)
    if args.write:
        path = ROOT / "docs" / "BENCHMARKS.md"
        doc = path.read_text()
        if SECTION in doc:
            start = doc.index(SECTION)
            end = doc.find("\n## ", start + len(SECTION))
            doc = doc[:start] + text + "\n" + (doc[end:] if end != -1 else "")
        else:
            doc = doc.rstrip("\n") + "\n\n" + text + "\n"
        path.write_text(doc)


if __name__ == "__main__":
    main()
