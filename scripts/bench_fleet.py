"""Fleet throughput (issue 18): a queue of small jobs over several lineages, trained by one daemon and by
two daemons sharing one PostgreSQL database and one storage folder (``[fleet] enabled``), side by side in
one run, rounds alternating the order; and the cost of a claim.

Each side: fresh homes (the embedded tiny model copied in), a throwaway PostgreSQL server from the
distribution's binaries (``tests/postgres.py``), ``--jobs`` small files spread over ``--lineages`` lineages
dropped at once into the shared inbox, timed from the drop until every file sits in ``queue/done/``
(admission, claims, workers, training, versions and their gates). Jobs per hour and the ratio against one
daemon are printed, with linear scaling being the number of daemons. One CPU thread per worker.

The daemons run the product's defaults (``poll_interval`` 0.5 s, ``fleet.heartbeat_seconds`` 5 s) but two:
``settle_seconds`` 0.5 (the files are renamed into place, so they count as complete at once anyway; it only
bounds a missed event) and ``warm_worker`` off, each job paying a cold worker start (``--warm-worker``: on,
the default; without a GPU its standby starts only while no job trains). ``--cpu-report`` adds the CPU
seconds per job by process kind (daemons, workers, gates, reports, PostgreSQL, this process): unlike wall
time they do not depend on what else the machine runs, and they show what takes the cores from the workers.
``--core-per-daemon`` confines daemon i and everything it starts (workers, gates, reports; the CPU affinity
is inherited) to core i, as if each daemon were a host of one core: one daemon then cannot borrow the second
core for its gate, reports and standby worker while it trains. PostgreSQL and this process stay unconfined.

The claim cost: ``claim_job`` and ``release`` timed in this process against a database holding
``--claim-jobs`` queued jobs in ``--lineages`` lineages (the SQL a daemon runs per job, without the files).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_fleet.py --rounds 2 --write
    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_fleet.py --rounds 1 --cpu-report
    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_fleet.py --jobs 24 --rounds 4 --warm-worker --core-per-daemon
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

CONFIG = """
[daemon]
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
KINDS = ("daemon", "worker", "gate", "report", "other child", "postgres", "bench", "cpu sampler")


def kind_of(cmdline: list[str]) -> str:
    """A daemon's descendant, by the module it runs (trainbox/processes.py names them)."""
    argv = " ".join(cmdline)
    if "core.worker" in argv or "core.standby" in argv:
        return "worker"
    if "core.evaluate" in argv:
        return "gate"
    if "management.job_report" in argv:
        return "report"
    return "other child"


class CpuMeter:
    """CPU seconds (user + system) per process kind between ``start`` and ``stop``: every live process of
    the daemons' trees and of the PostgreSQL server is read every ``interval`` seconds and its last reading
    kept, so children that come and go are counted up to their last sample. What a child used after its
    last sample is not lost: a parent's ``children_*`` times grow by every child it reaps, exactly, so
    ``unsampled`` is that exact total of the children reaped in the window less what the samples saw of
    them. CPU seconds, unlike wall time, do not depend on what else the machine runs."""

    def __init__(self, daemons: list[int], postmaster: int | None, interval: float = 0.2) -> None:
        import psutil

        self.roots = {pid: psutil.Process(pid) for pid in [*daemons, *([postmaster] if postmaster else [])]}
        self.postmaster, self.interval = postmaster, interval
        self.first: dict[tuple[int, float], float] = {}  # (pid, create time): own CPU seconds at start
        self.last: dict[tuple[int, float], tuple[str, float]] = {}  # (pid, create time): kind, last reading
        self.reaped_at_start: dict[int, float] = {}
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.sampler_cpu = 0.0
        self.bench_at_start = 0.0

    def _sample(self) -> None:
        import psutil

        for root_pid, root in self.roots.items():
            root_kind = "postgres" if root_pid == self.postmaster else "daemon"
            try:
                child_kind = "postgres" if root_kind == "postgres" else ""  # else: by its command line
                procs = [(root, root_kind), *((p, child_kind) for p in root.children(recursive=True))]
            except psutil.Error:
                continue
            for p, kind in procs:
                try:
                    with p.oneshot():
                        t = p.cpu_times()
                        key = (p.pid, p.create_time())
                        if not kind:  # a child seen before its exec still runs the daemon's argv: look again
                            known = self.last.get(key)
                            kind = known[0] if known and known[0] != "other child" else kind_of(p.cmdline())
                    self.last[key] = (kind, t.user + t.system)
                except psutil.Error:
                    continue  # it exited between the listing and the reading

    def _reaped(self) -> dict[int, float]:
        out = {}
        for pid, root in self.roots.items():
            t = root.cpu_times()
            out[pid] = t.children_user + t.children_system
        return out

    def _run(self) -> None:
        t0 = time.thread_time()
        while not self.stop_event.wait(self.interval):
            self._sample()
        self.sampler_cpu = time.thread_time() - t0

    def start(self) -> None:
        self._sample()
        self.first = {k: v for k, (_, v) in self.last.items()}
        self.reaped_at_start = self._reaped()
        self.bench_at_start = _own_cpu()
        self.thread.start()

    def stop(self) -> dict[str, float]:
        """CPU seconds per kind in the window, ``unsampled`` included (see the class)."""
        self.stop_event.set()
        self.thread.join()
        bench = _own_cpu() - self.bench_at_start
        live = set()
        self._sample()
        import psutil

        for key in self.last:
            with contextlib.suppress(psutil.Error):
                if psutil.Process(key[0]).create_time() == key[1]:
                    live.add(key)
        per_kind = dict.fromkeys(KINDS, 0.0)
        seen_gone = 0.0  # the lifetime CPU the samples saw of the children reaped in the window
        for key, (kind, cpu) in self.last.items():
            per_kind[kind] += cpu - self.first.get(key, 0.0)
            if key not in live and key[0] not in self.roots:
                seen_gone += cpu
        reaped = sum(v - self.reaped_at_start[pid] for pid, v in self._reaped().items())
        per_kind["unsampled"] = max(0.0, reaped - seen_gone)
        per_kind["cpu sampler"] = self.sampler_cpu
        per_kind["bench"] = bench - self.sampler_cpu
        return per_kind


def _own_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


SECTION = "## Fleet throughput: one daemon against two on one PostgreSQL (issue 18)"


def _wait(cond: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise SystemExit(f"timed out waiting for {what}")


def queue_time(
    model: Path,
    daemons: int,
    jobs: int,
    lineages: int,
    steps: int,
    cpu_report: bool = False,
    warm: bool = False,
    core_each: bool = False,
) -> tuple[float, float, dict[str, float] | None]:
    """Seconds from dropping ``jobs`` files until all are done, and until every job's report is written too
    (reports run at the lowest CPU priority: where every core trains they are drawn in the gaps), with
    ``daemons`` fleet daemons; with ``cpu_report``, the CPU seconds per process kind until all are done
    (``CpuMeter``); with ``core_each``, daemon i and everything it starts confined to core i (a host of one
    core: the CPU affinity is inherited by its workers, gates and reports)."""
    from tests.e2e_helpers import FLEET_TOML
    from tests.postgres import start_server

    server = start_server()
    cores = os.cpu_count() or 1
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
        try:
            db_url = str(server.create_database())
            shared = Path(tmp) / "shared"
            for i in range(daemons):
                home = Path(tmp) / f"host-{i}"
                (home / "cache").mkdir(parents=True)
                shutil.copytree(model, home / "cache" / "embedded-model")
                config = CONFIG.format(steps=steps, warm=str(warm).lower())
                config += FLEET_TOML.format(db_url=db_url, shared=shared, host=f"h{i}")
                (home / "trainbox.toml").write_text(config)
                log = open(home / "daemon.log", "ab")  # noqa: SIM115 - closed with the process
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "cli", "daemon", "--home", str(home)],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        cwd=ROOT,
                        start_new_session=True,
                        preexec_fn=functools.partial(os.sched_setaffinity, 0, {i % cores}) if core_each else None,
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
            meter = None
            if cpu_report:
                postmaster = int((server.data / "postmaster.pid").read_text().split()[0])
                meter = CpuMeter([p.pid for p in procs], postmaster)
                meter.start()
            t0 = time.monotonic()
            for j, lin in enumerate(names):
                tmpfile = shared / "inbox" / lin / f".job{j}.part"
                tmpfile.write_text("".join(f'{{"text": "job {j} line {k} of lineage {lin}"}}\n' for k in range(40)))
                tmpfile.rename(shared / "inbox" / lin / f"job{j}.jsonl")
            _wait(lambda: len(list(done.glob("*.jsonl"))) == jobs, 3600, f"{jobs} jobs done")
            took = time.monotonic() - t0
            used = meter.stop() if meter is not None else None
            _wait(lambda: len(list(shared.glob("runs/*/report.md"))) == jobs, 3600, f"{jobs} reports written")
            return took, time.monotonic() - t0, used
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


def cpu_table(cpu: dict[int, list[dict[str, float]]], jobs: int, daemons: int) -> str:
    """CPU seconds per job by kind, summed over the rounds, for 1 and ``daemons`` daemons; and the split the
    scaling depends on: W, what one job's own chain runs (its worker, its gate), and P, everything else. With
    one daemon P runs on an otherwise idle core; with one daemon per core it takes the workers' time, so
    ``daemons`` daemons reach about daemons * W / (W + P) of one (P per job as measured with them)."""
    kinds = [*KINDS, "unsampled"]
    per_job = {n: {k: sum(r[k] for r in runs) / (jobs * len(runs)) for k in kinds} for n, runs in cpu.items()}
    rows = ["CPU seconds per job (user + system, drop to all done, over all rounds):", ""]
    rows.append(f"| kind | 1 daemon | {daemons} daemons |")
    rows.append("| --- | --- | --- |")
    for k in kinds:
        rows.append(f"| {k} | {per_job[1][k]:.2f} | {per_job[daemons][k]:.2f} |")
    rows.append(f"| total | {sum(per_job[1].values()):.2f} | {sum(per_job[daemons].values()):.2f} |")
    w = per_job[daemons]["worker"] + per_job[daemons]["gate"]
    side = sum(per_job[daemons].values()) - w - per_job[daemons]["cpu sampler"]  # a run without the meter
    if w > 0:
        rows += [
            "",
            f"With {daemons} daemons: W (worker + gate) {w:.2f} s, P (the rest but the sampler) {side:.2f} s per "
            f"job, P/W {side / w:.2f}; the model daemons * W / (W + P) gives {daemons * w / (w + side):.2f}x.",
        ]
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--jobs", type=int, default=12)
    ap.add_argument("--lineages", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--daemons", type=int, default=2)
    ap.add_argument("--claim-jobs", type=int, default=2000)
    ap.add_argument("--write", action="store_true")
    ap.add_argument(
        "--warm-worker",
        action="store_true",
        help="daemon.warm_worker as the product's default has it (on); off otherwise, each job a cold worker",
    )
    ap.add_argument(
        "--core-per-daemon",
        action="store_true",
        help="each daemon and all it starts on a core of its own (daemon i on core i), as one-core hosts would be; "
        "PostgreSQL and this process are not confined",
    )
    ap.add_argument(
        "--cpu-report",
        action="store_true",
        help="also print CPU seconds per job by process kind for each side (CpuMeter); the sampling costs the "
        "benchmark process some CPU of its own (shown as 'cpu sampler')",
    )
    args = ap.parse_args()
    from core.embedded import ensure_embedded_model

    with tempfile.TemporaryDirectory(prefix="bench-fleet-model-") as tmp:
        model = ensure_embedded_model(Path(tmp) / "model")
        times: dict[int, list[float]] = {1: [], args.daemons: []}
        reported: dict[int, list[float]] = {1: [], args.daemons: []}
        cpu: dict[int, list[dict[str, float]]] = {1: [], args.daemons: []}
        for r in range(args.rounds):
            order = [1, args.daemons] if r % 2 == 0 else [args.daemons, 1]
            for n in order:
                t, rep, used = queue_time(
                    model,
                    n,
                    args.jobs,
                    args.lineages,
                    args.steps,
                    args.cpu_report,
                    args.warm_worker,
                    args.core_per_daemon,
                )
                times[n].append(t)
                reported[n].append(rep)
                print(
                    f"round {r} daemons {n}: {t:.1f} s, {args.jobs / t * 3600:.0f} jobs/hour; reports {rep:.1f} s",
                    flush=True,
                )
                if used is not None:
                    cpu[n].append(used)
    if args.cpu_report:
        print(cpu_table(cpu, args.jobs, args.daemons))
    claim_ms, release_ms = claim_cost(args.claim_jobs, args.lineages)
    one, many = statistics.median(times[1]), statistics.median(times[args.daemons])
    ratios = [a / b for a, b in zip(times[1], times[args.daemons], strict=True)]
    rep_one, rep_many = statistics.median(reported[1]), statistics.median(reported[args.daemons])
    lines = [
        SECTION,
        "",
        f"Measured {time.strftime('%Y-%m-%d')} on {platform.machine()}, {os.cpu_count()} cores, CPU, one thread per "
        f"worker; {args.jobs} jobs of 40 lines over {args.lineages} lineages, {args.steps} steps each, the embedded "
        f"tiny model; {args.rounds} rounds alternating the order; PostgreSQL from the distribution's binaries.",
        f"Command: `OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_fleet.py --rounds {args.rounds} "
        f"--jobs {args.jobs} --lineages {args.lineages} --steps {args.steps}"
        f"{' --warm-worker' if args.warm_worker else ''}"
        f"{' --core-per-daemon' if args.core_per_daemon else ''} --write` "
        f"(warm worker {'on' if args.warm_worker else 'off'}"
        f"{'; each daemon and its children on a core of its own' if args.core_per_daemon else ''})",
        "",
        "| daemons | drop to all done (median) | per round | jobs/hour | speed-up | of linear | all reports written |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        f"| 1 | {one:.1f} s | {', '.join(f'{t:.1f}' for t in times[1])} | {args.jobs / one * 3600:.0f} | 1.00x | "
        f"| {rep_one:.1f} s |",
        f"| {args.daemons} | {many:.1f} s | {', '.join(f'{t:.1f}' for t in times[args.daemons])} | "
        f"{args.jobs / many * 3600:.0f} | {statistics.median(ratios):.2f}x (per round "
        f"{', '.join(f'{x:.2f}' for x in ratios)}) | {statistics.median(ratios) / args.daemons:.0%} | "
        f"{rep_many:.1f} s ({rep_one / rep_many:.2f}x) |",
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
