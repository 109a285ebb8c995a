"""p50/p99 latency of ``GET /api/status`` with 50 concurrent clients, written to docs/BENCHMARKS.md.

Against a running server (``--url``, 127.0.0.1 only) or, by default, one it starts itself on a
temporary home where a real daemon is training a real job (the embedded tiny model, one CPU thread),
so the server reads status files and metrics that a worker is really writing. ``--simulated``
instead populates the home as a daemon leaves it mid-run and rewrites the files from a thread.
Bounded: ``--requests`` per client, and ``--duration`` seconds at most.

    .venv/bin/python scripts/bench_status.py [--url http://127.0.0.1:8377] [--clients 50]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TQDM_DISABLE", "1")  # the embedded model's build would draw progress bars
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from tests.e2e_helpers import DaemonProc, make_home, wait_for, write_jsonl  # noqa: E402
from tests.monitoring_helpers import ServerProc, append_metrics, populate, write_daemon_status, write_training_status  # noqa: E402
from trainbox.home import Home  # noqa: E402

BENCH_MD = ROOT / "docs" / "BENCHMARKS.md"
SECTION = "## Status server: /api/status latency"


def quantile(sorted_ms: list[float], q: float) -> float:
    return sorted_ms[min(len(sorted_ms) - 1, int(q * len(sorted_ms)))]


async def client(
    c: httpx.AsyncClient, path: str, n: int, rate: float, deadline: float, out: list[float], errors: list[str]
) -> None:
    """``n`` requests, back to back (rate 0) or ``rate`` per second on a fixed schedule (as a page polls)."""
    period = 1 / rate if rate > 0 else 0.0
    next_at = time.monotonic() + random.uniform(0, period)
    for _ in range(n):
        if period:
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            next_at += period
        if time.monotonic() > deadline:
            return
        t0 = time.perf_counter()
        try:
            r = await c.get(path)
            r.raise_for_status()
        except httpx.HTTPError as e:
            errors.append(str(e))
            continue
        out.append((time.perf_counter() - t0) * 1000)


async def run(
    url: str, path: str, clients: int, requests: int, rate: float, duration: float
) -> tuple[list[float], list[str], float]:
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=10) as c:
        await asyncio.gather(*(c.get(path) for _ in range(clients)))  # warm up: open every connection
        out: list[float] = []
        errors: list[str] = []
        deadline = time.monotonic() + duration
        t0 = time.perf_counter()
        await asyncio.gather(*(client(c, path, requests, rate, deadline, out, errors) for _ in range(clients)))
        return out, errors, time.perf_counter() - t0


def simulate_training(home: Home, stop: threading.Event) -> None:
    """Rewrite the status files and append metric lines twice a second, as daemon and worker do."""
    step = 120
    while not stop.wait(0.5):
        append_metrics(home, step + 1, step + 5)
        step += 5
        write_training_status(home, step, total_steps=1_000_000)
        write_daemon_status(home)


def write_section(table: str, notes: str) -> None:
    BENCH_MD.parent.mkdir(parents=True, exist_ok=True)
    text = BENCH_MD.read_text(encoding="utf-8") if BENCH_MD.exists() else "# Benchmarks\n"
    section = f"{SECTION}\n\n{notes}\n\n{table}\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(section + "\n", text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section
    BENCH_MD.write_text(text.rstrip("\n") + "\n", encoding="utf-8")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", help="a running server (default: start one on a temporary populated home)")
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--requests", type=int, default=100, help="requests per client")
    p.add_argument("--rate", type=float, default=2.0, help="requests/s per client (0: back to back, saturation)")
    p.add_argument("--duration", type=float, default=30.0, help="stop after this many seconds regardless")
    p.add_argument("--path", default="/api/status")
    p.add_argument("--no-write", action="store_true", help="print only; leave docs/BENCHMARKS.md alone")
    p.add_argument("--simulated", action="store_true", help="no real daemon: rewrite status files from a thread")
    args = p.parse_args()

    srv = None
    daemon: DaemonProc | None = None
    stop = threading.Event()
    tmp = None
    if args.url:
        if urlparse(args.url).hostname not in ("127.0.0.1", "localhost", "::1"):
            p.error("only a server on this machine (127.0.0.1) may be benchmarked")
        url = args.url.rstrip("/")
        setting = f"a running server at {url}"
    elif args.simulated:
        tmp = tempfile.TemporaryDirectory(prefix="trainbox-bench-")
        home = Home(Path(tmp.name))
        populate(home)
        srv = ServerProc(home)
        url = srv.url
        threading.Thread(target=simulate_training, args=(home, stop), daemon=True).start()
        setting = "its own server on a populated temporary home, status files rewritten twice a second"
    else:
        from core.embedded import ensure_embedded_model

        tmp = tempfile.TemporaryDirectory(prefix="trainbox-bench-")
        base = Path(tmp.name)
        home = make_home(base / "home", ensure_embedded_model(base / "embedded"), max_steps=1_000_000)
        daemon = DaemonProc(home)
        write_jsonl(home.inbox / "bench.jsonl", [{"text": f"the fox runs to the river {i % 13}"} for i in range(400)])
        srv = ServerProc(home)
        url = srv.url
        wait_for(lambda: (daemon.status()["current_job"] or {}).get("step", 0) >= 20, 120, "the job training")
        setting = "its own server beside a real daemon training a job (embedded model, 1 worker thread)"
    try:
        lat, errors, wall = asyncio.run(run(url, args.path, args.clients, args.requests, args.rate, args.duration))
    finally:
        stop.set()
        if srv is not None:
            srv.stop()
        if daemon is not None:
            daemon.stop()
        if tmp is not None:
            tmp.cleanup()
    if not lat:
        print(f"no successful requests; errors: {errors[:3]}", file=sys.stderr)
        return 1
    lat.sort()
    rows = [
        ("clients", f"{args.clients}, each {'back to back' if args.rate <= 0 else f'{args.rate:g} req/s'}"),
        ("requests", f"{len(lat)} ok, {len(errors)} failed, in {wall:.1f} s ({len(lat) / wall:.0f} req/s)"),
        ("p50", f"{quantile(lat, 0.50):.2f} ms"),
        ("p90", f"{quantile(lat, 0.90):.2f} ms"),
        ("p99", f"{quantile(lat, 0.99):.2f} ms"),
        ("max", f"{lat[-1]:.2f} ms"),
        ("mean", f"{statistics.fmean(lat):.2f} ms"),
    ]
    table = "| measure | value |\n| --- | --- |\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    print(f"GET {args.path}, {setting}")
    print(table)
    if not args.no_write:
        notes = (
            f"`python scripts/bench_status.py` ({time.strftime('%Y-%m-%d')}): GET {args.path}, {args.clients} "
            f"concurrent clients (httpx async, keep-alive; `--rate {args.rate:g}` requests/s each, 0 = back to back), "
            f"{setting}. Latency is measured by the client, so it "
            "includes the client's own event loop; the goal is p99 under 20 ms."
        )
        write_section(table, notes)
        print(f"written to {BENCH_MD.relative_to(ROOT)}")
    return 0 if not errors else 1


if __name__ == "__main__":
    sys.exit(main())
