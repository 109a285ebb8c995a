"""One process that runs a program's ``main(argv)`` for request after request: the daemon's kept children
(the eval gate's ``core.evaluate``, the job report's ``management.job_report``), ``daemon/served_child.py``
its other side. ``python -m trainbox.child_server MODULE:FUNCTION --home H``.

Why: on a CPU box a gate's evaluation of two small models takes a fraction of a second and a report's
drawing about a third of one, but a fresh child per request first paid Python's start and its imports:
torch and transformers for the gate (about 2.5 CPU s), SQLAlchemy, pydantic and matplotlib for the report
(about 1 s), every job. Where every core trains (a fleet of small jobs, one daemon per core) that CPU
came out of training (docs/BENCHMARKS.md, fleet throughput). Kept, a child pays its imports once.

The protocol, one request at a time:
- a request is one JSON line on stdin: ``{"argv": [...], "log": PATH, "label": "gate"}``;
- while it runs, fds 1 and 2 are appended to ``log`` after a ``--- <label> start`` line (with this pid), so
  everything the request printed, a traceback included, is in that job's own log, as when each had a child;
  between requests they are the daemon's stderr;
- the answer is one JSON line ``{"rc": N, "last": false}`` on the reply pipe (the fd 1 it started with):
  what ``main`` returned or exited with, 1 for an exception (its traceback in the log);
- a request that initialised CUDA ends the child after its answer (``"last": true``): a kept CUDA context
  would hold GPU memory the next job's worker needs (the reason each worker is a fresh process), so on a GPU
  host each gate still gets a child of its own;
- the end of stdin (the daemon closed it, or died) ends the child; ``--home`` only names it (a daemon at its
  start finds a child a killed daemon left by its argv).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

MainFn = Callable[[list[str]], Any]


def load(entry: str) -> MainFn:
    """``package.module:function`` (default function ``main``) imported."""
    module, _, name = entry.partition(":")
    fn = getattr(importlib.import_module(module), name or "main")
    if not callable(fn):
        raise TypeError(f"{entry} is not callable")
    return fn  # type: ignore[no-any-return]


def call(fn: MainFn, argv: list[str]) -> int:
    """What a process running ``fn(argv)`` would exit with."""
    try:
        rc = fn(argv)
    except SystemExit as e:  # argparse's errors, sys.exit(n)
        code = e.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except Exception:  # boundary: one request's failure is its own; the child serves the next
        traceback.print_exc()
        return 1
    return rc if isinstance(rc, int) else 0


@contextlib.contextmanager
def output_to(path: Path, label: str) -> Iterator[None]:
    """fds 1 and 2 appended to ``path`` for the block (C-level output and tracebacks too), then put back."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "ab") as out:
        when = time.strftime("%Y-%m-%d %H:%M:%S")
        out.write(f"\n--- {label} start {when} (kept child pid {os.getpid()}) ---\n".encode())
        out.flush()
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def cuda_used() -> bool:
    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_initialized())


def serve(fn: MainFn, requests: IO[str], reply: IO[str]) -> int:
    """Answer requests until stdin ends (or one used CUDA); returns how many were answered."""
    served = 0
    for line in requests:
        try:
            request = json.loads(line)
            argv, log, label = [str(a) for a in request["argv"]], Path(request["log"]), str(request.get("label", ""))
        except (ValueError, KeyError, TypeError) as e:
            print(f"kept child: ignoring a request that is not one ({e}): {line[:200]!r}", file=sys.stderr)
            continue
        with output_to(log, label or "request"):
            rc = call(fn, argv)
        last = cuda_used()
        reply.write(json.dumps({"rc": rc, "last": last}) + "\n")
        reply.flush()
        served += 1
        if last:
            break
    return served


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainbox.child_server", description=__doc__)
    parser.add_argument("entry", help="MODULE:FUNCTION whose main(argv) serves each request")
    parser.add_argument("--home", type=Path, help="the daemon's home (names the child; unused)")
    args = parser.parse_args(argv)
    reply = os.fdopen(os.dup(1), "w")  # the reply pipe; fd 1 itself becomes stderr, so no print breaks an answer
    os.dup2(2, 1)
    fn = load(args.entry)
    with contextlib.suppress(BrokenPipeError):  # the daemon died: nobody to answer; its request stays on disk
        serve(fn, sys.stdin, reply)
    return 0


if __name__ == "__main__":
    sys.exit(main())
