"""The gate child's memory-set scoring (issue 17), in process on the embedded model: the new job's own set is
scored whole, the earlier sets are cut to the time budget (here none: 8 examples each), the current model's
stored score on exactly those examples is reused instead of scoring it again, and the verdict built from the
child's rows stores every measured loss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core import evaluate
from management.memory import record_line, write_set
from management.memory_gate import MemoryTask, judge_memory
from trainbox.records import Record


def _set(memory: Path, tag: str, n: int) -> str:
    rows = [Record(kind="text", text=f"{tag} sentence number {i} about the garden") for i in range(n)]
    return write_set(memory, [record_line(r) for r in rows])[0]


def test_child_scores_own_set_whole_cuts_earlier_sets_to_the_budget_and_reuses_stored(
    tmp_path: Path, embedded: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    memory = tmp_path / "memory"
    own, first, second = _set(memory, "own", 20), _set(memory, "first", 30), _set(memory, "second", 30)
    argv = ["--model", str(embedded), "--model", str(embedded), "--memory-dir", str(memory)]
    argv += ["--memory-set", f"3:{own}:20", "--memory-set", f"2:{second}:30", "--memory-set", f"1:{first}:30"]
    argv += ["--memory-seconds", "0", "--known", f"{first}:8:1.25", "--max-length", "32"]
    assert evaluate.main(argv) == 0
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["memory"]
    assert [(r["job_id"], r["n"]) for r in rows] == [(3, 20), (2, 8), (1, 8)]
    assert rows[0]["new"] == pytest.approx(rows[0]["current"])  # the same model twice
    assert rows[2]["current"] == 1.25 and rows[2]["current_stored"] is True  # reused, not scored
    assert "current_stored" not in rows[1] and rows[1]["current"] == pytest.approx(rows[1]["new"])

    tasks = [MemoryTask(3, "c", own, 20, True), MemoryTask(2, "b", second, 30, False)]
    tasks.append(MemoryTask(1, "a", first, 30, False))
    verdict, scores = judge_memory(tasks, rows, 0.25, new_id=5, current_id=4)
    assert not verdict.promoted and "did not improve" in verdict.reason  # the same model learned nothing
    stored = sorted((s.version_id, s.job_id, s.n_examples) for s in scores)
    assert stored == [(4, 2, 8), (4, 3, 20), (5, 1, 8), (5, 2, 8), (5, 3, 20)]  # v4 on job 1: reused, not stored
