"""Named moments where a chaos test kills the process that reaches them (test-only, like core.faults).

``TRAINBOX_TEST_CRASH_AT`` holds a comma list of ``POINT[:N]`` (a point may appear several times):
the process that makes the N-th hit of ``POINT`` (default the first) sends itself SIGKILL there,
exactly as a power cut or the OOM killer would stop it, with nothing flushed and no handler run.
Hits are counted across every process of the run in ``TRAINBOX_TEST_CRASH_DIR`` (one file per point,
a byte per hit), so one armed list given to every daemon life fires each kill exactly once, in
whichever process reaches it; without that folder they are counted per process. Never active unless
the variable is set; production never sets it.

The points are the moments between two writes where a crash used to leave the spool, the DB and the
model folders disagreeing (issue 14); the chaos test aims kills at each of them
(tests/test_chaos_aimed.py). Every name a call site uses is listed in ``POINTS``, so a misspelt point
fails at once instead of never firing.
"""

from __future__ import annotations

import os
import signal

CRASH_ENV = "TRAINBOX_TEST_CRASH_AT"

POINTS = {
    # daemon
    "admission.between_renames": "admission moved one of a job's files (data or sidecar) but not the other",
    "spawn.before_popen": "the run row is written, the worker not started",
    "spawn.after_popen": "the worker is started, its pid not recorded",
    "version.row_pending": "the version row is committed as pending, the model folder not renamed",
    "version.renamed": "final/ is renamed to models/vNNNN, the version row not final",
    "gate.started": "the gate's evaluation child is started",
    "gate.applied": "the gate's verdict is recorded, the job not filed",
    "filing.moved": "a finished job's file is moved to done/ or failed/, its row not updated",
    # worker
    "worker.final_saving": "the final model is half written in its temp folder",
    "worker.checkpoint_saving": "a checkpoint is half written in its temp folder",
}

CRASH_DIR_ENV = "TRAINBOX_TEST_CRASH_DIR"
_hits: dict[str, int] = {}


def armed() -> dict[str, set[int]]:
    """The points armed in this process's environment, each with the hits that fire it."""
    spec = os.environ.get(CRASH_ENV, "")
    out: dict[str, set[int]] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, nth = item.partition(":")
        if name not in POINTS:
            raise ValueError(f"{CRASH_ENV}: unknown crash point {name!r} (known: {', '.join(POINTS)})")
        out.setdefault(name, set()).add(int(nth) if nth else 1)
    return out


def _count(name: str) -> int:
    """This hit's number: across processes when a folder is given (O_APPEND of one byte is atomic)."""
    folder = os.environ.get(CRASH_DIR_ENV)
    if not folder:
        _hits[name] = _hits.get(name, 0) + 1
        return _hits[name]
    path = os.path.join(folder, name + ".hits")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, b".")
        os.fsync(fd)
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


def crash_point(name: str) -> None:
    """Die here (SIGKILL to oneself) if the chaos test armed this hit of ``name``."""
    if name not in POINTS:
        raise ValueError(f"unknown crash point {name!r}")
    if CRASH_ENV not in os.environ:
        return
    hits = armed().get(name)
    if hits and _count(name) in hits:
        os.kill(os.getpid(), signal.SIGKILL)


def arming(plan: dict[str, list[int]]) -> str:
    """The ``TRAINBOX_TEST_CRASH_AT`` value that kills at each hit ``plan`` lists per point."""
    return ",".join(f"{point}:{n}" for point, hits in plan.items() for n in hits)


def fired(plan: dict[str, list[int]], folder: str | os.PathLike[str]) -> dict[str, int]:
    """How many of ``plan``'s hits were reached (each killed its process), per point, from the hit
    counts kept in ``folder`` (``TRAINBOX_TEST_CRASH_DIR``)."""
    out = {}
    for point, hits in plan.items():
        path = os.path.join(folder, point + ".hits")
        reached = os.path.getsize(path) if os.path.exists(path) else 0
        out[point] = sum(1 for n in hits if n <= reached)
    return out
