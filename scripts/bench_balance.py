"""Token-balanced micro-batches (``training.balance_tokens``) against plain ones: what they cost in learning.

One epoch of bench_defaults' long-tailed file (600 examples, 60 more held out for validation) on the embedded
model, lr 2e-3, batch 8, with ``balance_tokens`` on and off for each seed, alternating which goes first, in one
process; prints each run's validation loss, wall time and the order kind, then the per-seed difference. Both
sides see the same shuffled order each epoch: only where the micro-batches are cut differs.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_balance.py --seeds 1,2,3,4
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="1,2,3,4")
    args = ap.parse_args()
    import torch
    from bench_defaults import make_data

    from core.embedded import ensure_embedded_model
    from core.encode import Example
    from core.loading import load_model
    from core.train import Trainer
    from trainbox.config import TrainingConfig

    torch.set_flush_denormal(True)
    torch.set_num_threads(1)
    cpu = torch.device("cpu")
    with tempfile.TemporaryDirectory(prefix="tb-bench-balance-") as tmp:
        model_dir = ensure_embedded_model(Path(tmp) / "model")
        data = make_data(model_dir, 660, 256, 48.0, 1234)
        examples = [Example(ids, labels) for ids, labels in data["examples"]]
        train, val = examples[:600], examples[600:]
        val_loss: dict[tuple[int, bool], float] = {}
        for k, seed in enumerate(int(s) for s in args.seeds.split(",")):
            for balance in (True, False) if k % 2 == 0 else (False, True):
                cfg = TrainingConfig(
                    epochs=1, learning_rate=2e-3, eval_every=0, checkpoint_every=0, seed=seed, balance_tokens=balance
                )
                model, _ = load_model(model_dir, cpu)
                trainer = Trainer(model, cfg, train, val, data["pad_id"], cpu)
                t0 = time.perf_counter()
                trainer.run(lambda e: None, lambda: False, lambda: Path("."))
                wall = time.perf_counter() - t0
                val_loss[seed, balance] = trainer.evaluate()
                print(
                    f"seed {seed} {trainer.batches.order_kind:15s} {trainer.total_steps} steps "
                    f"{wall:5.1f} s  val loss {val_loss[seed, balance]:.4f}",
                    flush=True,
                )
    for seed in sorted({s for s, _ in val_loss}):
        on, off = val_loss[seed, True], val_loss[seed, False]
        print(f"seed {seed}: balanced {on:.4f} plain {off:.4f} ({100 * (on / off - 1):+.1f} %)")


if __name__ == "__main__":
    main()
