"""A fleet host's part in another host's multi-node job (``training.nnodes > 1``; issue 18).

The host that claims a multi-node job runs node 0: it hosts the job's rendezvous and gets global rank 0
(``daemon/worker_process.node_command``, ``core/multinode.py``). The other ``nnodes - 1`` nodes are fleet
hosts with nothing of their own to do (no job, no gate, not paused or stopping): each looks, at most every
``fleet.heartbeat_seconds``, for an open run of another host's multi-node job started within the rendezvous
window, takes one of that run's node slots (``node:<run>:<k>``, a lease taken once:
``management/leases.take_once``) and starts its own torchrun agent for the same run folder on the shared
storage, logging to ``worker.<host>.log``. Joining comes before claiming a job of its own: the multi-node job
was claimed first, in the fleet's priority order, and its claiming host waits for its nodes.

The agent is this daemon's child in its own session, like a worker. This host files nothing of the job (the
claiming host does, under its lease); it watches its agent only. When the agent exits, the slot is released
and the exit is an event; an agent still running once its run has ended on the claiming host (a rendezvous
that never completed) is killed after ``LINGER_S``. A daemon's stop asks its agent to stop (SIGTERM, forwarded
to its ranks: every rank stops at the same step boundary, ``core.distributed``, so rank 0 checkpoints) and
waits for it as for a worker.

A daemon killed with -9 leaves its agent running; its next start finds it through the last status file
(``stop_orphan``, the argv checked against the run folder) and kills it: the run then fails on the claiming
host, whose retry resumes it from its checkpoint as a new run, with new node slots.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select

from daemon.worker_process import (
    QUIET_OFFLINE_ENV,
    Launch,
    WorkerProcess,
    job_launch,
    node_command,
    node_log,
    serves_run,
)
from management.db import Job, ModelDB, Run
from management.leases import Held, node_slot, release, renew, take_once
from trainbox.home import Home
from trainbox.processes import describe_exit, kill_tree, spawn_logged
from trainbox.states import JobState
from trainbox.status import JoinedNode

log = logging.getLogger("trainbox.daemon")
RENDEZVOUS_WINDOW_S = 600.0  # torchrun's c10d join timeout: a run older than this no longer waits for nodes
LINGER_S = 30.0  # an agent whose run has ended on the claiming host is killed after this long


@dataclass
class Joined:
    """This host's agent in a run of another host's job, and the node slot it took."""

    run_id: int
    node: int
    slot: Held
    agent: WorkerProcess
    run_ended_at: float | None = None  # when this host first saw the run closed on the claiming host

    def describe(self) -> JoinedNode:
        return JoinedNode(job_id=self.agent.job_id, run_id=self.run_id, node=self.node, pid=self.agent.pid)


def open_runs(db: ModelDB, host: str, since: float, accept: Callable[[Job], bool]) -> list[tuple[int, int]]:
    """(run id, job id) of the runs other hosts started since ``since`` and still run, oldest first, of jobs
    this host can run (``accept``: a host whose GPU cannot fit the job stays out of it too)."""
    with db.session() as s:
        q = (
            select(Run.id, Job)
            .join(Job, Job.id == Run.job_id)
            .where(
                Run.ended_at.is_(None),
                Run.host.is_not(None),
                Run.host != host,
                Run.started_at >= since,
                Job.state == JobState.RUNNING.value,
            )
            .order_by(Run.started_at)
        )
        return [(run_id, job.id) for run_id, job in s.execute(q).tuples() if accept(job)]


class NodeJoiner:
    def __init__(self, home: Home, db: ModelDB, host: str, lease_seconds: float, every: float) -> None:
        self.home, self.db, self.host, self.ttl, self.every = home, db, host, lease_seconds, every
        self.joined: Joined | None = None
        self.last_look: float | None = None
        self.last_renewal = 0.0

    @property
    def busy(self) -> bool:
        return self.joined is not None

    def try_join(self, now: float, accept: Callable[[Job], bool]) -> bool:
        """Join the oldest open multi-node run that has a node slot free (at most one look per ``every``)."""
        if self.joined is not None or (self.last_look is not None and now - self.last_look < self.every):
            return self.joined is not None
        self.last_look = now
        for run_id, job_id in open_runs(self.db, self.host, now - RENDEZVOUS_WINDOW_S, accept):
            run_dir = self.home.run_dir(job_id)
            launch = job_launch(run_dir)
            if launch.nnodes <= 1 or launch.job_id != job_id:
                continue
            for node in range(1, launch.nnodes):
                slot = take_once(self.db, node_slot(run_id, node), self.host, self.ttl, job_id, now)
                if slot is not None:
                    self._start(run_id, node, slot, run_dir, launch)
                    return self.joined is not None
        return False

    def _start(self, run_id: int, node: int, slot: Held, run_dir: Path, launch: Launch) -> None:
        logged = node_log(run_dir, claiming=False, host=self.host)
        try:
            argv = node_command(run_dir, launch, claiming=False)
            popen = spawn_logged(argv, logged, label=f"worker node {node}", defaults=QUIET_OFFLINE_ENV)
        except OSError as e:
            release(self.db, slot)  # the run fails on its rendezvous timeout and is retried, with new slots
            log.error("job %d: could not start this host's node of run %d: %s", launch.job_id, run_id, e)
            return
        self.joined = Joined(run_id, node, slot, WorkerProcess(launch.job_id, run_dir, popen, time.time()))
        self.last_renewal = time.time()
        what = f"host {self.host} joined run {run_id} as node {node} of {launch.nnodes}"
        what += f" (agent pid {popen.pid}, log {logged.name})"
        self.db.event("node_joined", what, launch.job_id, host=self.host, run_id=run_id, node=node)
        log.info("job %d: %s", launch.job_id, what)

    def tick(self, now: float, stop_timeout: float) -> None:
        """Watch the agent: reap it (slot released), stop one whose run ended elsewhere or whose stop overran,
        and renew the slot's lease (what ``trainbox fleet`` shows) every third of its TTL."""
        joined = self.joined
        if joined is None:
            return
        agent = joined.agent
        rc = agent.poll()
        if rc is not None:
            self.joined = None
            release(self.db, joined.slot)
            what = f"host {self.host} left run {joined.run_id} (node {joined.node}): agent {describe_exit(rc)}"
            self.db.event("node_left", what, agent.job_id, host=self.host, run_id=joined.run_id, exit_code=rc)
            log.info("job %d: %s", agent.job_id, what)
            return
        if agent.stop_requested_at is not None and now - agent.stop_requested_at > stop_timeout:
            log.warning("job %d: this host's node did not stop within %.0fs: killing it", agent.job_id, stop_timeout)
            agent.kill()
        if now - self.last_renewal >= self.ttl / 3:
            self.last_renewal = now
            joined.slot = renew(self.db, joined.slot, self.ttl, now) or joined.slot
            run = self.db.run(joined.run_id)
            if run is None or run.ended_at is not None:
                joined.run_ended_at = joined.run_ended_at or now
        if joined.run_ended_at is not None and now - joined.run_ended_at > LINGER_S and agent.killed_at is None:
            log.warning(
                "job %d: run %d ended on its claiming host; killing this host's node", agent.job_id, joined.run_id
            )
            agent.kill()

    def request_stop(self, now: float) -> None:
        if self.joined is not None:
            self.joined.agent.request_stop(now)

    def stop(self, timeout: float) -> None:
        """The daemon ends (only on an unexpected exception): stop the agent, killing it past ``timeout``."""
        if self.joined is None:
            return
        agent = self.joined.agent
        agent.request_stop(time.time())
        if agent.wait(timeout) is None:
            agent.kill()
            agent.wait(10)
        self.tick(time.time(), timeout)


def stop_orphan(home: Home, db: ModelDB, host: str, previous: JoinedNode | None) -> None:
    """At start: the agent a killed daemon left in a run of another host's job (its last status names it) is
    killed, and its node slot given back (a slot is taken once, so its generation is 1)."""
    if previous is None:
        return
    run_dir = home.run_dir(previous.job_id)
    alive = serves_run(previous.pid, run_dir)
    if alive:
        kill_tree(previous.pid)
    release(db, Held(node_slot(previous.run_id, previous.node), host, 1, 0.0))
    what = f"host {host} left run {previous.run_id} (node {previous.node}): "
    what += (
        "its agent, left by the previous daemon, killed" if alive else "its agent had ended with the previous daemon"
    )
    db.event("node_left", what, previous.job_id, host=host, run_id=previous.run_id, exit_code=None)
    log.warning("job %d: %s", previous.job_id, what)
