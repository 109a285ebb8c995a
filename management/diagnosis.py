"""What went wrong in a job and which setting to change: pure rules over what the run recorded.

Each rule is a function of the recorded series (``management/run_series.py``), the job's settings,
the worker's data counts (``trainbox/data_stats.py``) and the gate's verdict, and returns a
``Finding`` with the numbers that triggered it and the fix, or None. Nothing is guessed: a rule
that lacks what it needs stays silent, and what no run records (per-example losses on an older
worker, the forward/backward split) is named as missing rather than inferred. The thresholds are
constants here, not settings: they decide what a report says, never what trainbox does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from statistics import fmean

from management.run_series import EvalPoint, Series
from trainbox.config import TrainingConfig
from trainbox.data_stats import DataStats

RISE = 0.02  # validation loss this much above its best counts as rising (noise below)
IMPROVE = 0.01  # a new best must beat the old by this share to count as progress
PLATEAU_EVALS = 4  # evaluations without progress that make a plateau
FLAT = 0.02  # training loss falling less than this share over the run is "barely moving"
MIN_STEPS = 20  # fewer recorded steps than this: too little to judge the learning rate
EARLY = 0.25  # the first quarter of the run is "early" for spikes
DATA_SHARE = 0.10  # truncated or duplicate examples above this share are worth a finding
SHORT_SHARE = 0.25  # very short examples above this share
NEVER_LEARNED_MIN, NEVER_LEARNED_SHARE = 2, 0.01  # never-learned examples named from 2, and 1 % of those scored


@dataclass(frozen=True)
class Finding:
    rule: str
    summary: str  # one line a person acts on: the fix first, then why
    fix: str
    evidence: dict[str, float | int | str | list[int]] = field(default_factory=dict)


@dataclass(frozen=True)
class GateFacts:
    """The eval gate's verdict on the job's version (``version_gates`` row)."""

    version_id: int
    promoted: bool
    reason: str
    new_loss: float | None = None
    current_id: int | None = None
    current_loss: float | None = None
    tolerance: float = 0.0
    eval_set: str = ""


def _window(values: list[float], head: bool) -> float:
    """Mean of the first (or last) tenth, at least 3 values: one noisy step decides nothing."""
    n = max(3, len(values) // 10)
    return fmean(values[:n] if head else values[-n:])


def _train_loss_near(series: Series, step: int) -> float | None:
    """Mean training loss of the (up to) five recorded steps up to ``step``."""
    near = [loss for s, loss in series.losses() if s <= step][-5:]
    return fmean(near) if near else None


def _epoch_at(series: Series, step: int) -> float | None:
    before = [p.epoch for p in series.train if p.step <= step and p.epoch is not None]
    return before[-1] if before else None


def peak_lr(series: Series) -> float | None:
    rates = [p.lr for p in series.train if p.lr is not None]
    return max(rates) if rates else None


def _shorter(cfg: TrainingConfig, series: Series, step: int) -> str:
    """The setting that would have ended training at ``step``."""
    if cfg.max_steps > 0:
        return f"max_steps {cfg.max_steps} -> {step}"
    epoch = _epoch_at(series, step)
    if epoch is None:
        return "early_stop_on_overfit = true"
    whole = max(1, math.ceil(epoch))
    if whole < cfg.epochs:
        return f"epochs {cfg.epochs:g} -> {whole}"
    if epoch < cfg.epochs:
        return f"epochs {cfg.epochs:g} -> {max(0.1, round(epoch, 1)):g}"
    return "early_stop_on_overfit = true"


def _best(evals: list[EvalPoint]) -> EvalPoint:
    return min(evals, key=lambda e: (e.val_loss, e.step))


def overfitting(series: Series, cfg: TrainingConfig) -> Finding | None:
    """Validation loss rose after its best while training loss kept falling."""
    evals = series.evals
    if len(evals) < 3:
        return None
    best, last = _best(evals), evals[-1]
    after = [e for e in evals if e.step > best.step]
    if len(after) < 2 or last.val_loss <= best.val_loss * (1 + RISE):
        return None
    train_then, train_end = _train_loss_near(series, best.step), _train_loss_near(series, last.step)
    if train_then is None or train_end is None or train_end >= train_then:
        return None
    fix = _shorter(cfg, series, best.step)
    return Finding(
        "overfitting",
        f"{fix}: validation loss rose after step {best.step} ({best.val_loss:.4g} -> {last.val_loss:.4g} at step "
        f"{last.step}) while training loss fell ({train_then:.4g} -> {train_end:.4g})",
        f"{fix} (the model memorises the training data after step {best.step}), or more varied data",
        {
            "best_step": best.step,
            "best_val_loss": best.val_loss,
            "last_step": last.step,
            "last_val_loss": last.val_loss,
            "train_loss_at_best": round(train_then, 6),
            "train_loss_at_end": round(train_end, 6),
        },
    )


def plateau(series: Series, cfg: TrainingConfig) -> Finding | None:
    """No evaluation in the last ``PLATEAU_EVALS`` beat the best before them by ``IMPROVE``."""
    evals = series.evals
    if len(evals) <= PLATEAU_EVALS:
        return None
    before, recent = evals[:-PLATEAU_EVALS], evals[-PLATEAU_EVALS:]
    best_before = _best(before)
    if min(e.val_loss for e in recent) < best_before.val_loss * (1 - IMPROVE):
        return None
    fix = _shorter(cfg, series, best_before.step)
    return Finding(
        "plateau",
        f"{fix}: validation loss stopped improving after step {best_before.step} (best {best_before.val_loss:.4g}; "
        f"the last {PLATEAU_EVALS} evaluations, to step {recent[-1].step}, gained under {IMPROVE:.0%})",
        f"{fix} saves the time; to get lower, a higher learning_rate or a larger model",
        {
            "best_step": best_before.step,
            "best_val_loss": best_before.val_loss,
            "evals_without_progress": PLATEAU_EVALS,
            "last_val_loss": recent[-1].val_loss,
        },
    )


def underfitting(series: Series, cfg: TrainingConfig) -> Finding | None:
    """Still improving at the end: the last evaluation is the best and clearly beat the one before."""
    evals = series.evals
    if len(evals) < 2:
        return None
    prev, last = evals[-2], evals[-1]
    if _best(evals) != last or last.val_loss >= prev.val_loss * (1 - RISE):
        return None
    if cfg.max_steps > 0:
        fix = f"max_steps {cfg.max_steps} -> {cfg.max_steps * 2}"
    else:
        fix = f"epochs {cfg.epochs:g} -> {cfg.epochs * 2:g}"
    gain = 1 - last.val_loss / prev.val_loss
    return Finding(
        "underfitting",
        f"{fix}: validation loss was still falling at the end ({prev.val_loss:.4g} at step {prev.step} -> "
        f"{last.val_loss:.4g} at step {last.step}, {gain:.1%} better)",
        f"{fix}: more training should still help",
        {
            "prev_step": prev.step,
            "prev_val_loss": prev.val_loss,
            "last_step": last.step,
            "last_val_loss": last.val_loss,
        },
    )


def lr_too_high(series: Series, cfg: TrainingConfig) -> Finding | None:
    """Rollbacks, non-finite steps, early spikes, or a loss that ended above where it began."""
    peak = peak_lr(series)
    losses = [loss for _, loss in series.losses()]
    if peak is None:
        return None
    early_end = max(1, int(series.last_step * EARLY))
    spikes = [w.step for w in series.warnings_of("loss_spike", "grad_spike") if w.step <= early_end]
    unstable = [w.step for w in series.warnings_of("rollback", "non_finite")]
    diverged = len(losses) >= MIN_STEPS and _window(losses, head=False) > _window(losses, head=True) * 1.1
    if not (unstable or len(spikes) >= 2 or diverged):
        return None
    why = []
    if unstable:
        why.append(f"{len(unstable)} non-finite steps or rollbacks (first at step {unstable[0]})")
    if len(spikes) >= 2:
        why.append(f"{len(spikes)} loss/gradient spikes in the first {early_end} steps")
    if diverged:
        why.append(
            f"training loss ended higher than it began ({_window(losses, True):.4g} -> {_window(losses, False):.4g})"
        )
    fix = f"learning_rate {peak:.3g} -> {peak / 3:.3g}"
    return Finding(
        "lr_too_high",
        f"{fix}: " + "; ".join(why),
        f"{fix} (or a longer warmup_ratio, {cfg.warmup_ratio:g} now)",
        {"peak_lr": peak, "early_spike_steps": spikes[:10], "unstable_steps": unstable[:10], "diverged": int(diverged)},
    )


def lr_too_low(series: Series, cfg: TrainingConfig) -> Finding | None:
    """The learning rate reached near zero with steps left, or the training loss barely moved."""
    near_zero = series.warnings_of("lr_near_zero")
    peak = peak_lr(series)
    if near_zero:
        w = near_zero[0]
        return Finding(
            "lr_too_low",
            f"learning rate near zero from step {w.step} with steps left: {w.message}",
            f"min_lr_ratio {cfg.min_lr_ratio:g} -> 0.1 (after rollbacks: nan_lr_factor {cfg.nan_lr_factor:g} "
            "cut it; see the instability finding)",
            {"step": w.step, "warnings": len(near_zero)},
        )
    losses = [loss for _, loss in series.losses()]
    if peak is None or len(losses) < MIN_STEPS or series.warnings_of("loss_spike", "grad_spike", "rollback"):
        return None
    head, tail = _window(losses, True), _window(losses, False)
    if head <= 0 or (head - tail) / head >= FLAT:
        return None
    fix = f"learning_rate {peak:.3g} -> {peak * 3:.3g}"
    return Finding(
        "lr_too_low",
        f"{fix}: training loss barely moved ({head:.4g} -> {tail:.4g}, {(head - tail) / head:.1%} over "
        f"{len(losses)} recorded steps)",
        f"{fix}, unless the model already knows this data (then there is little left to learn)",
        {"peak_lr": peak, "loss_start": round(head, 6), "loss_end": round(tail, 6), "steps": len(losses)},
    )


def data_problems(stats: DataStats | None, cfg: TrainingConfig) -> list[Finding]:
    """From the worker's data counts: dropped, truncated, duplicate, very short, never learned."""
    if stats is None:
        return []
    out = []
    n = max(1, stats.train_examples + stats.dropped)
    if stats.dropped:
        out.append(
            Finding(
                "data_dropped",
                f"max_length {cfg.max_length} -> {max(cfg.max_length * 2, stats.longest)}: {stats.dropped} of {n} "
                "examples had nothing to train within max_length and were dropped",
                f"raise max_length, or shorten the prompts of those {stats.dropped} examples",
                {"dropped": stats.dropped, "examples": n},
            )
        )
    if stats.truncated / n > DATA_SHARE:
        out.append(
            Finding(
                "data_truncated",
                f"max_length {cfg.max_length} -> {stats.longest}: {stats.truncated} of {n} examples "
                f"({stats.truncated / n:.0%}) were cut at max_length (longest {stats.longest} tokens)",
                "raise max_length (memory grows with it) or split long examples",
                {"truncated": stats.truncated, "examples": n, "longest": stats.longest},
            )
        )
    if stats.duplicates / n > DATA_SHARE:
        out.append(
            Finding(
                "data_duplicates",
                f"remove duplicates: {stats.duplicates} of {n} training examples ({stats.duplicates / n:.0%}) repeat "
                "an earlier one",
                "deduplicate the file; repeated examples are learned by heart and weigh more than the rest",
                {"duplicates": stats.duplicates, "examples": n},
            )
        )
    if stats.short / n > SHORT_SHARE:
        out.append(
            Finding(
                "data_short",
                f"check the completions: {stats.short} of {n} examples ({stats.short / n:.0%}) train on at most "
                f"{stats.short_tokens} tokens",
                "very short targets teach little; check the data was exported whole",
                {"short": stats.short, "examples": n, "short_tokens": stats.short_tokens},
            )
        )
    out.extend(never_learned(stats))
    return out


def never_learned(stats: DataStats) -> list[Finding]:
    """Examples whose loss under the final model is still far above the rest's (the worker's threshold:
    ``trainbox/data_stats.py``), when they are a pattern: one hard example among hundreds is not a data
    problem (the README's arithmetic file has one: "5 plus 4", the only one-digit sum of its kind)."""
    scored = stats.example_losses
    if scored is None or len(scored.never_learned) < max(NEVER_LEARNED_MIN, NEVER_LEARNED_SHARE * scored.scored):
        return []
    bad = sorted(scored.never_learned, key=lambda b: b.line)
    lines = ", ".join(str(b.line) for b in bad[:12]) + (" ..." if len(bad) > 12 else "")
    low, high = min(b.loss for b in bad), max(b.loss for b in bad)
    return [
        Finding(
            "data_never_learned",
            f"check lines {lines}: {len(bad)} of {scored.scored} training examples were never learned (final loss "
            f"{low:.3g}-{high:.3g} per token against a median of {scored.median:.3g}; "
            f"threshold {scored.threshold:.3g})",
            "look at those lines: wrong answers, noise or another format than the rest; fix or remove them",
            {
                "never_learned": len(bad),
                "scored": scored.scored,
                "median": scored.median,
                "lines": [b.line for b in bad[:40]],
            },
        )
    ]


def gate_refused(gate: GateFacts | None) -> Finding | None:
    if gate is None or gate.promoted:
        return None
    evidence: dict[str, float | int | str | list[int]] = {"version": gate.version_id, "reason": gate.reason}
    if gate.new_loss is not None and gate.current_loss is not None:
        evidence |= {"new_loss": gate.new_loss, "current_loss": gate.current_loss, "tolerance": gate.tolerance}
        worse = gate.new_loss / gate.current_loss - 1 if gate.current_loss > 0 else 0.0
        fix = (
            f"the new model scores {worse:.1%} worse than version {gate.current_id} on "
            f"{gate.eval_set or 'the eval set'}: "
            "fix what the findings above name, or `trainbox models promote "
            f"{gate.version_id}` if that set does not matter for this data"
        )
    else:
        fix = f"see the reason; `trainbox models promote {gate.version_id}` makes it current by hand"
    return Finding("gate_refused", f"version {gate.version_id} not promoted: {gate.reason}", fix, evidence)


def diagnose(series: Series, cfg: TrainingConfig, stats: DataStats | None, gate: GateFacts | None) -> list[Finding]:
    """Every rule that fires, most specific first; overfitting, plateau and underfitting exclude each other."""
    out: list[Finding] = []
    fit = overfitting(series, cfg) or plateau(series, cfg) or underfitting(series, cfg)
    for finding in (fit, lr_too_high(series, cfg), lr_too_low(series, cfg)):
        if finding is not None:
            out.append(finding)
    out.extend(data_problems(stats, cfg))
    refused = gate_refused(gate)
    if refused is not None:
        out.append(refused)
    return out


def missing(series: Series, stats: DataStats | None) -> list[str]:
    """What the rules could not judge, and why: said instead of guessed."""
    out = []
    if not series.train:
        out.append("no training steps were recorded (metrics.jsonl is empty or missing): nothing to diagnose")
    elif len(series.evals) < 3:
        out.append(f"{len(series.evals)} evaluations recorded: over- and underfitting need 3 (lower eval_every)")
    if stats is None:
        out.append("no data counts (data-stats.json: written by workers since issue 19): data rules skipped")
    elif stats.example_losses is None:
        out.append("per-example losses were not recorded for this run: examples never learned are not judged")
    return out
