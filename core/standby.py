"""The warm worker: a worker process started before its job, so a job does not wait for the imports.

``python -m core.standby [--warm-model DIR]``. A worker's cold start (Python, torch, transformers and
the model's code imported) takes 5-20 s on these machines, most of a small job's time from drop to
done. The daemon therefore keeps one worker started ahead (daemon/standby.py): it imports everything,
then blocks reading one line on stdin. When a job is dispatched the daemon records the run (this
pid) and writes the run folder's path on that line; from then on the process is exactly
``python -m core.worker --run-dir DIR`` (its output moved to ``DIR/worker.log`` after the usual start
line). Until it has a job it dies with the daemon (the kernel's parent-death signal, set before the
slow imports), so a daemon killed with -9 leaves no idle standby behind; with a job it outlives the
daemon like any worker (the next daemon finds it through its run). It never initialises CUDA before
its job, so a waiting standby holds no GPU memory.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import TextIO

from trainbox.jobspec import WORKER_LOG

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(sig: int) -> None:
    """Ask the kernel to send ``sig`` when the parent exits (0: stop asking). Linux only; elsewhere the
    standby still exits at the end of its input, after its imports."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)


def warm_model_code(model_dir: Path | None) -> None:
    """Import the modelling code of the model the next job most likely loads (the embedded default),
    so loading it later costs no import. Best effort: a job with another model imports its own."""
    if model_dir is None:
        return
    try:
        model_type = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))["model_type"]
        importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    except Exception as e:  # boundary: warming is an optimisation, never a failure
        print(f"standby: model code not pre-imported ({e})", file=sys.stderr)


def wait_for_job(stream: TextIO | None = None) -> Path | None:
    """Block until the daemon assigns a run folder; None at end of input (no job is coming)."""
    line = (stream or sys.stdin).readline().strip()
    return Path(line) if line else None


def redirect_output(log_path: Path, run_dir: Path) -> None:
    """Point stdout and stderr at the run's log, after the start line a cold worker's spawn writes
    (crash reports read only what follows the last ``--- worker start`` line)."""
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        head = f"\n--- worker start {time.strftime('%Y-%m-%d %H:%M:%S')}: warm worker pid {os.getpid()}"
        os.write(fd, f"{head} --run-dir {run_dir} ---\n".encode())
        os.dup2(fd, 1)
        os.dup2(fd, 2)
    finally:
        os.close(fd)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m core.standby", description="A trainbox worker started ahead.")
    parser.add_argument("--warm-model", type=Path, help="a model folder whose modelling code to import")
    args = parser.parse_args(argv)
    parent = os.getppid()
    die_with_parent(signal.SIGKILL)
    if os.getppid() != parent:  # the daemon died before the request took effect
        return 0
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # no job yet: a stop needs no checkpoint
    from core import worker  # the slow part, done before any job exists

    warm_model_code(args.warm_model)
    run_dir = wait_for_job()
    if run_dir is None:
        return 0  # the daemon stopped before any job came: nothing was touched
    die_with_parent(0)  # from here on a worker: it outlives its daemon, which the next one finds
    redirect_output(run_dir / WORKER_LOG, run_dir)
    return worker.main(["--run-dir", str(run_dir)])


if __name__ == "__main__":
    sys.exit(main())
