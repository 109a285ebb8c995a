# ruff: noqa: F811 (pytest fixtures imported from the worker tests)
"""Replay (issue 17) in the real worker: an earlier job's kept training sample is mixed into the job's data,
recorded in the run, and a run stopped with SIGTERM and resumed ends with bitwise the weights of an
uninterrupted one, even when the source sample was cut in between; the job keeps its own memory sets."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import torch
from safetensors.torch import load_file

from core.replay import REPLAY_DATA, REPLAY_META
from management.db import ModelDB
from management.memory import EVAL, TRAIN, job_sets, read_set, record_line, set_path, write_set
from tests.test_core_worker import (  # noqa: F401 - fixtures
    data_file,
    finish,
    make_job,
    model_dir,
    run_in_process,
    start_worker,
    wait_for_step,
)
from trainbox.jobspec import JobSpec, MemorySpec, ReplaySource
from trainbox.records import Record
from trainbox.states import EXIT_COMPLETED, EXIT_INTERRUPTED


def _spec(run_dir: Path, data: Path, model_dir: Path, memory: MemorySpec, share: float) -> JobSpec:
    spec = make_job(run_dir, data, model_dir, replay_share=share).model_copy(update={"memory": memory})
    spec.save()
    return spec


def _earlier_sample(memory_dir: Path) -> ReplaySource:
    rows = [Record(kind="prompt_completion", prompt=f"What is {i} plus 2?", completion=f" {i + 2}") for i in range(30)]
    sha, _size = write_set(memory_dir, [record_line(r) for r in rows])
    return ReplaySource(job_id=3, sha256=sha, n_examples=30)


def test_replay_recorded_resumes_exactly_and_the_job_keeps_its_memory(
    tmp_path: Path, data_file: Path, model_dir: Path
) -> None:
    memory_dir = tmp_path / "memory"
    source = _earlier_sample(memory_dir)
    memory = MemorySpec(dir=str(memory_dir), replay=[source])
    straight = _spec(tmp_path / "straight", data_file, model_dir, memory, 0.25)
    code, _result = run_in_process(straight)
    assert code == EXIT_COMPLETED
    meta = json.loads((tmp_path / "straight" / REPLAY_META).read_text())
    # 60 records, 6 held out: 54 trained; 0.25 of the mix replayed: 18 of the earlier job's 30
    assert meta["n_train"] == 54 and meta["examples"] == 18 and meta["taken"] == {"3": 18}
    replayed = (tmp_path / "straight" / REPLAY_DATA).read_bytes().splitlines(keepends=True)
    assert len(replayed) == 18 and set(replayed) <= set(
        set_path(memory_dir, source.sha256).read_bytes().splitlines(True)
    )
    db = ModelDB(straight.db_url)
    own = job_sets(db, [7], EVAL)[7], job_sets(db, [7], TRAIN)[7]
    assert (own[0].n_examples, own[1].n_examples) == (6, 54)  # its own examples only, never the replayed
    assert all("plus" not in (r.text + r.prompt) for r in read_set(memory_dir, own[1].sha256))
    db.close()

    run_dir = tmp_path / "run"
    _spec(run_dir, data_file, model_dir, memory, 0.25)
    proc = start_worker(run_dir, TRAINBOX_TEST_STEP_SLEEP="0.1")
    wait_for_step(proc, run_dir, 10)
    proc.send_signal(signal.SIGTERM)
    rc, out = finish(proc)
    assert rc == EXIT_INTERRUPTED, out
    write_set(memory_dir, replayed[:1])  # a later down-sample replaced the source: the run's record decides
    set_path(memory_dir, source.sha256).unlink()
    rc, out = finish(start_worker(run_dir))
    assert rc == EXIT_COMPLETED, out
    assert "resuming at step" in out and f"as recorded in {REPLAY_DATA}" in out
    a = load_file(tmp_path / "straight" / "final" / "model.safetensors")
    b = load_file(run_dir / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_replay_share_zero_turns_it_off(tmp_path: Path, data_file: Path, model_dir: Path) -> None:
    memory_dir = tmp_path / "memory"
    memory = MemorySpec(dir=str(memory_dir), replay=[_earlier_sample(memory_dir)])
    spec = _spec(tmp_path / "run", data_file, model_dir, memory, 0.0)
    spec = spec.model_copy(update={"training": spec.training.model_copy(update={"max_steps": 2})})
    spec.save()
    assert run_in_process(spec)[0] == EXIT_COMPLETED
    assert not (tmp_path / "run" / REPLAY_META).exists() and not (tmp_path / "run" / REPLAY_DATA).exists()
