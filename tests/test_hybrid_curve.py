"""The hybrid engine's validation-curve model and stop rule (core.hybrid.curve) on synthetic curves, and the
schedule it cuts short (core.schedule.cut_lr_at)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from core.hybrid.curve import fit, measured_flat, plateau_step
from core.schedule import cut_lr_at, lr_at


def test_fit_recovers_a_power_law_and_predicts_ahead() -> None:
    steps = list(range(20, 220, 20))
    true = [0.8 + 2.0 * (t + 1) ** -0.7 for t in steps]
    curve = fit(steps, true)
    assert curve is not None and curve.kind == "power" and curve.points == len(steps)
    assert float(curve.value(1000)) == pytest.approx(0.8 + 2.0 * 1001**-0.7, rel=0.01)  # 5x past the data


def test_fit_recovers_an_exponential_with_noise() -> None:
    rng = np.random.default_rng(0)
    steps = list(range(0, 300, 25))
    true = [1.0 + 1.5 * np.exp(-t / 60) for t in steps]
    noisy = [y + 0.005 * rng.standard_normal() for y in true]
    curve = fit(steps, noisy)
    assert curve is not None
    assert curve.a == pytest.approx(1.0, abs=0.03)
    assert float(curve.value(600)) == pytest.approx(1.0 + 1.5 * np.exp(-10), abs=0.03)


def test_fit_needs_three_points_and_never_a_rising_curve() -> None:
    assert fit([10, 20], [1.0, 0.9]) is None
    assert fit([10, 10, 10], [1.0, 0.9, 0.8]) is None
    rising = fit([10, 20, 30, 40], [1.0, 1.1, 1.2, 1.3])
    assert rising is not None and rising.b == 0.0  # flat at the mean: no improvement predicted
    assert plateau_step(rising, 40, 400, 0.01) == 40


def test_plateau_step_is_where_the_remaining_gain_falls_below_the_tolerance() -> None:
    steps = list(range(10, 110, 10))
    curve = fit(steps, [1.0 + 2.0 * np.exp(-t / 30) for t in steps])
    assert curve is not None
    end = 1000
    stop = plateau_step(curve, 100, end, tolerance=0.01)
    gain = lambda t: float(curve.value(t) - curve.value(end))  # noqa: E731
    assert gain(stop) < 0.01 * float(curve.value(stop)) <= gain(stop - 1) + 1e-9
    assert 100 < stop < 300  # 2 e^(-t/30) < 0.01: t > 159
    assert plateau_step(curve, 100, end, tolerance=1e-12) > stop  # a stricter tolerance trains longer
    assert plateau_step(curve, 500, 400, 0.01) == 400  # nothing left to plan
    # a curve still falling steeply (0.01 per step, about 1 % of the loss) to the end of the plan: the remaining
    # gain drops below 1 % only in the last two steps
    steep = fit(steps, [3.0 - 0.01 * t for t in steps])
    assert steep is not None and plateau_step(steep, 100, 200, 0.01) >= 198


def test_measured_flat_needs_the_last_evaluations_to_have_stopped_improving() -> None:
    assert measured_flat([2.0, 1.5, 1.0, 0.995, 0.994, 0.993], points=4, tolerance=0.01)  # 0.7 % over the last 4
    assert not measured_flat([2.0, 1.5, 1.0, 0.98, 0.97, 0.96], points=4, tolerance=0.01)  # 4 %: still learning
    assert not measured_flat([1.0, 1.0], points=4, tolerance=0.01)  # too few evaluations
    assert measured_flat([1.0, 1.2, 1.1, 1.05], points=4, tolerance=0.01)  # worse than the start: flat


def test_cut_schedule_follows_the_cosine_then_decays_linearly_to_the_floor() -> None:
    total, peak = 100, 1e-3
    plain = [lr_at(s, total, peak, 0.1, 0.1) for s in range(total)]
    assert [cut_lr_at(s, total, peak, 0.1, 0.1, None) for s in range(total)] == plain  # no cut: the plain schedule
    lrs = [cut_lr_at(s, total, peak, 0.1, 0.1, (40, 20)) for s in range(total)]
    assert lrs[:40] == plain[:40]
    assert all(a > b for a, b in itertools.pairwise(lrs[39:60]))  # 20 steps down, faster than the cosine
    assert all(x < p for x, p in zip(lrs[40:60], plain[40:60], strict=True))
    assert lrs[59] == pytest.approx(0.1 * peak) and all(x == pytest.approx(0.1 * peak) for x in lrs[59:])
