"""The eval gate as a child of the daemon, started and reaped in its tick like a worker.

When a job's model version is registered (``JobRunner.complete``) the daemon writes the gate's
request, ``runs/job-N/gate-pending.json`` (version, job, the job's own losses); the job stays in
``processing/`` (its row ``running``) until the verdict. ``Gates.tick`` then plans the gate
(``management/versions.plan_version_gate``): a verdict needing no evaluation is applied at once;
otherwise ``core.evaluate``'s ``main`` is handed the gate's arguments in the gate's kept child
(``daemon/served_child.py``: torch and transformers imported once, not per gate; its output in
``runs/job-N/gate.log``, its losses in ``runs/job-N/gate-result.json``), and a later tick reads its answer
and applies the verdict (``apply_gate``: a
``version_gates`` row, promote or not, an event), files the job in ``done/``, and only then deletes
the request. The tick meanwhile keeps serving controls, admissions and signals. The daemon
dispatches no job while a gate is pending, so the next job starts from the ``models/current`` the
gate chose. A daemon that stops or dies mid-gate leaves the request behind: the next daemon runs
that gate again instead of forgetting it; one whose verdict was recorded is only filed. A version
whose parent is not the current version is never promoted here (``versions.branch_verdict``: one
chain; a person may promote it by hand).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from daemon.served_child import Answer, ServedChild
from management.db import ModelDB
from management.evaluation import EVALUATE_COMMAND, parse_losses, parse_memory
from management.versions import GatePlan, GateVerdict, VersionError, apply_gate, plan_version_gate
from trainbox.atomic import atomic_write_json, read_json
from trainbox.config import Settings
from trainbox.crashpoints import crash_point
from trainbox.home import Home
from trainbox.processes import cmdline

log = logging.getLogger("trainbox.daemon")

GATE_PENDING = "gate-pending.json"
GATE_RESULT = "gate-result.json"
GATE_LOG = "gate.log"
QUIET_OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1"}


class GateRequest(BaseModel):
    """A registered version waiting for its gate (``runs/job-N/gate-pending.json``)."""

    version_id: int
    job_id: int
    init_version: int | None = None
    own_val_loss: float | None = None
    own_first_val_loss: float | None = None
    pid: int | None = None  # its (kept) evaluation child, once started (stopped if a new daemon finds it alive)


def request_gate(run_dir: Path, request: GateRequest) -> None:
    atomic_write_json(run_dir / GATE_PENDING, request.model_dump())


@dataclass
class GateChild:
    request: GateRequest
    run_dir: Path
    plan: GatePlan
    started_at: float


class Gates:
    """Pending gates, one evaluation at a time in the kept child. ``entry`` replaces ``core.evaluate:main``
    (tests: a stub that scores slowly without torch)."""

    def __init__(
        self,
        home: Home,
        db: ModelDB,
        settings: Settings,
        file_done: Callable[[int], None],
        entry: str | None = None,
        only: Callable[[int], bool] | None = None,
    ) -> None:
        self.home, self.db, self.settings = home, db, settings
        self.served = ServedChild(entry or "core.evaluate:main", home.root, defaults=QUIET_OFFLINE_ENV)
        self.only = only  # a fleet's daemon: the gates of the job it holds, never another host's
        self.file_done = file_done  # files the gated job in done/ (``JobRunner.file_done``)
        self.child: GateChild | None = None
        self._pending: list[tuple[Path, GateRequest]] | None = None  # None: read the disk again

    def refresh(self) -> None:
        """A job was reaped (it may have requested a gate): list the requests again when next asked."""
        self._pending = None

    def pending(self) -> list[tuple[Path, GateRequest]]:
        """Requests on disk, oldest version first (a restart finds an interrupted gate here); listed once
        per ``refresh``, not every tick."""
        if self._pending is None:
            self._pending = self._scan()
        return self._pending

    def _scan(self) -> list[tuple[Path, GateRequest]]:
        found = []
        for path in self.home.runs.glob(f"*/{GATE_PENDING}"):
            data = read_json(path)
            try:
                request = GateRequest.model_validate(data)
            except ValueError:
                log.warning("unreadable gate request %s: ignored", path)
                continue
            if self.only is None or self.only(request.job_id):
                found.append((path.parent, request))
        return sorted(found, key=lambda item: item[1].version_id)

    @property
    def busy(self) -> bool:
        return self.child is not None or bool(self.pending())

    def describe(self) -> str:
        if self.child is None:
            return ""
        return f"evaluating model version {self.child.request.version_id} (eval gate)"

    def tick(self, now: float) -> None:
        """Reap a finished (or overdue) child and apply its verdict; else start the next gate."""
        self.served.tick(now)
        if self.child is not None:
            self._check_child(self.child, now)
            return
        for run_dir, request in self.pending()[:1]:
            if self.db.gates(request.version_id):  # decided before a crash removed the request
                self._done(run_dir, request)
            else:
                self._start(run_dir, request, now)

    def _start(self, run_dir: Path, request: GateRequest, now: float) -> None:
        plan = plan_version_gate(
            self.home,
            self.db,
            self.settings,
            request.version_id,
            run_dir=run_dir,
            init_version=request.init_version,
            own_val_loss=request.own_val_loss,
            own_first_val_loss=request.own_first_val_loss,
        )
        if plan.verdict is not None or not plan.argv:
            self._apply(run_dir, request, plan.judge(None, "nothing to evaluate", self._tolerance))
            return
        (run_dir / GATE_RESULT).unlink(missing_ok=True)  # a stale result must never speak for this gate
        argv = [*plan.argv[len(EVALUATE_COMMAND) :], "--out", str(run_dir / GATE_RESULT)]
        pid = self.served.submit(argv, run_dir / GATE_LOG, "gate", now)
        request_gate(run_dir, request.model_copy(update={"pid": pid}))
        crash_point("gate.started")
        self.child = GateChild(request, run_dir, plan, now)
        log.info("model version %d: eval gate started (pid %d)", request.version_id, pid)

    def _check_child(self, child: GateChild, now: float) -> None:
        answer = self.served.answer()
        if answer is None:
            limit = self.settings.models.eval_timeout
            if now - child.started_at <= limit:
                return
            self.served.kill()
            verdict = child.plan.judge(None, f"evaluation took longer than models.eval_timeout ({limit}s)", 0)
        else:
            losses, memory, error = self._losses(child, answer)
            verdict = child.plan.judge(losses, error, self._tolerance, memory)
        self.child = None
        self._apply(child.run_dir, child.request, verdict)

    def _losses(
        self, child: GateChild, answer: Answer
    ) -> tuple[dict[str, float | None] | None, list[dict[str, Any]] | None, str]:
        """(losses on the frozen or held-out set, losses on the memory sets, why there are none)."""
        if not answer.ok:
            return None, None, f"evaluation failed ({answer.why}): see {child.run_dir / GATE_LOG}"
        try:
            text = (child.run_dir / GATE_RESULT).read_text(encoding="utf-8")
            return parse_losses(text), parse_memory(text), ""
        except (OSError, ValueError, KeyError, TypeError) as e:
            return None, None, f"evaluation gave no result ({e})"

    @property
    def _tolerance(self) -> float:
        return self.settings.models.regression_tolerance

    def _apply(self, run_dir: Path, request: GateRequest, verdict: GateVerdict) -> None:
        try:
            apply_gate(self.home, self.db, self.settings, request.version_id, request.job_id, verdict)
            crash_point("gate.applied")
        except VersionError as e:  # boundary: a gate that cannot be applied must not block the queue
            log.error("model version %d: gate could not be applied: %s", request.version_id, e)
        self._done(run_dir, request)

    def _done(self, run_dir: Path, request: GateRequest) -> None:
        """The verdict is recorded: file the job, then drop the request (a crash between the two files
        the job at the next start without a second verdict)."""
        self.file_done(request.job_id)
        (run_dir / GATE_PENDING).unlink(missing_ok=True)
        self._pending = [(d, r) for d, r in self.pending() if r.version_id != request.version_id]

    def stop_orphans(self) -> None:
        """An evaluation child outlives a daemon killed with -9 (its own session): kill it before the
        gate runs again, so two never hold the GPU at once. Its argv names this home's kept gate child:
        never a stranger that reuses the pid."""
        for _run_dir, request in self.pending():
            if request.pid and self.served.is_ours(cmdline(request.pid)):
                log.warning(
                    "model version %d: killing eval gate pid %d left by a previous daemon",
                    request.version_id,
                    request.pid,
                )
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(request.pid, signal.SIGKILL)
        self.refresh()  # the start-up reconciliation that follows may request gates: list them again

    def stop(self) -> None:
        """The daemon stops: the child is killed, its request stays for the next daemon."""
        child, self.child = self.child, None
        if child is not None:
            log.info(
                "model version %d: eval gate interrupted; it runs again at the next start", child.request.version_id
            )
        self.served.kill()
