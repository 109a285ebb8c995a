"""The pure parts of scripts/bench_continual.py: the forgetting arithmetic its verdict rests on, the
per-seed pairing of arms, the tables it writes, the home config it gives the daemon, and the job files
(deterministic, valid trainbox records, three different shapes)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return _load("bench_continual")


@pytest.fixture(scope="module")
def data() -> ModuleType:
    return _load("continual_data")


# L[i][j]: set i after job j
MATRIX: list[list[float | None]] = [[1.0, 3.0, 4.0], [None, 2.0, 2.5], [None, None, 1.5]]


def test_forgetting_is_later_minus_own_for_every_earlier_pair(bench: ModuleType) -> None:
    assert bench.forgetting_pairs(MATRIX) == [2.0, 3.0, 0.5]
    assert bench.mean_forgetting(MATRIX) == pytest.approx(5.5 / 3)


def test_forgetting_counts_an_improvement_as_negative(bench: ModuleType) -> None:
    assert bench.forgetting_pairs([[2.0, 1.5], [None, 1.0]]) == [-0.5]


def test_forgetting_refuses_a_missing_score_and_a_single_job(bench: ModuleType) -> None:
    with pytest.raises(ValueError, match="lacks a score"):
        bench.forgetting_pairs([[1.0, None], [None, 1.0]])
    with pytest.raises(ValueError, match="two jobs"):
        bench.mean_forgetting([[1.0]])


def test_reduction_is_the_share_of_plain_forgetting_removed(bench: ModuleType) -> None:
    assert bench.reduction(2.0, 1.0) == 0.5
    assert bench.reduction(2.0, 3.0) == -0.5  # replay forgetting more is a negative reduction, said as such
    with pytest.raises(ValueError, match="did not forget"):
        bench.reduction(0.0, 0.1)


def test_arm_order_rotates_per_seed(bench: ModuleType) -> None:
    arms = ["plain", "replay 0.2", "replay 0.1"]
    orders = [bench.rotated(arms, k) for k in range(3)]
    assert orders[1] == ["replay 0.2", "replay 0.1", "plain"]
    assert [o[0] for o in orders] == arms  # each arm runs first once


def _run(bench: ModuleType, share: float, seed: int, scale: float, train: list[float], steps: int = 90) -> Any:
    times = [
        bench.JobTimes(worker_s=t + 5, train_s=t, gate_s=0.5, steps=90 if k == 0 else steps)
        for k, t in enumerate(train)
    ]
    matrix = [[None if x is None else x * scale for x in row] for row in MATRIX]
    for i in range(3):
        matrix[i][i] = MATRIX[i][i]
    return bench.ArmRun(bench.arm_name(share), share, seed, ["a", "b", "c"], matrix, [7.0] * 3, times, [True] * 3)


def test_summary_pairs_each_arm_with_plain_of_the_same_seed(bench: ModuleType) -> None:
    runs = [
        _run(bench, 0.0, 0, 1.0, [5.0, 10.0, 10.0]),
        _run(bench, 0.2, 0, 0.5, [5.0, 12.0, 12.0], steps=99),
        _run(bench, 0.0, 1, 1.0, [5.0, 20.0, 20.0]),  # a slower seed: its ratio, not its seconds, counts
        _run(bench, 0.2, 1, 0.5, [5.0, 22.0, 22.0], steps=99),
    ]
    plain, replay = bench.summarise(runs)
    assert (plain.arm, replay.arm) == ("plain", "replay 0.2")
    assert plain.reduction is None and plain.train_ratio is None
    assert plain.forgetting == pytest.approx(5.5 / 3)
    assert replay.forgetting == pytest.approx((0.5 + 1.0 - 0.75) / 3)  # later losses halved, own ones kept
    assert replay.reduction == pytest.approx(1 - replay.forgetting / plain.forgetting)
    # jobs 2-3 only (job 1 has no past to replay): medians of 24/20 and 44/40
    assert replay.train_ratio == pytest.approx((1.2 + 1.1) / 2)
    assert replay.worker_ratio == pytest.approx((34 / 30 + 54 / 50) / 2)
    assert replay.steps_ratio == pytest.approx(1.1)
    assert replay.gate_s == 1.5 and replay.steps == [90, 99, 99]


def test_tables_render_every_arm_and_cell(bench: ModuleType) -> None:
    run = _run(bench, 0.0, 0, 1.0, [5.0, 10.0, 10.0])
    table = bench.matrix_table(run)
    lines = table.splitlines()
    assert lines[0] == "| held-out set | before | after 1. a | after 2. b | after 3. c |"
    assert lines[3] == "| 2. b | 7.000 | - | 2.000 | 2.500 |"
    rows = bench.summarise([run, _run(bench, 0.25, 0, 0.5, [5.0, 11.0, 11.0])])
    summary = bench.summary_table(rows).splitlines()
    assert len(summary) == 4 and summary[2].startswith("| plain | 1 |")
    assert "| replay 0.25 | 1 |" in summary[3] and "(1.10x)" in summary[3]


def test_home_config_loads_under_the_strict_settings(bench: ModuleType, tmp_path: Path) -> None:
    from trainbox.config import TrainingConfig, load_settings

    path = tmp_path / "trainbox.toml"
    path.write_text(bench.home_config(seed=3, share=0.0, max_length=64))
    settings = load_settings(path)
    assert settings.training.seed == 3 and settings.training.max_length == 64
    if "replay_share" in TrainingConfig.model_fields:
        path.write_text(bench.home_config(seed=3, share=0.25, max_length=64))
        assert load_settings(path).training.model_dump()["replay_share"] == 0.25


def test_job_files_are_deterministic_valid_and_different(data: ModuleType, tmp_path: Path) -> None:
    from trainbox.records import load_records

    kinds = set()
    for name, make in data.JOBS.items():
        rows = make(40, 0)
        assert rows == make(40, 0)
        assert rows != make(40, 1)
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        records = load_records(path)
        assert len(records) == 40
        kinds |= {r.kind for r in records}
    assert kinds == {"prompt_completion", "messages", "text"}


def test_arithmetic_answers_are_right(data: ModuleType) -> None:
    for row in data.arithmetic(50, 0):
        prompt = row["prompt"].removesuffix("=")
        op = "+" if "+" in prompt else "-"
        a, b = (int(x) for x in prompt.split(op))
        assert int(row["completion"]) == (a + b if op == "+" else a - b) >= 0


def test_saved_runs_load_back_equal(bench: ModuleType) -> None:
    from dataclasses import asdict

    run = _run(bench, 0.1, 2, 0.5, [5.0, 11.0, 11.0])
    assert bench.load_run(json.loads(json.dumps(asdict(run)))) == run


def test_verdict_names_both_time_measures_when_they_disagree(bench: ModuleType) -> None:
    row = bench.ArmSummary("replay 0.2", 3, 0.5, 0.6, 1.2, 1.3, 1.3, 10.0, 20.0, 0.1, [81, 108, 108])
    text = bench.verdict(row)
    assert text.startswith("forgetting cut by 60% at 1.20x the training time (1.30x the steps")
    assert text.endswith("holds on the measured time, not on the steps")
    halved_too_slow = bench.ArmSummary("replay 0.3", 3, 0.5, 0.9, 1.4, 1.4, 1.4, 10.0, 20.0, 0.1)
    assert bench.verdict(halved_too_slow).endswith("holds on neither the measured time nor the steps")
