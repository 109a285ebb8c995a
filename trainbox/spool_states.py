"""Which job states agree with which spool folder, and where each job's file is: shared by the
daemon's start-up reconciliation (``daemon/spool_reconcile.py``, which fixes rows) and ``trainbox
health`` (``safety/checkup.py``, which only reports), so both judge a row against its file the same way.

The folder is the truth (STYLE: events are hints; the directory is the truth): a job's file moves by
``os.rename`` only, so it is in exactly one place, while its row is updated by a second write that a
crash can separate from the move.
"""

from __future__ import annotations

import os
from pathlib import Path

from trainbox.home import Home
from trainbox.spool import SIDECAR_SUFFIXES, job_id_of
from trainbox.states import JobState, Priority

ADMITTING = "admitting"
PROCESSING = "processing"
DONE = "done"
FAILED = "failed"
WAITING = tuple(p.value for p in Priority)
FINAL_STATES = frozenset({JobState.DONE, JobState.FAILED, JobState.REJECTED, JobState.CANCELLED})
# what a row may say while its file is in each folder
AGREES: dict[str, frozenset[str]] = {
    **{w: frozenset({JobState.QUEUED.value}) for w in WAITING},
    PROCESSING: frozenset({JobState.RUNNING.value, JobState.PAUSED.value}),
    DONE: frozenset({JobState.DONE.value}),
    FAILED: frozenset({JobState.FAILED.value, JobState.REJECTED.value, JobState.CANCELLED.value}),
    ADMITTING: frozenset({"admitting"}),
}


def folders(home: Home) -> dict[str, Path]:
    """Every spool folder a job's data file can be in, by the label ``AGREES`` uses."""
    return {
        ADMITTING: home.queue / ADMITTING,
        **{p.value: home.waiting(p) for p in Priority},
        PROCESSING: home.processing,
        DONE: home.done,
        FAILED: home.failed,
    }


def places(home: Home) -> dict[int, list[str]]:
    """Job id -> the folders its data file is in (one, unless something is badly wrong). Sidecars and
    error files are not data files; hidden names (an admission's intent) are not jobs."""
    out: dict[int, list[str]] = {}
    for label, folder in folders(home).items():
        try:
            names = os.listdir(folder)
        except OSError:
            continue
        for name in names:
            job_id = job_id_of(name)
            if job_id is None or name.startswith(".") or Path(name).suffix in SIDECAR_SUFFIXES:
                continue
            if label not in out.setdefault(job_id, []):
                out[job_id].append(label)
    return out


def agrees(state: str, place: str, has_version: bool) -> bool:
    """Whether a row's ``state`` fits its file in ``place``. A trained job in processing/ waits for its
    version's gate (``daemon/gate.py``); its row may already say done (filed row first, file second)."""
    if place == PROCESSING and has_version and state == JobState.DONE.value:
        return True
    return state in AGREES.get(place, frozenset())


def disagreement(state: str | None, job_places: list[str], has_version: bool) -> str:
    """What is wrong between a job's row and its file, in words ("" when they agree). A final row
    without a file agrees: people clear done/ and failed/ by hand."""
    if state is None or state == "admitting":
        return ""  # no row yet (the file makes one when it starts), or an admission recovery finishes
    if len(job_places) > 1:
        return f"file in {' and '.join(job_places)}"
    if not job_places:
        return "" if state in FINAL_STATES else f"row says {state}, no file in the spool"
    if job_places == [ADMITTING]:
        return ""  # being decided (a batch's rows change before its renames), or recovered at the next start
    if agrees(state, job_places[0], has_version):
        return ""
    return f"row says {state}, file in {job_places[0]}/"
