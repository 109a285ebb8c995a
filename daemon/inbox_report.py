"""What the inbox holds besides jobs: refused entries, sidecars waiting for their file, eval files.

- A refused entry (symlink, FIFO, folder, ...) is reported once per daemon run (an ``inbox_refused``
  event and a line in ``status/daemon.json``, which ``trainbox queue`` and the dashboard show) and
  left where it is.
- A sidecar waits ``daemon.sidecar_wait_seconds`` for its data file, then goes to ``queue/failed/``
  as a rejected entry of its own, saying why (a sidecar dropped after its file, or alone).
- An eval file that a sidecar in the same folder names is held back: it is not a job of its own,
  it is claimed with its job.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from daemon.admission import write_error
from daemon.inbox_scan import InboxListing, Refused, is_sidecar_name
from daemon.spool import claim
from daemon.staging import eval_name_beside
from management.db import Job, ModelDB
from trainbox.config import DaemonConfig
from trainbox.home import Home
from trainbox.safefs import NotRegularFile, display_name
from trainbox.spool import spool_name
from trainbox.states import JobState

MAX_LISTED = 50


class InboxHousekeeping:
    def __init__(self, home: Home, db: ModelDB, config: DaemonConfig) -> None:
        self.home, self.db, self.config = home, db, config
        self.reported: dict[tuple[Path, str], Refused] = {}
        self._evals: dict[Path, tuple[tuple[int, int], str | None]] = {}  # sidecar -> (stat key, eval name)

    def refused_lines(self) -> list[str]:
        """What the status file shows: one line per refused entry still in the inbox."""
        return [
            f"{display_name(str(r.path.relative_to(self.home.inbox)))}: {r.reason}"
            for r in list(self.reported.values())[:MAX_LISTED]
        ]

    def on_listing(self, listing: InboxListing, now: float) -> None:
        current = {(r.path, r.kind): r for r in listing.refused}
        for key, entry in current.items():
            if key not in self.reported:
                shown = display_name(str(entry.path.relative_to(self.home.inbox)))
                self.db.event("inbox_refused", f"inbox/{shown} ({entry.kind}): {entry.reason}", entry_kind=entry.kind)
        self.reported = current
        for sidecar in listing.sidecars:
            if _data_file_of(sidecar) is None and self._waited_out(sidecar, now):
                self.file_orphan(sidecar)

    def _waited_out(self, sidecar: Path, now: float) -> bool:
        try:
            return now - os.lstat(sidecar).st_mtime >= self.config.sidecar_wait_seconds
        except OSError:
            return False

    def file_orphan(self, sidecar: Path) -> None:
        """A sidecar with no data file after the wait: to failed/ as a rejected entry of its own."""
        earlier = [j for j in self.db.jobs() if j.name == display_name(_stem(sidecar.name) + ".jsonl")]
        why = f"a sidecar with no data file beside it after {self.config.sidecar_wait_seconds:.0f} s"
        if earlier:
            why += f" (a file of that name was admitted as job {earlier[-1].id} without it: drop the sidecar first)"
        with self.db.session() as s:
            row = Job(name=display_name(sidecar.name), state="admitting")
            s.add(row)
            s.flush()
            job_id = row.id
        try:
            failed = claim(sidecar, self.home.failed, spool_name(job_id, sidecar.name))
        except (NotRegularFile, FileNotFoundError):
            with self.db.session() as s:
                gone = s.get(Job, job_id)
                if gone is not None:
                    s.delete(gone)
            return
        eval_name = self.eval_named_by(sidecar)
        if eval_name and os.path.lexists(sidecar.parent / eval_name):
            with contextlib.suppress(NotRegularFile, FileNotFoundError):
                claim(sidecar.parent / eval_name, self.home.failed, failed.name + ".eval")
        write_error(failed, job_id, "bad_input", why)
        with self.db.session() as s:
            job = s.get(Job, job_id)
            assert job is not None
            job.state, job.spool_name, job.error = JobState.REJECTED.value, failed.name, why
            job.failure_class, job.finished_at = "bad_input", time.time()
        self.db.event("rejected", f"{failed.name}: {why}", job_id)

    def held(self, ready: list[Path]) -> set[Path]:
        """Ready files that a sidecar in their folder names as its eval file."""
        out: set[Path] = set()
        for folder in {p.parent for p in ready}:
            try:
                entries = list(os.scandir(folder))
                names = [e.name for e in entries if is_sidecar_name(e.name) and e.is_file(follow_symlinks=False)]
            except OSError:
                continue
            for name in names:
                chosen = self.eval_named_by(folder / name)
                if chosen:
                    out.add(folder / chosen)
        return out

    def eval_named_by(self, sidecar: Path) -> str | None:
        """The bare file name a sidecar gives as eval_file (cached per sidecar version)."""
        try:
            st = os.lstat(sidecar)
        except OSError:
            return None
        key = (st.st_mtime_ns, st.st_size)
        cached = self._evals.get(sidecar)
        if cached is not None and cached[0] == key:
            return cached[1]
        name = eval_name_beside(sidecar)
        self._evals[sidecar] = (key, name)
        return name


def _stem(name: str) -> str:
    return os.path.splitext(name)[0]


def _data_file_of(sidecar: Path) -> Path | None:
    for suffix in (".jsonl", ".JSONL", ".Jsonl"):
        candidate = sidecar.with_name(_stem(sidecar.name) + suffix)
        if os.path.lexists(candidate):
            return candidate
    return None
