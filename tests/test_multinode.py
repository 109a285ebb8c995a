"""One job across hosts (``training.nnodes > 1``): two torchrun agents on this machine stand in for two hosts,
one run folder, c10d rendezvous on 127.0.0.1, gloo, one rank per node (core.multinode, daemon/worker_process).

The joining agent is started first and named so that c10d sorts it first ("127.0.0.1" < "localhost"): without
core.multinode's rotation it would be node 0 and hold global rank 0. A SIGKILL of either node (its agent and
ranks) makes the other node's agent exit non-zero within a bound (no hang), relaunching both resumes from the
last checkpoint, and the run ends equal to one uninterrupted process with the same global batch.

One run covers all of it (three launches of two agents, about 4 s of CPU each for the imports): a separate
uninterrupted 2-node run would add a fourth to a test that must stay within about a minute on two cores.
"""

# ruff: noqa: F811 (pytest fixtures imported from the other core test modules)
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from torch.distributed import HashStore

from core import checkpoint
from core.multinode import TwoClaimingNodes, claiming_rank, rotated
from daemon.outcome import JobVerdict, decide
from daemon.worker_process import Launch, job_launch, node_command, node_log
from tests.test_core_worker import (  # noqa: F401 (fixtures)
    data_file,
    make_job,
    model_dir,
    run_in_process,
    train_steps,
)
from tests.test_ddp_worker import final_weights, train_losses
from trainbox.jobspec import JOB_SPEC, RESULT, WorkerResult
from trainbox.processes import kill_tree
from trainbox.states import EXIT_COMPLETED, FailureClass, WorkerOutcome
from trainbox.status import TrainingStatus, read_status

SETTINGS = {"max_steps": 12, "grad_accum": 2, "checkpoint_every": 4, "eval_every": 0}
SURVIVOR_BOUND_S = 60  # a node whose peer died exits within this (gloo sees the peer's sockets close)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Node:
    """One host's torchrun agent (its log in a file: a pipe nobody reads while it trains could fill)."""

    proc: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


class Nodes:
    """The two agents of one run: the claiming host's (node 0 by trainbox's rule) and a joining one."""

    def __init__(self, run_dir: Path, logs: Path, **env: str) -> None:
        (run_dir / RESULT).unlink(missing_ok=True)  # as the daemon does before each start: never a stale one
        launch = job_launch(run_dir)
        env = {**os.environ, **env}
        logs.mkdir(parents=True, exist_ok=True)
        self.joining = self._start(
            node_command(run_dir, launch, claiming=False), "127.0.0.1", env, logs / "joining.log"
        )
        self.claiming = self._start(
            node_command(run_dir, launch, claiming=True), "localhost", env, logs / "claiming.log"
        )

    @staticmethod
    def _start(argv: list[str], local_addr: str, env: dict[str, str], log: Path) -> Node:
        at = argv.index("core.worker") - 1  # before "-m core.worker": an agent option
        argv = [*argv[:at], f"--local-addr={local_addr}", *argv[at:]]
        with open(log, "wb") as out:
            proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        return Node(proc, log)

    def finish(self, timeout: float = 120) -> tuple[int, int]:
        return self.claiming.proc.wait(timeout), self.joining.proc.wait(timeout)

    def kill(self, node: Node) -> int:
        """SIGKILL to the node's agent and its ranks, each in a session of its own (the host is gone); the other
        node's exit code, which must come within SURVIVOR_BOUND_S."""
        other = self.joining if node is self.claiming else self.claiming
        kill_tree(node.proc.pid)
        node.proc.wait(10)
        killed_at = time.monotonic()
        code = other.proc.wait(SURVIVOR_BOUND_S)
        print(f"the other node's agent exited {code} {time.monotonic() - killed_at:.1f} s after the kill")
        return code


def c10d_rank(log: str) -> int:
    """The node rank c10d itself gave this agent (before core.multinode's rotation)."""
    found = re.findall(r"trainbox-c10d: c10d made this node (\d+) of 2", log)
    assert found, log[-3000:]
    return int(found[-1])


def worker_ranks(log: str) -> set[int]:
    """The global ranks whose worker lines are in an agent's log."""
    return {int(r) for r in re.findall(r" core\.[\w.]+ rank(\d+) ", log)}


def wait_until(run_dir: Path, step: int, nodes: Nodes, timeout: float = 90) -> None:
    """Until rank 0 reports ``step`` (bounded; fails if a node ends first)."""
    deadline = time.monotonic() + timeout
    while True:
        st = read_status(run_dir / "training.json", TrainingStatus)
        if st is not None and st.phase == "training" and st.step >= step:
            return
        ended = (run_dir / RESULT).exists() or None not in (nodes.claiming.proc.poll(), nodes.joining.proc.poll())
        assert not ended, "the run ended before the kill"
        assert time.monotonic() < deadline, f"rank 0 did not reach step {step}"
        time.sleep(0.05)


def two_node_job(run_dir: Path, data: Path, model: Path) -> None:
    make_job(run_dir, data, model, nnodes=2, nproc=1, rdzv_endpoint=f"127.0.0.1:{free_port()}", **SETTINGS)


def test_the_launch_comes_from_job_json(tmp_path: Path) -> None:
    """What the daemon reads to start a job: a multi-node one is never handed to the (single-process) warm worker."""
    (tmp_path / JOB_SPEC).write_text(
        json.dumps({"job_id": 9, "training": {"nproc": 1, "nnodes": 2, "rdzv_endpoint": "h:29400"}})
    )
    assert job_launch(tmp_path) == Launch(9, 1, 2, "h:29400") and not job_launch(tmp_path).single
    (tmp_path / JOB_SPEC).write_text(json.dumps({"job_id": 9, "training": {"nproc": 1, "rdzv_endpoint": "h:1"}}))
    assert job_launch(tmp_path) == Launch(9) and job_launch(tmp_path).single  # one host: no rendezvous
    (tmp_path / JOB_SPEC).write_text("{not json")
    assert job_launch(tmp_path).single  # the worker reports what is wrong with job.json


def test_node_command_meets_at_the_jobs_rendezvous(tmp_path: Path) -> None:
    standalone = node_command(tmp_path, Launch(7, nproc=2), claiming=True)
    assert standalone[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    two = Launch(7, nproc=1, nnodes=2, rdzv_endpoint="10.0.0.5:29400")
    cmd = node_command(tmp_path, two, claiming=True)
    assert cmd[1:3] == ["-m", "core.multinode"]
    assert {"--nnodes=2", "--nproc-per-node=1", "--rdzv-id=trainbox-job-7"} <= set(cmd)
    assert "--rdzv-endpoint=10.0.0.5:29400" in cmd and "--standalone" not in cmd
    assert cmd[-4:] == ["-m", "core.worker", "--run-dir", str(tmp_path)]
    joining = node_command(tmp_path, two, claiming=False)
    assert [a for a in cmd if "is_host" in a] == ["--rdzv-conf=is_host=1"]
    assert [a.replace("is_host=0", "is_host=1") for a in joining] == cmd
    # each host's agent logs in a file of its own on the shared run folder
    assert node_log(tmp_path, claiming=True, host="a") == tmp_path / "worker.log"
    assert node_log(tmp_path, claiming=False, host="gpu-2.lan") == tmp_path / "worker.gpu-2.lan.log"
    assert node_log(tmp_path, claiming=False, host="../x") == tmp_path / "worker..._x.log"  # one name, no folder


# a torchrun-like agent: one rank in a session of its own (as torch's SubprocessHandler starts it), its pid printed
AGENT = """
import subprocess, sys, time
rank = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
print(rank.pid, flush=True)
time.sleep(60)
"""


def test_a_cold_stop_kills_ranks_in_their_own_sessions() -> None:
    """torchrun starts each rank in a new session: killing the agent's group alone left them training."""
    agent = subprocess.Popen([sys.executable, "-c", AGENT], stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert agent.stdout is not None
    rank = psutil.Process(int(agent.stdout.readline()))
    assert os.getpgid(rank.pid) != os.getpgid(agent.pid)
    kill_tree(agent.pid)
    assert agent.wait(10) == -signal.SIGKILL
    agent.stdout.close()
    deadline = time.monotonic() + 10
    while not dead(rank):
        assert time.monotonic() < deadline, "the rank outlived its agent"
        time.sleep(0.05)


def dead(proc: psutil.Process) -> bool:
    """Gone, or a zombie (killed; whether init reaps it is the container's business)."""
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_the_claiming_node_is_rotated_to_rank_0() -> None:
    assert [rotated(r, 2, 3) for r in range(3)] == [1, 2, 0]
    store = HashStore()
    assert claiming_rank(store, 1, is_host=True) == 1
    assert claiming_rank(store, 0, is_host=False) == 1  # the others read it
    with pytest.raises(TwoClaimingNodes):
        claiming_rank(store, 0, is_host=True)


@pytest.fixture
def launched() -> Iterator[list[Nodes]]:
    """The agents a test starts, killed at its end if a failed assertion left them running."""
    started: list[Nodes] = []
    yield started
    for node in [n for nodes in started for n in (nodes.claiming, nodes.joining)]:
        if node.proc.poll() is None:
            kill_tree(node.proc.pid)
            node.proc.wait(10)


def test_two_nodes_equal_one_process_and_either_one_can_die(
    tmp_path: Path, data_file: Path, model_dir: Path, launched: list[Nodes]
) -> None:
    run_dir = tmp_path / "run"
    two_node_job(run_dir, data_file, model_dir)
    slow = {"TRAINBOX_TEST_STEP_SLEEP": "0.5"}  # room to kill it mid-run

    # c10d sorts the joining agent first; the rotation makes the claiming one node 0, holding global rank 0
    nodes = Nodes(run_dir, tmp_path / "first", **slow)
    launched.append(nodes)
    wait_until(run_dir, 5, nodes)
    out, joined_out = nodes.claiming.output(), nodes.joining.output()
    assert (c10d_rank(joined_out), c10d_rank(out)) == (0, 1)
    assert (worker_ranks(out), worker_ranks(joined_out)) == ({0}, {1})
    st = read_status(run_dir / "training.json", TrainingStatus)
    assert st is not None and st.pid == nodes.claiming.proc.pid  # the process the claiming daemon spawned

    # the joining host dies after the checkpoint at step 4: rank 0 fails, writing a crash result that the
    # daemon retries, and the claiming agent exits non-zero
    code = nodes.kill(nodes.joining)
    assert code != 0, nodes.claiming.output()
    result = WorkerResult.load(run_dir)
    assert result is not None and result.outcome == WorkerOutcome.FAILED and result.failure_class == FailureClass.CRASH
    assert decide(result, code, False, False, attempts=0, max_retries=2).verdict == JobVerdict.RETRY
    assert checkpoint.latest_complete(run_dir).step == 4  # type: ignore[union-attr]

    # relaunched, both resume at step 4; then the claiming host dies after the checkpoint at step 8: the joining
    # host's rank fails and its agent exits non-zero (the claiming daemon sees its own child killed: a retry)
    nodes = Nodes(run_dir, tmp_path / "second", **slow)
    launched.append(nodes)
    wait_until(run_dir, 9, nodes)
    code = nodes.kill(nodes.claiming)
    assert code != 0, nodes.joining.output()
    assert "resuming at step 4" in nodes.claiming.output()
    assert decide(None, -signal.SIGKILL, False, False, attempts=1, max_retries=2).verdict == JobVerdict.RETRY
    assert checkpoint.latest_complete(run_dir).step == 8  # type: ignore[union-attr]

    nodes = Nodes(run_dir, tmp_path / "third")
    launched.append(nodes)
    assert nodes.finish() == (0, 0), nodes.claiming.output() + nodes.joining.output()
    assert "resuming at step 8" in nodes.claiming.output()
    assert train_steps(run_dir) == list(range(1, 13))  # every step once in the run's record
    result = WorkerResult.load(run_dir)
    assert result is not None and result.outcome == WorkerOutcome.COMPLETED and result.step == 12

    # the same job in one process, uninterrupted, with the same global batch: the same run
    one = tmp_path / "one"
    code, _ = run_in_process(make_job(one, data_file, model_dir, **SETTINGS))
    assert code == EXIT_COMPLETED
    assert train_losses(run_dir) == pytest.approx(train_losses(one), abs=1e-5)
    a, b = final_weights(one), final_weights(run_dir)
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 2e-5, worst  # as tests/test_ddp_worker.py: summation order differs
