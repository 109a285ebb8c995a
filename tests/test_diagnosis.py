"""The job report's pure parts on hand-built series: each diagnosis rule firing and staying silent,
the settings diff, the time split, which plots a run gets, and the Markdown's escaping."""

from __future__ import annotations

import math

import pytest

from management import diagnosis
from management.diagnosis import GateFacts
from management.report_facts import JobFacts
from management.report_markdown import render
from management.report_plots import plan
from management.report_sections import RunSpan, TimeSplit, settings_diff, time_split
from management.run_series import EvalPoint, Series, TrainPoint, WarningPoint, parse_metrics
from trainbox.config import TrainingConfig
from trainbox.data_stats import DataStats, ExampleLoss, ExampleLosses

CFG = TrainingConfig(epochs=3)


def series(
    steps: int = 120,
    loss: object = None,
    val: object = None,
    eval_every: int = 10,
    lr: float = 2e-3,
    per_epoch: int = 40,
    warnings: list[WarningPoint] | None = None,
) -> Series:
    """Training loss and validation loss as functions of the step (defaults: both falling smoothly)."""
    loss_at = loss if callable(loss) else (lambda s: 3 * math.exp(-s / 30) + 0.1)
    val_at = val if callable(val) else (lambda s: 2 * math.exp(-s / 60) + 0.5)
    return Series(
        train=[TrainPoint(s, loss_at(s), lr, 1.0, 900.0, s / per_epoch, 1000.0 + s) for s in range(1, steps + 1)],
        evals=[EvalPoint(s, val_at(s), 1000.2 + s) for s in range(eval_every, steps + 1, eval_every)],
        warnings=warnings or [],
    )


def rules(s: Series, stats: DataStats | None = None, gate: GateFacts | None = None) -> dict[str, diagnosis.Finding]:
    return {f.rule: f for f in diagnosis.diagnose(s, CFG, stats, gate)}


def overfit_val(s: int) -> float:
    return 2.0 - s / 100 if s <= 40 else 1.6 + (s - 40) / 100


def test_overfitting_names_the_step_and_fewer_epochs() -> None:
    found = rules(series(val=overfit_val))
    f = found["overfitting"]
    assert f.summary.startswith("epochs 3 -> 1: validation loss rose after step 40 (1.6 -> 2.4 at step 120)")
    assert f.evidence["best_step"] == 40 and f.evidence["last_val_loss"] == pytest.approx(2.4)
    assert "plateau" not in found and "underfitting" not in found  # one verdict on the fit


def test_overfitting_fix_uses_max_steps_when_set() -> None:
    f = diagnosis.overfitting(series(val=overfit_val), TrainingConfig(max_steps=120))
    assert f is not None and f.fix.startswith("max_steps 120 -> 40")


def test_no_overfitting_when_validation_keeps_falling_or_training_rises_too() -> None:
    assert diagnosis.overfitting(series(), CFG) is None
    both_rise = series(val=overfit_val, loss=lambda s: 1.0 + s / 100)
    assert diagnosis.overfitting(both_rise, CFG) is None
    noise = series(val=lambda s: 1.0 + (0.005 if s % 20 == 0 else 0.0))  # rises within RISE: noise
    assert diagnosis.overfitting(noise, CFG) is None


def test_plateau_fires_after_evals_without_progress() -> None:
    flat_after_50 = series(val=lambda s: max(1.0, 2.0 - s / 50))
    f = rules(flat_after_50)["plateau"]
    assert "stopped improving after step 50" in f.summary and f.evidence["best_step"] == 50
    assert diagnosis.plateau(series(), CFG) is None  # still improving


def test_underfitting_when_still_improving_at_the_end() -> None:
    f = rules(series(val=lambda s: 3.0 - s / 50))["underfitting"]
    assert f.summary.startswith("epochs 3 -> 6: validation loss was still falling at the end")
    assert diagnosis.underfitting(series(val=lambda s: max(1.0, 2.0 - s / 50)), CFG) is None


def test_lr_too_high_from_rollbacks_spikes_or_divergence() -> None:
    spikes = [WarningPoint(5, "loss_spike"), WarningPoint(12, "grad_spike")]
    f = rules(series(warnings=spikes))["lr_too_high"]
    assert f.summary.startswith("learning_rate 0.002 -> 0.000667: 2 loss/gradient spikes in the first 30 steps")
    assert rules(series(warnings=[WarningPoint(70, "rollback")]))["lr_too_high"].evidence["unstable_steps"] == [70]
    assert "lr_too_high" in rules(series(loss=lambda s: 1.0 + s / 50))  # ended above where it began
    late = [WarningPoint(100, "loss_spike"), WarningPoint(110, "loss_spike")]  # late spikes: not the LR's start
    assert diagnosis.lr_too_high(series(warnings=late), CFG) is None


def test_lr_too_low_from_a_flat_loss_or_lr_near_zero_warnings() -> None:
    f = rules(series(loss=lambda s: 2.0 - s / 100_000))["lr_too_low"]
    assert f.summary.startswith("learning_rate 0.002 -> 0.006: training loss barely moved")
    near_zero = [WarningPoint(60, "lr_near_zero", "step 60: learning rate 1e-09 is near zero with 60 steps left")]
    assert rules(series(warnings=near_zero))["lr_too_low"].evidence["step"] == 60
    assert diagnosis.lr_too_low(series(), CFG) is None
    assert diagnosis.lr_too_low(series(steps=10, loss=lambda s: 2.0), CFG) is None  # too few steps to judge


def test_data_rules_fire_on_the_workers_counts() -> None:
    stats = DataStats(train_examples=80, dropped=4, truncated=30, longest=900, duplicates=20, short=40)
    found = {f.rule: f for f in diagnosis.data_problems(stats, CFG)}
    assert found["data_truncated"].summary.startswith("max_length 256 -> 900: 30 of 84 examples")
    assert found["data_dropped"].evidence == {"dropped": 4, "examples": 84}
    assert set(found) == {"data_dropped", "data_truncated", "data_duplicates", "data_short"}
    assert diagnosis.data_problems(DataStats(train_examples=80, truncated=2, duplicates=1, short=3), CFG) == []
    assert diagnosis.data_problems(None, CFG) == []


def test_never_learned_names_the_lines() -> None:
    bad = [ExampleLoss(line=n, loss=loss) for n, loss in ((19, 3.4), (7, 2.9), (33, 2.6))]  # worst first
    scored = ExampleLosses(scored=40, median=1.0, p25=0.8, p75=1.2, threshold=2.5, never_learned=bad)
    (f,) = diagnosis.never_learned(DataStats(train_examples=40, example_losses=scored))
    assert f.summary.startswith(
        "check lines 7, 19, 33: 3 of 40 training examples were never learned (final loss 2.6-3.4"
    )
    assert f.evidence["lines"] == [7, 19, 33]
    one = scored.model_copy(update={"never_learned": bad[:1]})  # one hard example is not a pattern
    assert diagnosis.never_learned(DataStats(example_losses=one)) == []
    many = scored.model_copy(update={"scored": 1000})  # 3 of 1000: under 1 %
    assert diagnosis.never_learned(DataStats(example_losses=many)) == []


def test_gate_refusal_says_why_and_what_to_do() -> None:
    gate = GateFacts(4, False, "new loss 2.2 above current 2.0 + tolerance", 2.2, 3, 2.0, 0.02, "eval.jsonl")
    f = rules(series(), gate=gate)["gate_refused"]
    assert "version 4 not promoted" in f.summary and "10.0% worse than version 3" in f.fix
    assert diagnosis.gate_refused(GateFacts(4, True, "promoted")) is None


def test_missing_inputs_are_named_not_guessed() -> None:
    assert any("nothing to diagnose" in m for m in diagnosis.missing(Series(), None))
    assert any("per-example losses" in m for m in diagnosis.missing(series(), DataStats()))
    assert diagnosis.diagnose(Series(), CFG, None, None) == []


def test_parse_metrics_tolerates_torn_lines_and_nan_strings() -> None:
    text = (
        '{"kind": "train", "step": 1, "loss": 2.0, "lr": 0.001, "epoch": 0.1, "time": 5.0}\n'
        '{"kind": "train", "step": 2, "loss": "nan", "skipped": true}\n'
        '{"kind": "eval", "step": 2, "val_loss": 1.5}\n'
        '{"kind": "warning", "step": 2, "warning": "non_finite", "message": "m"}\n'
        '{"kind": "train", "st'
    )
    s = parse_metrics(text)
    assert [(p.step, p.loss, p.skipped) for p in s.train] == [(1, 2.0, False), (2, None, True)]
    assert s.evals == [EvalPoint(2, 1.5)] and s.warnings[0].kind == "non_finite" and s.losses() == [(1, 2.0)]


def test_settings_diff_flattens_nested_tables() -> None:
    a = {"epochs": 3.0, "learning_rate": 0.0, "hybrid": {"history": 4}}
    b = {"epochs": 2.0, "learning_rate": 0.0, "hybrid": {"history": 8}, "lora": True}
    assert settings_diff(a, b) == [("epochs", 3.0, 2.0), ("hybrid.history", 4, 8), ("lora", None, True)]
    assert settings_diff(a, a) == []


def test_time_split_from_lines_and_checkpoint_events() -> None:
    runs = [RunSpan(1, 100.0, 200.0)]
    train = [(s, 110.0 + s) for s in range(1, 81)]  # first step line at 111: 11 s of start-up
    evals = [(40, 150.0 + 2.0), (80, 190.0 + 3.0)]  # 2 s and 3 s after their steps' lines
    checkpoints = [(80, 193.0 + 4.0)]  # 4 s after the eval line of its step
    split = time_split(runs, train, evals, checkpoints, processes=2)
    assert split.wall_s == 100.0 and round(split.process_hours, 4) == round(200 / 3600, 4)
    assert split.parts["evaluation"] == 5.0 and split.parts["checkpoints"] == 4.0
    assert split.parts["start-up (process start, loading, first step)"] == 11.0
    assert sum(split.parts.values()) == 100.0
    open_run = time_split([RunSpan(1, 100.0, None)], [], [], [], 1)
    assert open_run.wall_s == 0.0 and "without an end time" in open_run.notes[0]


def test_plots_only_for_recorded_series() -> None:
    assert [p.file for p, _, _ in plan(Series())] == []
    names = [p.file for p, _, _ in plan(series())]
    assert names == ["loss.png", "lr.png", "grad_norm.png", "tokens_per_s.png"]
    hybrid = Series(train=[TrainPoint(s, 1.0, skipped_share=0.1 * (s % 3)) for s in range(1, 11)])
    assert "hybrid_skipped.png" in [p.file for p, _, _ in plan(hybrid)]


def test_markdown_escapes_names_so_they_cannot_become_links_or_html() -> None:
    facts = JobFacts(job_id=3, name="[click](javascript:x) <img src=y> *x*", state="failed", error="boom | bad")
    text = render(facts, [], [], [], None, TimeSplit())
    assert "\\[click\\](javascript:x) \\<img src=y> \\*x\\*" in text and "boom \\| bad" in text


def test_the_hybrid_section_names_learned_early_and_never_learned_examples_by_line() -> None:
    summary = {
        "examples_skipped": 40,
        "skipped_share": 0.25,
        "learned_early": [{"line": 12, "example": 11, "skips": 3, "first_skipped": 40}],
        "never_learned": [{"line": 7, "example": 6, "loss": 3.21}, {"line": None, "example": 9, "loss": 2.5}],
    }
    text = render(JobFacts(job_id=3, name="a.jsonl", state="done", hybrid=summary), [], [], [], None, TimeSplit())
    section = text.split("## Hybrid engine", 1)[1]
    assert "examples\\_skipped = 40" in section or "examples_skipped = 40" in section
    assert "Learned early (skipped most): line 12 (3x)" in section
    assert "Never learned (highest last loss; often the file's bad data): line 7 (3.21), example 9 (2.5)" in section
    assert "first_skipped" not in section.split("Learned early")[0]  # the lists are not dumped into the numbers
