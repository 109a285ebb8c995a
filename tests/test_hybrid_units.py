"""The hybrid engine's pure parts: extrapolation, acceptance, bandit, divergence, phases, state round trips."""

from __future__ import annotations

import math
import random

import pytest
import torch

from core.hybrid.acceptance import ProgressRate, judge
from core.hybrid.bandit import LinUCB
from core.hybrid.divergence import DivergenceMonitor
from core.hybrid.extrapolate import (
    TrajectoryPredictor,
    extrapolate_exponential,
    extrapolate_linear,
    linear_fit,
)
from core.hybrid.phases import Phase, PhaseMachine

# --- extrapolation --------------------------------------------------------------------------------


def test_linear_extrapolation_is_exact_on_a_line() -> None:
    start, slope = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    steps = [10, 15, 20, 25]
    snaps = [start + slope * t for t in steps]
    at_last, fitted = linear_fit(steps, snaps)
    torch.testing.assert_close(fitted, slope)
    torch.testing.assert_close(at_last, snaps[-1])
    torch.testing.assert_close(extrapolate_linear(steps, snaps, 40), start + slope * 65)


def test_linear_fit_averages_noise() -> None:
    g = torch.Generator().manual_seed(0)
    steps = list(range(0, 100, 5))
    true = [torch.full((2000,), 0.1 * t) for t in steps]
    noisy = [x + 0.5 * torch.randn(2000, generator=g) for x in true]
    pred = extrapolate_linear(steps, noisy, 10)
    err_fit = float((pred - 0.1 * 105).abs().mean())
    err_naive = float((noisy[-1] + (noisy[-1] - noisy[-2]) * 2 - 0.1 * 105).abs().mean())
    assert err_fit < 0.25 * err_naive


def test_exponential_extrapolation_is_exact_on_geometric_convergence() -> None:
    target, c = torch.randn(50, dtype=torch.float64), torch.randn(50, dtype=torch.float64)
    r = torch.rand(50, dtype=torch.float64) * 0.8 + 0.1  # per-element ratio per step in (0.1, 0.9)
    steps = [0, 2, 4]

    def theta(t: float) -> torch.Tensor:
        return target + c * r.pow(t)

    pred = extrapolate_exponential(steps, [theta(t) for t in steps], horizon=6)
    torch.testing.assert_close(pred, theta(10))
    far = extrapolate_exponential(steps, [theta(t) for t in steps], horizon=10_000)
    torch.testing.assert_close(far, target)


def test_exponential_falls_back_to_linear_where_not_convergent() -> None:
    steps = [0, 1, 2]
    snaps = [torch.tensor([0.0, 1.0]), torch.tensor([1.0, 1.0]), torch.tensor([2.0, 1.0])]  # linear; constant
    pred = extrapolate_exponential(steps, snaps, 3)
    torch.testing.assert_close(pred, torch.tensor([5.0, 1.0]))
    with pytest.raises(ValueError, match="equally spaced"):
        extrapolate_exponential([0, 1, 3], snaps, 1)


def test_predictor_ring_buffer_scale_and_state_round_trip() -> None:
    p = TrajectoryPredictor(history=3)
    w = [torch.zeros(3), torch.zeros(2, 2)]
    for t in range(5):
        p.add(t, [x + t for x in w])
    assert len(p) == 3 and p.steps == [2.0, 3.0, 4.0]
    pred = p.predict(2, "linear")
    torch.testing.assert_close(pred[0], torch.full((3,), 6.0))
    half = p.predict(2, "linear", scale=0.5)
    torch.testing.assert_close(half[1], torch.full((2, 2), 5.0))
    q = TrajectoryPredictor(history=2)
    q.load_state_dict(p.state_dict())
    assert q.history == 3 and q.steps == p.steps
    torch.testing.assert_close(q.predict(2, "exponential")[0], p.predict(2, "exponential")[0])
    p.add(1, w)  # time went backwards (a rollback): a new trajectory
    assert len(p) == 1 and not p.ready("linear")


# --- acceptance -----------------------------------------------------------------------------------


def test_judge_accepts_gain_and_converts_it_to_steps() -> None:
    v = judge(loss_before=2.0, loss_after=1.9, rate=0.01, horizon=20, cost_steps=1.5)
    assert v.accepted and v.reason == "accepted"
    assert v.earned_steps == pytest.approx(10.0)
    assert v.net_steps == pytest.approx(8.5)
    capped = judge(2.0, 1.0, rate=0.01, horizon=20, cost_steps=1.0)
    assert capped.earned_steps == 20
    plateau = judge(2.0, 1.99, rate=-0.001, horizon=7, cost_steps=1.0)
    assert not plateau.accepted and plateau.reason == "no_rate" and plateau.earned_steps == 0


@pytest.mark.parametrize(
    ("after", "rate", "reason"),
    [(2.1, 0.01, "no_gain"), (2.0, 0.01, "no_gain"), (1.9999, 0.01, "no_gain"), (1.9975, 0.01, "too_small"),
     (1.98, 0.01, "too_small"),  # worth 2 steps, cost 1.5: it does not pay for its probes by min_earned
     (1.9, 0.0, "no_rate"),
     (math.nan, 0.01, "not_finite"), (math.inf, 0.01, "not_finite")],
)  # fmt: skip
def test_judge_rejects(after: float, rate: float, reason: str) -> None:
    v = judge(2.0, after, rate, horizon=20, cost_steps=1.5)
    assert not v.accepted and v.reason == reason
    assert v.earned_steps == 0 and v.net_steps == -1.5


def test_progress_rate_smooths() -> None:
    r = ProgressRate(smoothing=0.5)
    r.observe(3.0, 2.0, 10)
    assert r.value == pytest.approx(0.1)
    r.observe(2.0, 1.9, 10)
    assert r.value == pytest.approx(0.055)
    r.observe(1.9, math.nan, 10)
    r.observe(1.9, 1.0, 0)
    assert r.value == pytest.approx(0.055)
    s = ProgressRate()
    s.load_state_dict(r.state_dict())
    assert s.value == r.value


# --- bandit ---------------------------------------------------------------------------------------


def test_linucb_converges_to_the_better_arm() -> None:
    rng = random.Random(0)
    arms = [(5.0, 1.0), (10.0, 1.0), (20.0, 1.0)]
    means = [0.1, 0.5, -0.3]
    bandit = LinUCB(arms, dim=2, alpha=0.5)
    picks = []
    for _ in range(300):
        ctx = [1.0, rng.random()]
        a = bandit.choose(ctx)
        picks.append(a)
        bandit.update(a, ctx, means[a] + rng.gauss(0, 0.3))
    assert picks[-100:].count(1) >= 90
    assert bandit.pulls[1] > bandit.pulls[0] and bandit.pulls[1] > bandit.pulls[2]


def test_linucb_uses_the_context() -> None:
    rng = random.Random(1)
    bandit = LinUCB([(1.0, 1.0), (2.0, 1.0)], dim=2, alpha=0.3)
    for _ in range(400):  # arm 0 pays early in training (x=0), arm 1 late (x=1)
        ctx = [1.0, float(rng.random() < 0.5)]
        a = bandit.choose(ctx)
        reward = (1.0 if ctx[1] == 0 else -1.0) if a == 0 else (1.0 if ctx[1] == 1 else -1.0)
        bandit.update(a, ctx, reward + rng.gauss(0, 0.1))
    assert bandit.choose([1.0, 0.0]) == 0 and bandit.choose([1.0, 1.0]) == 1
    copy = LinUCB([(9.0, 9.0)], dim=2)
    copy.load_state_dict(bandit.state_dict())
    assert copy.arms == bandit.arms and copy.scores([1.0, 0.5]) == bandit.scores([1.0, 0.5])
    with pytest.raises(ValueError, match="shape"):
        bandit.choose([1.0])


# --- divergence -----------------------------------------------------------------------------------


def test_divergence_triggers() -> None:
    m = DivergenceMonitor(warmup=5)
    assert m.observe(math.nan, 1.0) == "not_finite"
    assert m.observe(1.0, math.inf) == "not_finite"
    assert m.observe(50.0, 1.0) is None  # no spike checks before warmup
    m = DivergenceMonitor(warmup=5)
    for i in range(20):
        assert m.observe(2.0 - 0.01 * i + 0.01 * (i % 2), 1.0 + 0.05 * (i % 3)) is None
    assert m.observe(5.0, 1.0) == "loss_spike"
    assert m.observe(1.8, 50.0) == "grad_spike"
    assert m.observe(1.8, 1.0) is None  # spikes were not folded into the statistics
    assert m.check_prediction(2.0, 2.05) is None
    assert m.check_prediction(2.0, 2.2) == "prediction_error"
    assert m.check_prediction(2.0, math.nan) == "not_finite"
    assert m.triggers == {"loss_spike": 1, "grad_spike": 1, "prediction_error": 1, "not_finite": 1}
    n = DivergenceMonitor()
    n.load_state_dict(m.state_dict())
    assert n.loss.mean == m.loss.mean and n.grad.count == m.grad.count and n.triggers == m.triggers
    assert n.observe(5.0, 1.0) == "loss_spike"


# --- phases ---------------------------------------------------------------------------------------


def test_phase_cycle_warmup_full_predict_correct() -> None:
    m = PhaseMachine(warmup_steps=3, full_steps=2, fallback_after=2, cooldown=4, max_cooldown=8)
    assert [m.on_real_step(True) for _ in range(3)] == [Phase.WARMUP, Phase.WARMUP, Phase.FULL]
    assert m.snapshotting
    assert m.on_real_step(False) == Phase.FULL
    assert m.on_real_step(False) == Phase.FULL  # predictor not ready: keep stepping
    assert m.on_real_step(True) == Phase.PREDICT
    with pytest.raises(RuntimeError):
        m.on_real_step(True)
    assert m.on_jump() == Phase.CORRECT
    assert m.on_verdict(True, 5.0) == Phase.FULL
    m.on_real_step(True)
    assert m.on_real_step(True) == Phase.PREDICT


def test_phase_falls_back_to_plain_and_cooldown_doubles() -> None:
    m = PhaseMachine(warmup_steps=0, full_steps=1, fallback_after=2, cooldown=3, max_cooldown=5)
    assert m.phase == Phase.FULL

    def reject() -> Phase:
        assert m.on_real_step(True) == Phase.PREDICT
        m.on_jump()
        return m.on_verdict(False, -1.0)

    assert reject() == Phase.FULL
    assert reject() == Phase.PLAIN and m.current_cooldown == 3
    assert [m.on_real_step(True) for _ in range(3)] == [Phase.PLAIN, Phase.PLAIN, Phase.FULL]
    reject()
    assert reject() == Phase.PLAIN and m.current_cooldown == 5  # doubled, capped
    for _ in range(5):
        m.on_real_step(True)
    assert m.on_real_step(True) == Phase.PREDICT
    m.on_jump()
    m.on_verdict(True, 4.0)  # a paying attempt resets the cooldown
    assert m.current_cooldown == 0 and m.fallbacks == 2


def test_phase_falls_back_when_accepted_attempts_lose_time() -> None:
    m = PhaseMachine(warmup_steps=0, full_steps=1, fallback_after=3, cooldown=2)
    for _ in range(3):
        m.on_real_step(True)
        m.on_jump()
        m.on_verdict(True, -0.5)  # accepted, but earned less than it cost
    assert m.phase == Phase.PLAIN


def test_phase_state_round_trip() -> None:
    m = PhaseMachine(warmup_steps=1, full_steps=1, fallback_after=1, cooldown=7)
    m.on_real_step(True)
    m.on_real_step(True)
    m.on_jump()
    m.on_verdict(False, -2.0)
    n = PhaseMachine()
    n.load_state_dict(m.state_dict())
    assert n == m and n.phase is Phase.PLAIN
