"""Diagnostic for issue 3: can the hybrid engine bank the gain of weight averaging (the slow component of
the trajectory) as a jump?

On the benchmark's CPU profile (scripts/bench_hybrid.py: the embedded tiny Llama from scratch, the
generated data, the tuned lr 4e-3, 300 steps), one plain run keeps exponential moving averages of the
weights (half-lives of about 7, 14 and 34 steps: beta 0.9, 0.95, 0.98). Every 30 steps it measures the
validation loss of:
- the current weights (``cur``);
- each EMA (``ema B``): LAWA-style averaging, the denoised position on the trajectory;
- the slow-drift extrapolation ``ema_f + (H + lag_f) (ema_f - ema_s) / (lag_s - lag_f)`` (f 0.95, s 0.98, lag of an
  EMA ``b / (1 - b)`` steps): the drift of the low-frequency component continued ``H`` steps past now
  (exact for a linear trend);
- the current weights moved ``H`` steps along that drift (``cur+drift``).
In brackets: the plain steps each candidate is worth (the first later evaluation of the same run, every 5 steps,
whose loss is at or below the candidate's), or "worse".
Then two more runs continue training after the EMA 0.95 weights were written into the model (AdamW state kept):
once at step 140, and every 30 steps from 80, to see whether the gain persists.

Run: OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_averaging.py [--seed 0] [--write]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
# bench_hybrid sets the thread and offline environment before torch loads, and puts the project on the path
import bench_hybrid as bh
import torch

from core.data import collate
from core.events import EvalEvent, StepEvent
from core.train import Trainer
from trainbox.config import TrainingConfig

ROOT = bh.ROOT

BETAS = (0.9, 0.95, 0.98)
FAST, SLOW = 0.95, 0.98
HORIZONS = (5, 10, 20)
CPU = torch.device("cpu")


def lag(beta: float) -> float:
    """Steps an EMA trails a linear trend by."""
    return beta / (1 - beta)


class Averages:
    """EMAs of the trainable weights, updated after every step, and the candidates built from them."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        self.params = params
        self.ema = {b: [p.detach().clone() for p in params] for b in BETAS}

    def update(self) -> None:
        with torch.no_grad():
            for b in BETAS:
                torch._foreach_lerp_(self.ema[b], [p.detach() for p in self.params], 1 - b)

    def candidates(self) -> dict[str, list[torch.Tensor]]:
        f, s = self.ema[FAST], self.ema[SLOW]
        drift = [(a - b) / (lag(SLOW) - lag(FAST)) for a, b in zip(f, s, strict=True)]  # per step
        out = {f"ema {b}": self.ema[b] for b in BETAS}
        for h in HORIZONS:
            out[f"drift H{h}"] = [a + (h + lag(FAST)) * d for a, d in zip(f, drift, strict=True)]
        out["cur+drift H10"] = [p.detach() + 10 * d for p, d in zip(self.params, drift, strict=True)]
        return out


def loss_of(tr: Trainer, params: list[torch.Tensor], weights: list[torch.Tensor], batches: list[Any]) -> float:
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, w in zip(params, weights, strict=True):
            p.copy_(w)
    loss = tr.mean_loss(batches)
    with torch.no_grad():
        for p, w in zip(params, saved, strict=True):
            p.copy_(w)
    return loss


def run(
    prof: bh.Profile, data: tuple[list[Any], list[Any]], cfg: TrainingConfig, on_step: Callable[..., None]
) -> list[tuple[int, float]]:
    """One plain run; ``on_step(step, trainer, params, averages)`` after every optimizer step. Val curve."""
    tr = bh.make_trainer(prof, prof.init(cfg.seed), data, cfg, CPU)
    params: list[torch.Tensor] = [p for p in tr.model.parameters() if p.requires_grad]
    avg = Averages(params)
    curve: list[tuple[int, float]] = []

    def emit(ev: Any) -> None:
        if isinstance(ev, EvalEvent):
            curve.append((ev.step, ev.val_loss))
        elif isinstance(ev, StepEvent):
            avg.update()
            on_step(ev.step, tr, params, avg)

    tr.run(emit, lambda: False, lambda: Path("."))
    return curve


def worth(curve: list[tuple[int, float]], step: int, loss: float, current: float) -> str:
    if loss > current:
        return "worse"
    return next((str(s - step) for s, v in curve if s >= step and v <= loss), "> rest")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=4e-3, help="the tuned lr of bench_hybrid's sweep")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--write", action="store_true", help="append the tables to docs/BENCHMARKS.md")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    torch.set_flush_denormal(True)
    t0 = time.time()
    tmp = tempfile.TemporaryDirectory()
    prof = bh.Profile("tiny", Path(tmp.name))
    train, val = bh.dataset(prof.tok, 2400, 128, 96)  # the tiny profile's defaults (bh.PROFILE_DEFAULTS)
    val_batches = [collate(val[i : i + 16], prof.tok.pad_token_id) for i in range(0, len(val), 16)]
    cfg = bh.train_config(args.steps, 8, args.lr, 5, args.seed)

    # 1. candidates along one plain run
    rows: list[tuple[int, float, dict[str, float]]] = []

    def measure(step: int, tr: Trainer, params: list[torch.Tensor], avg: Averages) -> None:
        if step >= 50 and step % 30 == 20:
            cur = loss_of(tr, params, [p.detach() for p in params], val_batches)
            rows.append((step, cur, {k: loss_of(tr, params, w, val_batches) for k, w in avg.candidates().items()}))

    plain = run(prof, (train, val), cfg, measure)

    # 2. continue training from the averaged weights (the jump the engine would make)
    def jump_at(steps: set[int]) -> Callable[..., None]:
        def on_step(step: int, tr: Trainer, params: list[torch.Tensor], avg: Averages) -> None:
            if step in steps:
                with torch.no_grad():
                    for p, w in zip(params, avg.ema[FAST], strict=True):
                        p.copy_(w)

        return on_step

    once = run(prof, (train, val), cfg, jump_at({140}))
    every = run(prof, (train, val), cfg, jump_at(set(range(80, args.steps, 30))))

    names = list(rows[0][2])
    lines = [
        f"Command: `OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_averaging.py --seed {args.seed} --lr {args.lr:g} "
        f"--steps {args.steps}` ({time.time() - t0:.0f} s; {platform.machine()}, torch {torch.__version__}, 1 thread). "
        f"Validation loss (128 examples) of each candidate; in brackets the plain steps it is worth.",
        "",
        "| step | current | " + " | ".join(names) + " |",
        "| --- | --- | " + " | ".join("---" for _ in names) + " |",
    ]
    for step, cur, cands in rows:
        cells = [f"{cands[n]:.4f} ({worth(plain, step, cands[n], cur)})" for n in names]
        lines.append(f"| {step} | {cur:.4f} | " + " | ".join(cells) + " |")
    marks = [s for s in (140, 160, 180, 200, 240, 280, args.steps) if s <= args.steps]
    at = {name: dict(c) for name, c in (("plain", plain), ("once", once), ("every", every))}
    lines += [
        "",
        f"Training on from the EMA {FAST} weights (AdamW state kept), validation loss:",
        "",
        "| run | " + " | ".join(f"step {s}" for s in marks) + " |",
        "| --- | " + " | ".join("---" for _ in marks) + " |",
    ]
    for label, name in (("plain", "plain"), ("jump once at 140", "once"), ("jump every 30 from 80", "every")):
        lines.append(f"| {label} | " + " | ".join(f"{at[name][s]:.4f}" for s in marks) + " |")
    table = "\n".join(lines)
    print(table)
    if args.write:
        with open(ROOT / "docs" / "BENCHMARKS.md", "a", encoding="utf-8") as f:
            f.write("\n" + table + "\n")


if __name__ == "__main__":
    main()
