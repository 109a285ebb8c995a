"""Where does skipping learned examples save time? One optimizer step's cost, three ways (issue 16, step 2).

With batched matmuls, zeroing some rows' loss saves nothing: the rows are still computed. So the hybrid engine
must not run them at all. Two ways to decide which rows those are:
- ``table`` (option a): from the per-example loss table, before the forward: forward + backward of the kept rows
  only (their losses, measured by that same forward, refresh the table);
- ``fwd-all`` (option b, Selective-Backprop's own): a no-grad forward of every row to measure its loss, then
  forward + backward of the kept rows.
Against ``full``: forward + backward of every row. Each variant ends with the AdamW update (the same in all).
Variants alternate in every round (machine drift hits all); the table gives median seconds per step and the
ratio to ``full``, at kept shares 1/2 and 1/4.

Run: OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_skip_cost.py [--rounds 30] [--write]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_hybrid import make_records  # noqa: E402

from core.data import collate  # noqa: E402
from core.embedded import ensure_embedded_model  # noqa: E402
from core.encode import encode_all  # noqa: E402
from core.loss import batch_loss_sum, trained_positions  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--write", action="store_true", help="append the table to docs/BENCHMARKS.md")
    args = ap.parse_args()
    torch.set_flush_denormal(True)
    cpu = torch.device("cpu")
    folder = ensure_embedded_model(Path(tempfile.mkdtemp()) / "embedded")
    tok = AutoTokenizer.from_pretrained(folder)
    examples = encode_all(tok, make_records(4 * args.batch_size), args.max_length).examples
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    rows = examples[: args.batch_size]

    def train_on(part: list[int]) -> None:
        batch = collate([rows[i] for i in part], 0)
        loss = batch_loss_sum(model, batch, cpu) / max(trained_positions(batch["labels"]), 1)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def forward_all() -> None:
        with torch.no_grad():
            batch_loss_sum(model, collate(rows, 0), cpu)

    n = len(rows)
    variants: dict[str, Callable[[], None]] = {"full": lambda: train_on(list(range(n)))}
    for k in (n // 2, n // 4):
        kept = list(range(0, n, n // k))[:k]  # spread over the batch: the same lengths mix as the whole
        variants[f"table {k}/{n}"] = lambda kept=kept: train_on(kept)  # type: ignore[misc]
        variants[f"fwd-all {k}/{n}"] = lambda kept=kept: (forward_all(), train_on(kept))  # type: ignore[misc]
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(args.rounds + 2):
        for name, run in variants.items():
            t0 = time.perf_counter()
            run()
            if r >= 2:  # two warm-up rounds
                times[name].append(time.perf_counter() - t0)
    full = statistics.median(times["full"])
    lines = [
        f"Command: `OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_skip_cost.py --rounds {args.rounds} "
        f"--batch-size {args.batch_size} --max-length {args.max_length}` (embedded tiny model, CPU, "
        f"{torch.get_num_threads()} thread(s), {args.rounds} alternating rounds)",
        "",
        "| variant | median s/step | vs full |",
        "| --- | --- | --- |",
    ]
    for name, ts in times.items():
        med = statistics.median(ts)
        lines.append(f"| {name} | {med * 1000:.1f} ms | {full / med:.2f}x |")
    table = "\n".join(lines)
    print(table)
    if args.write:
        with (ROOT / "docs" / "BENCHMARKS.md").open("a") as f:
            f.write("\n## Skipping learned examples: where the saving comes from (hybrid engine, issue 16)\n\n")
            f.write(table + "\n")


if __name__ == "__main__":
    main()
