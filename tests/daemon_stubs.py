"""Stand-ins for the daemon's children, so ``Daemon.tick`` is tested without torch (STYLE 14).

``python tests/daemon_stubs.py worker RUN_DIR``: a worker that does what ``<home>/stub-plan.json``
says for its job's name, one entry per start (``{"a.jsonl": ["crash", "complete"]}``; none left or no
entry: complete), and appends ``<job name> <outcome>`` to ``<home>/stub-starts.txt``:
- ``complete``: a tiny "model" folder and a completed result.json, exit 0;
- ``crash``: a failed result (class crash: retried with back-off), exit 1;
- ``wait``: runs until SIGTERM (pause, cancel, stop), then an interrupted result, exit 75;
- ``linger``: the same, but exits 0.5 s after the first SIGTERM (a checkpoint takes a while);
- ``sigkill``: kills itself with SIGKILL, as someone's ``kill -9`` would (nothing written).
Like the real worker it first takes its run folder's lock (``trainbox/run_lock.py``): when another
process holds it, it exits ``EXIT_LOCKED`` at once and writes nothing. Every SIGTERM it gets appends
``<job name> SIGTERM`` to ``<home>/stub-signals.txt``.
``evaluate(argv)``: the eval gate's main, served by the daemon's kept gate child (``EVALUATE_ENTRY``);
waits while ``<home>/stub-gate-hold`` exists (found from ``--out``), then scores every ``--model`` 1.0.
``report_dies`` and ``report_hangs``: job report mains that exit the child and never return.
Only the standard library: each starts in milliseconds.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

STUB = Path(__file__).resolve()
sys.path.insert(0, str(STUB.parents[1]))  # run as a script: the repository's packages

from trainbox import run_lock  # noqa: E402  (after the path it comes from)
from trainbox.states import EXIT_LOCKED  # noqa: E402

if TYPE_CHECKING:
    from daemon.main import Daemon
    from trainbox.config import Settings
    from trainbox.home import Home


def worker_command(run_dir: Path, nproc: int) -> list[str]:
    """The ``Daemon(worker_command=...)`` seam; ``--run-dir`` as the real worker's argv names it."""
    return [sys.executable, str(STUB), "worker", "--run-dir", str(run_dir)]


EVALUATE_ENTRY = "tests.daemon_stubs:evaluate"  # what the daemon's kept gate child serves (``evaluate``)


def tick_until(d: Daemon, cond: Callable[[], object], what: str, timeout: float = 20.0) -> None:
    """Tick an in-process daemon until ``cond`` holds; fail naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        d.tick(time.time())
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def daemon_factory(home: Home, default: Settings, db_url: str = "") -> Iterator[Callable[..., Daemon]]:
    """For a fixture: ``make(settings=None)`` starts an in-process Daemon on ``home`` with the stub worker
    and gate (``default`` settings unless given; ``db_url``, if any, as its ``[db] url``); every daemon made
    is shut down afterwards."""
    from daemon.main import Daemon

    made: list[Daemon] = []

    def make(settings: Settings | None = None) -> Daemon:
        chosen = settings or default
        if db_url:
            chosen = chosen.model_copy(update={"db": chosen.db.model_copy(update={"url": db_url})})
        d = Daemon(home, chosen, worker_command=worker_command, evaluate_entry=EVALUATE_ENTRY)
        d.start()
        made.append(d)
        return d

    yield make
    for d in made:
        if not d.finished:
            d.shutdown()


def _write(path: Path, data: dict[str, object]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


def worker(run_dir: Path) -> int:
    try:
        lock = run_lock.acquire(run_dir)  # noqa: F841  (held until the process ends)
    except run_lock.RunLockHeld as e:
        print(e, file=sys.stderr)
        return EXIT_LOCKED
    stop: list[int] = []
    home = run_dir.parent.parent
    name = json.loads((run_dir / "job.json").read_text())["job_name"]

    def on_term(signum: int, frame: object) -> None:
        stop.append(signum)
        with open(home / "stub-signals.txt", "a") as f:
            f.write(f"{name} SIGTERM\n")

    signal.signal(signal.SIGTERM, on_term)
    plan_file = home / "stub-plan.json"
    plan = json.loads(plan_file.read_text()) if plan_file.exists() else {}
    steps = plan.get(name) or ["complete"]
    outcome = steps.pop(0)
    plan[name] = steps
    _write(plan_file, plan)
    with open(home / "stub-starts.txt", "a") as f:
        f.write(f"{name} {outcome}\n")
    if outcome == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    if outcome == "crash":
        _write(run_dir / "result.json", {"outcome": "failed", "failure_class": "crash", "message": "stub crash"})
        return 1
    if outcome in ("wait", "linger"):
        deadline = time.monotonic() + 60
        while not stop and time.monotonic() < deadline:
            time.sleep(0.02)
        if outcome == "linger":
            time.sleep(0.5)
        _write(run_dir / "result.json", {"outcome": "interrupted", "step": 1, "total_steps": 3})
        return 75
    final = run_dir / "final"
    final.mkdir(exist_ok=True)
    (final / "config.json").write_text("{}")
    (final / "model.safetensors").write_bytes(b"w")
    result = {"outcome": "completed", "step": 3, "total_steps": 3, "final_model": str(final), "val_loss": 1.0}
    _write(run_dir / "result.json", result)
    return 0


def evaluate(argv: list[str]) -> int:
    out = Path(argv[argv.index("--out") + 1])
    hold = out.parent.parent.parent / "stub-gate-hold"
    deadline = time.monotonic() + 60
    while hold.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    models = [argv[i + 1] for i, a in enumerate(argv) if a == "--model"]
    _write(out, {"losses": {m: 1.0 for m in models}, "examples": 1, "eval_set": "stub"})
    return 0


def report_dies(argv: list[str]) -> int:
    os._exit(3)  # the whole kept child, as a crash would


def report_hangs(argv: list[str]) -> int:
    time.sleep(60)
    return 0


if __name__ == "__main__":
    sys.exit(worker(Path(sys.argv[3])))
