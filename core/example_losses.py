"""Which training examples the final model never learned: each one's loss under it, for the job report.

After a completed run, rank 0 of a single-process job scores the first ``MAX_SCORED`` training
examples (the same loss as training, per trained token, one number per example) and adds the ones far
above the rest to ``runs/job-N/data-stats.json`` (``trainbox/data_stats.py``), naming their lines;
``management/diagnosis.py`` turns them into a finding. It costs about one evaluation of that many
examples, with a heartbeat per batch. It never fails a job: any error is logged and the report says
the losses were not recorded.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from statistics import median
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from core.data import collate, model_inputs
from core.encode import IGNORE, Example
from trainbox.data_stats import DataStats, ExampleLoss, ExampleLosses

if TYPE_CHECKING:  # the hybrid engine imports per_example, and core.reporting imports the engine
    from core.reporting import Report

log = logging.getLogger("core.worker")

MAX_SCORED = 512  # examples scored: a bounded cost, about two evaluations of the default size
# never learned: a final loss far out among the rest (Tukey's outer fence, 3 interquartile ranges above
# the upper quartile) and 1.5 nats above the median (4.5x less likely per token than a typical example),
# so hard-but-ordinary examples of a uniform set are not named. Measured on a purpose-built job (README's
# arithmetic with 16 lines of gibberish completions): the 14 in the training set were exactly the ones
# above it (2.56-3.44 against a median of 1.03 and the next highest ordinary one at 2.0).
FENCE = 3.0
MARGIN = 1.5
MAX_LISTED = 200


@torch.no_grad()
def per_example(model: Any, batch: dict[str, torch.Tensor], device: torch.device) -> list[float]:
    """Mean next-token loss per trained token of each row of a padded batch."""
    logits = model(**model_inputs(batch, device)).logits.float()
    labels = batch["labels"].to(device)
    shifted = F.pad(labels[:, 1:], (0, 1), value=IGNORE)
    losses = F.cross_entropy(logits.transpose(1, 2), shifted, ignore_index=IGNORE, reduction="none")
    counts = (shifted != IGNORE).sum(dim=1).clamp(min=1)
    return (losses.sum(dim=1) / counts).tolist()  # type: ignore[no-any-return]


def score(
    model: Any,
    examples: list[Example],
    lines: list[int],
    pad_id: int,
    device: torch.device,
    batch_size: int,
    beat: Callable[[int, int], None] = lambda done, n: None,
) -> ExampleLosses:
    """The never-learned examples among the first ``MAX_SCORED``; ``beat(done, n)`` after each batch."""
    was_training = model.training
    model.eval()
    n = min(len(examples), MAX_SCORED)
    losses: list[float] = []
    for i in range(0, n, batch_size):
        losses += per_example(model, collate(examples[i : min(n, i + batch_size)], pad_id), device)
        beat(len(losses), n)
    model.train(was_training)
    mid = median(losses) if losses else 0.0
    q = sorted(losses)
    p25, p75 = (q[len(q) // 4], q[(3 * len(q)) // 4]) if q else (0.0, 0.0)
    threshold = max(p75 + FENCE * (p75 - p25), mid + MARGIN)
    bad = sorted(
        (ExampleLoss(line=lines[i] if i < len(lines) else i + 1, loss=round(loss, 4)) for i, loss in enumerate(losses)),
        key=lambda e: -e.loss,
    )
    return ExampleLosses(
        scored=len(losses),
        median=round(mid, 4),
        p25=round(p25, 4),
        p75=round(p75, 4),
        threshold=round(threshold, 4),
        never_learned=[e for e in bad if e.loss > threshold][:MAX_LISTED],
    )


def record(run_dir: Path, trainer: Any, lines: list[int], report: Report) -> None:
    """Score the run's training examples under its final weights into data-stats.json (boundary: logged)."""

    def beat(done: int, n: int) -> None:
        report.update(force=True, message=f"scoring training examples for the job report: {done}/{n}")

    try:
        stats = DataStats.load(run_dir) or DataStats()
        size = trainer.state.eval_size or trainer.cfg.batch_size
        with trainer.precision.autocast():
            scored = score(trainer.model, trainer.train_set, lines, trainer.pad_id, trainer.device, size, beat)
        stats.example_losses = scored
        stats.save(run_dir)
        log.info("scored %d training examples: %d never learned", scored.scored, len(scored.never_learned))
    except Exception as e:  # boundary: the report's extra never fails a job
        log.warning("could not score the training examples: %s", e)
