"""Several processes per job: ``torchrun --nproc-per-node 2`` with gloo on the CPU (core.distributed).

A 2-process run splits each global batch across the ranks and sums the gradients, so it equals a
1-process run with the same settings up to summation order; a SIGTERM to the torchrun agent stops every
rank at the same step boundary, rank 0 checkpoints, and a second torchrun run resumes to the same end.
"""

# ruff: noqa: F811 (pytest fixtures imported from the other core test modules)
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from core import checkpoint
from daemon.worker_process import worker_command
from tests.shared_setup import built_once
from tests.test_core_worker import (  # noqa: F401 (fixtures)
    data_file,
    finish,
    make_job,
    model_dir,
    start_worker,
    train_steps,
)
from trainbox.jobspec import WorkerResult
from trainbox.states import WorkerOutcome
from trainbox.status import TrainingStatus, read_status

DDP = {"max_steps": 12, "grad_accum": 2, "checkpoint_every": 4, "eval_every": 4}


def start_torchrun(run_dir: Path, **env: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        worker_command(run_dir, 2),
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "final" / "model.safetensors")


def train_losses(run_dir: Path) -> list[float]:
    from core.metrics import read_metrics

    return [m["loss"] for m in read_metrics(run_dir / "metrics.jsonl") if m["kind"] == "train"]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory: pytest.TempPathFactory, data_file: Path, model_dir: Path) -> Path:
    """Built once for the session (tests/shared_setup.py), not once per xdist worker; tests only read it."""

    def build(run_dir: Path) -> None:
        # a fresh home: both ranks find no embedded model and build it (identical, deterministic) before
        # joining the process group, where transformers would save it from rank 0 only
        fresh = tmp_path_factory.mktemp("ddp-home") / "embedded-model"
        make_job(run_dir, data_file, fresh, nproc=2, **DDP)
        code, out = finish(start_torchrun(run_dir))
        assert code == 0, out

    return built_once(tmp_path_factory, "ddp-two-process-run", build)


def test_spawn_command_uses_torchrun_above_one_process(tmp_path: Path) -> None:
    assert worker_command(tmp_path, 1) == [sys.executable, "-m", "core.worker", "--run-dir", str(tmp_path)]
    cmd = worker_command(tmp_path, 2)
    assert cmd[:6] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    assert cmd[6:] == ["-m", "core.worker", "--run-dir", str(tmp_path)]


def test_two_processes_equal_one_with_the_same_global_batch(
    two_process_run: Path, tmp_path: Path, data_file: Path, model_dir: Path
) -> None:
    one = tmp_path / "one"
    make_job(one, data_file, model_dir, **DDP)
    code, out = finish(start_worker(one))
    assert code == 0, out
    assert train_losses(two_process_run) == pytest.approx(train_losses(one), abs=1e-5)
    a, b = final_weights(one), final_weights(two_process_run)
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 2e-5, worst  # summation order differs; Adam's normalisation amplifies it a little
    # rank 0 alone wrote: one line per step, one result, one final model; checkpoints as configured
    assert train_steps(two_process_run) == list(range(1, 13))
    result = WorkerResult.load(two_process_run)
    assert result is not None and result.outcome == WorkerOutcome.COMPLETED and result.step == 12
    assert [c.step for c in checkpoint.complete_checkpoints(two_process_run)] == [8, 12]


def test_sigterm_stops_every_rank_at_the_same_step_and_resume_continues(
    two_process_run: Path, tmp_path: Path, data_file: Path, model_dir: Path
) -> None:
    run_dir = tmp_path / "paused"
    make_job(run_dir, data_file, model_dir, nproc=2, **DDP)
    proc = start_torchrun(run_dir, TRAINBOX_TEST_STEP_SLEEP="0.2")

    def step() -> int:
        st = read_status(run_dir / "training.json", TrainingStatus)
        return st.step if st is not None and st.phase == "training" else 0

    deadline = time.monotonic() + 60
    while step() < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    st = read_status(run_dir / "training.json", TrainingStatus)
    assert st is not None and st.pid == proc.pid  # the status names the process the daemon spawned
    proc.send_signal(signal.SIGTERM)  # to the torchrun agent only: it forwards SIGTERM to the ranks
    _code, out = finish(proc)
    stopped = re.findall(r"rank(\d) INFO interrupted at step (\d+)/12", out)
    assert sorted(r for r, _ in stopped) == ["0", "1"], out
    assert len({s for _, s in stopped}) == 1, stopped  # both ranks at the same boundary
    paused = int(stopped[0][1])
    assert 3 <= paused < 12
    result = WorkerResult.load(run_dir)
    assert result is not None and result.outcome == WorkerOutcome.INTERRUPTED and result.step == paused
    assert checkpoint.latest_complete(run_dir).step == paused  # type: ignore[union-attr]

    code, out = finish(start_torchrun(run_dir))
    assert code == 0, out
    assert train_steps(run_dir) == list(range(1, 13))
    assert train_losses(run_dir) == pytest.approx(train_losses(two_process_run), abs=1e-6)
    a, b = final_weights(two_process_run), final_weights(run_dir)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6
