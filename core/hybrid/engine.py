"""``HybridEngine`` (issue 16): predict which examples still need a backward pass, and when a run is done.

The Trainer runs the loop and every step (batches, accumulation, clipping, AdamW, NaN skips and rollbacks); the
engine decides, through hooks (``TrainerView`` is everything it uses of the Trainer):
- ``lr(step)``: the plain loop's warmup and cosine, cut short by a linear decay to the floor where the
  validation curve flattens (``curve.py``, ``core.schedule.cut_lr_at``); then the run stops;
- ``keep(indices)`` while the step's batches are built: in phase predict, the examples predicted learned
  (``selection.py``: low loss among the rest, measured recently) are left out of the step: no forward, no backward.
  So the saving is real compute, not zeroed rows of a batched matmul (scripts/bench_skip_cost.py measured both
  ways; docs/BENCHMARKS.md). The kept examples' gradient is their mean loss per trained token, as a full step's
  is; the step count and the schedule are unchanged, so a step trains fewer examples: Selective-Backprop with the
  learning rate as tuned for full batches;
- ``reads()``, with ``compact`` (off by default): Selective-Backprop as its paper measures it, compacted. A
  micro-batch whose kept examples fall short is filled from the micro-batches after it (``Lockstep.plan``; each
  read gets its own seeded draw), so every step trains a full batch of examples that still teach and an epoch
  takes fewer steps. The learning rate then follows the data, not the step count: the schedule's position is the
  micro-batches read over ``grad_accum`` (``progress()``; equal to the step while nothing is skipped), the curve's
  decay is placed on it, and the run ends once the job's planned epochs of data were read, in fewer steps than
  planned (or earlier, where the curve stop says so);
- ``start_step()`` / ``trained(plan, step)``: each forward pass hands back its per-position losses
  (``core.loss.staged_loss_sum``'s ``per_token``), mapped to examples (``rows.py``) and recorded in the loss table
  at no extra pass;
- ``before_step(emit)``: in phase correct, a forward-only re-measurement of a seeded sample of skipped examples;
  those whose loss rose come back (trained at their next turn) and the predictor's forgetting rate is recalibrated;
  and, with ``score_first``, once before the first step, a forward-only pass over the whole training set into the
  loss table (overhead), so skipping need not wait until the examples were trained once (a continual job's file
  repeats examples its starting model already learned);
- ``after_real_step(...)``: counters and phase transitions; ``after_eval(step, val, emit)``: the divergence
  monitor (``divergence.py``: a validation or re-measured loss that worsened restores the last good point, the
  weights and AdamW state at the best evaluation since skipping began), the bandit's reward for the interval
  (validation progress per second, or per unit of compute) and its next keep share, and the curve fit.
``state_dict()`` holds all of it (table, predictor, curve points, bandit, good point, phase, counters), and the
Trainer keeps it in its checkpoints, so a resumed run continues exactly.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, Protocol

import numpy as np
import torch

from core.data import Batches, collate
from core.distributed import StepPlan
from core.encode import Example
from core.example_losses import per_example
from core.hybrid import curve as curves
from core.hybrid import divergence
from core.hybrid.bandit import LinUCB
from core.hybrid.events import CorrectionEvent, CurveEvent, HybridEvent, RollbackEvent
from core.hybrid.goodpoint import GoodPoint
from core.hybrid.phases import Phase, PhaseMachine
from core.hybrid.rows import example_losses, owners
from core.hybrid.selection import LossTable, Rule, calibrate, select
from core.loss import example_trained
from core.schedule import cut_lr_at, warmup_steps
from trainbox.config import HybridConfig, TrainingConfig

STATE_VERSION = 2
FORGET_SMOOTHING = 0.5  # EMA weight of the previous forgetting rate at each correction
REWARD_CLIP = 3.0  # bandit rewards are progress rates relative to full steps', clipped to +-this
CURVE_POINTS = 24  # samples of the fitted curve in each CurveEvent (the dashboard's predicted line)
COMPACT_READS = 2.0  # compaction reads at most this / keep_share micro-batches to fill one (``reads``)
RECORD_LISTED = 20  # examples named in the summary's learned-early and never-learned lists


class StepCounter(Protocol):
    step: int
    epoch: int  # the data position: the next micro-batch is ``micro_batch`` of epoch ``epoch``
    micro_batch: int
    first_val_loss: float | None


class TrainerView(Protocol):
    """What the engine uses of ``core.train.Trainer``: public attributes, nothing private."""

    @property
    def model(self) -> torch.nn.Module: ...
    @property
    def optimizer(self) -> torch.optim.Optimizer: ...
    @property
    def device(self) -> torch.device: ...
    @property
    def pad_id(self) -> int: ...
    @property
    def cfg(self) -> TrainingConfig: ...
    @property
    def total_steps(self) -> int: ...
    @property
    def train_set(self) -> list[Example]: ...
    @property
    def batches(self) -> Batches: ...  # the micro-batches per epoch (compaction's schedule follows the data)
    @property
    def state(self) -> StepCounter: ...  # read only: the Trainer advances its own step and data position


@dataclass
class Counters:
    steps: int = 0  # training steps applied
    examples_trained: int = 0  # forward and backward passes (one per example)
    examples_skipped: int = 0  # predicted learned: no pass at all
    tokens_trained: int = 0  # trained positions of the examples trained
    tokens_skipped: int = 0  # trained positions of the examples skipped
    remeasured: int = 0  # forward-only re-measurements (correct phase)
    scored: int = 0  # forward-only measurements of the scoring pass before the first step (score_first)
    came_back: int = 0  # re-measured examples whose loss rose: trained again
    corrections: int = 0
    rollbacks: int = 0
    step_s: float = 0.0  # time in the Trainer's steps
    full_steps: int = 0  # steps with nothing skipped (their mean time is a plain step's)
    full_step_s: float = 0.0
    overhead_s: float = 0.0  # corrections, selection, curve fits, good-point copies
    extra_reads: int = 0  # micro-batches read to fill steps (compact): the steps the epochs no longer take


@dataclass
class Interval:
    """The stretch since the last evaluation: what the bandit is rewarded for."""

    val: float | None = None  # the validation loss it started from
    cost: float = 0.0  # seconds (bandit_cost wall) or compute units since
    arm: int | None = None  # the arm that ran it (None: full steps)
    context: list[float] | None = None
    skipped: int = 0  # examples skipped in it: only then can a worse validation loss be skipping's doing
    mixed: bool = False  # skipping began inside it: part full steps, part the arm's, so it rewards nothing


class HybridEngine:
    def __init__(self, trainer: TrainerView, cfg: HybridConfig, packed: bool = False) -> None:
        self.trainer, self.cfg, self.packed = trainer, cfg, packed
        train = trainer.train_set
        self.trained_tokens = np.asarray([example_trained(e) for e in train], dtype=np.int64)
        self.per_epoch = max(1, math.ceil(len(train) / trainer.cfg.batch_size / max(trainer.cfg.grad_accum, 1)))
        self.table = LossTable(len(train))
        self.machine = PhaseMachine(
            cfg.warmup_steps, cfg.full_steps, cfg.correct_every, cfg.cooldown_steps, cfg.max_cooldown_steps
        )
        self.bandit = LinUCB(cfg.keep_shares, dim=2, alpha=cfg.bandit_alpha)
        self.keep_share = 1.0
        self.forget_rate = 0.0
        self.counters = Counters()
        self.interval = Interval()
        self.ref_rate: float | None = None  # validation progress per cost unit of full steps
        self.good: GoodPoint | None = None
        self.best_val: float | None = None  # best validation loss since skipping began
        self.evals: list[tuple[int, float]] = []  # (step, val loss) after the lr warmup, before the decay
        self.curve: curves.CurveFit | None = None
        self.decay: tuple[int, int] | None = None  # (start, steps), once the curve said so
        self.expected_stop: int | None = None
        self.predicted_final: float | None = None
        self.stopped = ""  # why the engine ended the run early ("" while it did not)
        self.last_share = 0.0  # share of the last step's examples skipped
        self.scored = False  # the score_first pass ran (it runs once per run, resumed or not)
        self._per_token: list[torch.Tensor] = []

    # --- the hooks the Trainer calls ----------------------------------------------------------------

    @property
    def phase(self) -> str:
        return str(self.machine.phase)

    def lr(self, step: int) -> float:
        """The plain loop's warmup and cosine, cut short by a linear decay where the curve flattened; with
        ``compact``, at ``step`` plus the steps' worth of data that filled steps read ahead (``progress()``)."""
        tcfg = self.trainer.cfg
        at = step + self._lead()
        return cut_lr_at(
            at, self.trainer.total_steps, tcfg.learning_rate, tcfg.warmup_ratio, tcfg.min_lr_ratio, self.decay
        )

    def progress(self) -> int:
        """Where the schedule is: the step; with ``compact``, the micro-batches read so far over ``grad_accum`` (the
        step count a plain run would have reached on the same data; ahead of the step once steps were filled)."""
        s = self.trainer.state
        if not self.cfg.compact:
            return s.step
        return (s.epoch * self.trainer.batches.per_epoch + s.micro_batch) // max(self.trainer.cfg.grad_accum, 1)

    def reads(self) -> int:
        """The most micro-batches read to fill one configured micro-batch of the next step: 1 (no compaction, or
        nothing skipped), else twice what the keep share needs on average, so a run of learned examples cannot
        make one step read the epoch."""
        if not (self.cfg.compact and self.machine.skipping):
            return 1
        return max(1, math.ceil(COMPACT_READS / max(self.keep_share, 1e-6)))

    def keep(self, indices: list[int], draw: int = 0) -> list[int]:
        """The examples of one micro-batch of the step about to run that get their passes (all but in predict);
        ``draw``: which micro-batch the step reads it as (each has its own seeded draw)."""
        if not self.machine.skipping:
            return indices
        t0 = time.perf_counter()
        rule = Rule(self.keep_share, self.cfg.keep_floor, self._max_stale(), self.forget_rate, self.cfg.learned_below)
        step = self.trainer.state.step + 1
        kept = select(indices, self.table, step, self.trainer.cfg.seed, rule, draw=draw).kept
        self.counters.overhead_s += time.perf_counter() - t0
        return kept

    def start_step(self) -> list[torch.Tensor]:
        """A fresh list for the step's per-position losses (``staged_loss_sum``'s ``per_token``)."""
        self._per_token = []
        return self._per_token

    def trained(self, plan: StepPlan, step: int) -> None:
        """The step's update was applied: its examples' losses into the table, its skipped examples counted."""
        c = self.counters
        ids: list[int] = []
        sums: list[torch.Tensor] = []
        counts: list[torch.Tensor] = []
        for part, batch, token in zip(plan.rows, plan.passes, self._per_token, strict=False):
            own = owners([self.trainer.train_set[i] for i in part], batch["labels"], self.packed)
            s, n = example_losses(token, own, len(part))
            ids += part
            sums.append(s)
            counts.append(n)
        self._per_token = []
        if ids:
            n_all = torch.cat(counts)
            means = (torch.cat(sums).cpu() / n_all.clamp(min=1)).tolist()
            self.table.record(ids, [m if k > 0 else math.nan for m, k in zip(means, n_all.tolist(), strict=True)], step)
            self.table.trained(ids)
        self.table.mark_skipped(plan.skipped, step)
        c.examples_trained += len(ids)
        c.examples_skipped += len(plan.skipped)
        c.extra_reads += max(0, plan.reads - self.trainer.cfg.grad_accum)
        self.interval.skipped += len(plan.skipped)
        c.tokens_trained += int(self.trained_tokens[ids].sum()) if ids else 0
        c.tokens_skipped += int(self.trained_tokens[plan.skipped].sum()) if plan.skipped else 0
        self.last_share = len(plan.skipped) / max(len(ids) + len(plan.skipped), 1)
        if self.cfg.bandit_cost == "compute":
            self.interval.cost += 3 * float(self.trained_tokens[ids].sum()) if ids else 0.0

    def before_step(self, emit: Callable[[HybridEvent], None]) -> None:
        """At a step boundary: the scoring pass before the first step (``score_first``), the correction when one
        is due."""
        if self.cfg.score_first and not self.scored:
            self._score()
        if self.machine.phase == Phase.CORRECT:
            self._correct(emit)

    def after_real_step(self, loss: float, grad_norm: float, dt: float, emit: Callable[[HybridEvent], None]) -> None:
        """An applied (finite) step of ``dt`` seconds: counters, phase transitions, the stop."""
        c = self.counters
        c.steps += 1
        c.step_s += dt
        if self.last_share == 0.0:
            c.full_steps += 1
            c.full_step_s += dt
        if self.cfg.bandit_cost == "wall":
            self.interval.cost += dt
        before = self.machine.phase
        after = self.machine.on_step(self.table.coverage() >= self.cfg.min_coverage)
        if after == Phase.PREDICT and before != Phase.PREDICT and before != Phase.CORRECT:
            self._start_skipping()
        step = self.trainer.state.step  # the Trainer counted the step before this hook
        at = self.progress()
        if self.decay is not None and at >= sum(self.decay) and not self.stopped:
            self.stopped = (
                f"stopped early at step {step}: the validation curve flattened at step {self.decay[0]} "
                f"(predicted loss {self.predicted_final or math.nan:.4f}), then the learning rate decayed over "
                f"{self.decay[1]} steps" + (f" of data (compact: {at} steps' worth read)" if at != step else "")
            )
        elif self.cfg.compact and at >= self.trainer.total_steps and not self.stopped:
            self.stopped = (
                f"stopped at step {step}: the job's planned epochs of data were read (compact: filled steps, "
                f"{self.trainer.total_steps} planned)"
            )

    def stop_reason(self) -> str:
        return self.stopped

    def after_eval(self, step: int, val: float, emit: Callable[[HybridEvent], None]) -> None:
        """An evaluation at ``step``: the divergence check, the bandit's reward and next arm, the curve."""
        t0 = self.clock()
        skipping = self.good is not None and self.machine.phase in (Phase.PREDICT, Phase.CORRECT)
        judged = skipping and self.interval.skipped > 0
        verdict = divergence.evaluated(val, self.best_val, self.cfg.val_tol) if judged else None
        if verdict is not None:
            self._rollback(verdict, emit)
        elif skipping and (self.best_val is None or val <= self.best_val):
            self.best_val = val
            self.good = GoodPoint.take(step, self.trainer.model, self.trainer.optimizer)
        self._reward(step, val)
        self._fit_curve(step, val)
        if self.machine.phase in (Phase.PREDICT, Phase.CORRECT):
            self._choose(step)
        self.interval.val, self.interval.cost, self.interval.skipped = val, 0.0, 0
        self.counters.overhead_s += self.clock() - t0
        emit(
            CurveEvent(
                step,
                val,
                self.predicted_final,
                self.expected_stop,
                self.decay[0] if self.decay else None,
                self.keep_share,
                self.curve_points(),
            )
        )

    def after_rollback(self) -> None:
        """The Trainer rolled back (to a checkpoint or the start): skipping restarts after full steps."""
        self.machine.restart()
        self._per_token = []

    # --- what the user sees -------------------------------------------------------------------------

    def curve_points(self) -> tuple[tuple[int, float], ...]:
        """The fitted validation curve from its first point to the expected stop (the planned end before it)."""
        if self.curve is None or not self.evals:
            return ()
        end = self.expected_stop or self.trainer.total_steps
        steps = np.unique(np.linspace(self.evals[0][0], max(end, self.evals[0][0]), CURVE_POINTS).round())
        return tuple((int(s), round(float(self.curve.value(float(s))), 6)) for s in steps)

    def time_saved_s(self) -> float | None:
        """Estimated seconds saved so far: the steps done (and, after an early stop, the job's steps not run) at a
        full step's mean time, less the time spent in steps and overhead. Negative when the engine cost time."""
        c = self.counters
        if c.full_steps == 0:
            return None
        full = c.full_step_s / c.full_steps
        planned = self.trainer.total_steps if self.stopped else c.steps
        return planned * full - (c.step_s + c.overhead_s)

    def speedup_estimate(self) -> float | None:
        c = self.counters
        saved = self.time_saved_s()
        spent = c.step_s + c.overhead_s
        return None if saved is None or spent <= 0 else (spent + saved) / spent

    def step_fields(self, phase: str) -> dict[str, Any]:
        """The engine's fields of a ``StepEvent`` (core.events): the phase the step ran in, its skipped share."""
        return {
            "phase": phase,
            "skipped_share": self.last_share,
            "backward_skipped": self.counters.examples_skipped,
            "speedup_estimate": self.speedup_estimate(),
            "time_saved_s": self.time_saved_s(),
        }

    def summary(self, lines: Sequence[int] = ()) -> dict[str, Any]:
        """The engine's record of a run, for the job's ``hybrid_summary`` DB event: what it skipped and saved, why it
        stopped, and which examples it found learned early (skipped most) and never learned (highest last loss,
        often the file's bad data), each by its line in the job's file (``lines``: one per training example) and
        its index in the training set."""
        c = self.counters

        def line(i: int) -> int | None:
            return lines[i] if i < len(lines) else None

        shown = c.examples_trained + c.examples_skipped
        return {
            "steps": c.steps,
            "examples_trained": c.examples_trained,
            "examples_skipped": c.examples_skipped,
            "backward_skipped": c.examples_skipped,
            "skipped_share": round(c.examples_skipped / shown, 4) if shown else 0.0,
            "remeasured": c.remeasured,
            "scored": c.scored,
            "extra_reads": c.extra_reads,
            "came_back": c.came_back,
            "rollbacks": c.rollbacks,
            "overhead_s": round(c.overhead_s, 3),
            "time_saved_s": self.time_saved_s(),
            "speedup_estimate": self.speedup_estimate(),
            "stopped": self.stopped or "ran its planned steps",
            "decay_start": self.decay[0] if self.decay else None,
            "predicted_final": self.predicted_final,
            "learned_early": [
                {"line": line(i), "example": i, "skips": n, "first_skipped": s}
                for i, n, s in self.table.most_skipped(RECORD_LISTED)
            ],
            "never_learned": [
                {"line": line(i), "example": i, "loss": round(x, 4)} for i, x in self.table.highest_loss(RECORD_LISTED)
            ],
        }

    # --- pieces -------------------------------------------------------------------------------------

    def clock(self) -> float:
        """Seconds, after the device finished its queued work (on a GPU the engine's work runs asynchronously)."""
        if self.trainer.device.type == "cuda":
            torch.cuda.synchronize(self.trainer.device)
        return time.time()

    def _lead(self) -> int:
        """Steps' worth of data the filled steps read beyond the step count (0 without ``compact``)."""
        return max(0, self.progress() - self.trainer.state.step)

    def _max_stale(self) -> int:
        return max(1, math.ceil(self.cfg.max_stale_epochs * self.per_epoch))

    def _start_skipping(self) -> None:
        """Skipping begins: the weights now are full training's, the point a rollback returns to."""
        self.good = GoodPoint.take(self.trainer.state.step, self.trainer.model, self.trainer.optimizer)
        self._choose(self.trainer.state.step)
        self.interval.mixed = True

    def _choose(self, step: int) -> None:
        context = [1.0, step / max(self.trainer.total_steps, 1)]
        arm = self.bandit.choose(context)
        self.keep_share = self.bandit.arms[arm]
        self.interval.arm, self.interval.context = arm, context

    def _reward(self, step: int, val: float) -> None:
        """The interval that ended here: a full-step interval sets the reference rate, a skipping one rewards its arm
        with its progress rate relative to that reference."""
        iv = self.interval
        if iv.mixed:
            iv.mixed, iv.arm, iv.context = False, None, None
            return
        if iv.val is None or iv.cost <= 0:
            return
        rate = (iv.val - val) / iv.cost
        if iv.arm is None or iv.context is None:
            lr_warm = step > warmup_steps(self.trainer.total_steps, self.trainer.cfg.warmup_ratio)
            if lr_warm and rate > 0:
                self.ref_rate = rate
            return
        reward = rate / self.ref_rate if self.ref_rate else math.copysign(1.0, rate)
        self.bandit.update(iv.arm, iv.context, max(-REWARD_CLIP, min(REWARD_CLIP, reward)))
        iv.arm, iv.context = None, None

    def _fit_curve(self, step: int, val: float) -> None:
        """Fit the evaluations after the lr warmup; cut the schedule short where the curve has flattened."""
        total = self.trainer.total_steps
        if step <= warmup_steps(total, self.trainer.cfg.warmup_ratio) or self.decay is not None:
            return
        self.evals.append((step, val))
        if not self.cfg.curve_stop or len(self.evals) < self.cfg.curve_min_points:
            return
        fit = curves.fit([s for s, _ in self.evals], [v for _, v in self.evals])
        if fit is None:
            return
        self.curve = fit
        plateau = curves.plateau_step(fit, step, total, self.cfg.stop_tolerance)
        self.predicted_final = float(fit.value(float(plateau)))
        self.expected_stop = min(total, plateau + self._decay_length(plateau))
        flat = curves.measured_flat([v for _, v in self.evals], self.cfg.curve_min_points, self.cfg.stop_tolerance)
        first = self.trainer.state.first_val_loss
        learned = first is None or val < first * (1 - self.cfg.stop_tolerance)  # flat before any gain: not done
        at = step + self._lead()  # the schedule's position (compact: the data's)
        if flat and learned and plateau <= step and at + self._decay_length(at) < total:
            self.decay = (at, self._decay_length(at))

    def _decay_length(self, start: int) -> int:
        r = self.cfg.decay_ratio
        return max(1, math.ceil(r * start / (1 - r)))  # the decay is decay_ratio of the run's steps

    def _correct(self, emit: Callable[[HybridEvent], None]) -> None:
        """Re-measure a seeded sample of the skipped examples, forward only; bring back those whose loss rose."""
        t0 = self.clock()
        tr, cfg, c = self.trainer, self.cfg, self.counters
        step = tr.state.step
        candidates = self.table.skipped_since_measured()
        if len(candidates) == 0:
            self.machine.on_corrected()
            return
        rng = np.random.Generator(np.random.PCG64([tr.cfg.seed, step, 1]))
        pick = sorted(rng.choice(candidates, size=min(cfg.correct_examples, len(candidates)), replace=False).tolist())
        old = [float(self.table.loss[i]) for i in pick]
        ages = [int(step - self.table.step[i]) for i in pick]
        new = self._measure(pick)
        rate = calibrate(old, new, ages)
        if rate is not None:
            self.forget_rate = FORGET_SMOOTHING * self.forget_rate + (1 - FORGET_SMOOTHING) * rate
        back = [i for i, o, n in zip(pick, old, new, strict=True) if n > o * (1 + cfg.rise_tol)]
        self.table.record(pick, new, step)
        self.table.force[back] = True
        c.corrections += 1
        c.remeasured += len(pick)
        c.came_back += len(back)
        if cfg.bandit_cost == "compute":
            self.interval.cost += float(self.trained_tokens[pick].sum())
        verdict = divergence.remeasured(old, new, cfg.remeasure_tol)
        if verdict is not None:
            self._rollback(verdict, emit)
        else:
            self.machine.on_corrected()
        cost = self.clock() - t0
        c.overhead_s += cost
        if cfg.bandit_cost == "wall":
            self.interval.cost += cost
        emit(
            CorrectionEvent(
                step, len(pick), float(np.mean(old)), float(np.mean(new)), len(back), self.forget_rate, cost
            )
        )

    def _score(self) -> None:
        """``score_first``: every training example's loss under the starting weights, forward only, into the table,
        so that skipping can start after warmup_steps + full_steps rather than once min_coverage of the examples
        were trained. It pays where the file repeats what the model already learned (a continual job); its cost is
        the engine's overhead (and the bandit's first interval's). Measured in length order: less padding."""
        t0 = self.clock()
        ids = sorted(range(len(self.trained_tokens)), key=lambda i: (len(self.trainer.train_set[i].input_ids), i))
        losses = self._measure(ids)
        self.table.record(ids, losses, self.trainer.state.step)
        self.scored = True
        self.counters.scored += len(ids)
        if self.cfg.bandit_cost == "compute":
            self.interval.cost += float(self.trained_tokens.sum())
        cost = self.clock() - t0
        self.counters.overhead_s += cost
        if self.cfg.bandit_cost == "wall":
            self.interval.cost += cost

    def _measure(self, ids: Sequence[int]) -> list[float]:
        """Each example's loss per trained token under the current weights, no gradient."""
        tr = self.trainer
        model = tr.model
        was_training = model.training
        model.eval()
        out: list[float] = []
        size = tr.cfg.batch_size
        for i in range(0, len(ids), size):
            batch = collate([tr.train_set[j] for j in ids[i : i + size]], tr.pad_id)
            out += per_example(model, batch, tr.device)
        model.train(was_training)
        return out

    def _rollback(self, reason: str, emit: Callable[[HybridEvent], None]) -> None:
        """Restore the last good point, punish the arm that ran, and train full steps for a cooldown."""
        restored = -1
        if self.good is not None:
            self.good.restore(self.trainer.model, self.trainer.optimizer)
            restored = self.good.step
        iv = self.interval
        if iv.arm is not None and iv.context is not None:
            self.bandit.update(iv.arm, iv.context, -REWARD_CLIP)
        iv.arm, iv.context = None, None
        self.keep_share = 1.0
        self.counters.rollbacks += 1
        self.machine.fall_back()
        emit(RollbackEvent(self.trainer.state.step, reason, restored))

    # --- state ------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "config": self.cfg.model_dump(mode="json"),
            "machine": self.machine.state_dict(),
            "table": self.table.state_dict(),
            "bandit": self.bandit.state_dict(),
            "keep_share": self.keep_share,
            "forget_rate": self.forget_rate,
            "counters": asdict(self.counters),
            "interval": asdict(self.interval),
            "ref_rate": self.ref_rate,
            "good": self.good.state_dict() if self.good is not None else None,
            "best_val": self.best_val,
            "evals": [list(e) for e in self.evals],
            "curve": self.curve.state_dict() if self.curve is not None else None,
            "decay": list(self.decay) if self.decay is not None else None,
            "expected_stop": self.expected_stop,
            "predicted_final": self.predicted_final,
            "stopped": self.stopped,
            "last_share": self.last_share,
            "scored": self.scored,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"hybrid engine state version {state.get('version')!r}, expected {STATE_VERSION}")
        self.machine.load_state_dict(state["machine"])
        self.table.load_state_dict(state["table"])
        self.bandit.load_state_dict(state["bandit"])
        self.keep_share = float(state["keep_share"])
        self.forget_rate = float(state["forget_rate"])
        known = {f.name for f in fields(Counters)}
        self.counters = Counters(**{k: v for k, v in state["counters"].items() if k in known})
        self.interval = Interval(**state["interval"])
        self.ref_rate = state["ref_rate"]
        self.good = GoodPoint.from_state(state["good"], self.trainer.device) if state["good"] is not None else None
        self.best_val = state["best_val"]
        self.evals = [(int(s), float(v)) for s, v in state["evals"]]
        self.curve = curves.CurveFit(**state["curve"]) if state["curve"] is not None else None
        self.decay = (int(state["decay"][0]), int(state["decay"][1])) if state["decay"] is not None else None
        self.expected_stop = state["expected_stop"]
        self.predicted_final = state["predicted_final"]
        self.stopped = state["stopped"]
        self.last_share = float(state["last_share"])
        self.scored = bool(state.get("scored", False))
