"""Score models on a frozen evaluation set: ``python -m core.evaluate --model DIR ... --eval FILE``.

The eval gate's program: a child process the daemon starts and reaps like a worker
(``daemon/gate.py``), so neither the daemon nor ``management/`` ever loads torch. It uses the
trainer's own encoding, collation and loss (``core.encode``, ``core.data``, ``core.loss``,
read-only), so its number is the same quantity as the worker's validation loss: mean loss per
trained token. ``--run-dir R`` instead of ``--eval``
rebuilds the job's own held-out set from ``R/job.json`` exactly as the worker chose it.
Prints one JSON object: ``{"losses": {DIR: loss, ...}, "examples": N, "eval_set": ...}`` (and, with
``--out FILE``, writes it there atomically). ``$TRAINBOX_TEST_EVAL_SLEEP`` (tests only) sleeps that
many seconds first, to hold a gate open.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any


def heldout_records(run_dir: Path, data_file: Path | None = None) -> tuple[list[Any], int]:
    """The job's held-out set and max length; ``data_file``: where its file is now, if no longer where
    the spec says (a filed job's is in ``queue/done/``)."""
    from core.data import split_heldout
    from trainbox.jobspec import JobSpec
    from trainbox.records import load_records

    spec = JobSpec.load(run_dir)
    cfg = spec.training
    if spec.eval_file:
        return load_records(Path(spec.eval_file))[: cfg.eval_max_examples], cfg.max_length
    records = load_records(data_file or Path(spec.data_file))
    _train, val = split_heldout(records, cfg.eval_fraction, cfg.eval_max_examples, cfg.seed)
    return val, cfg.max_length


def score(model_dir: Path, records: list[Any], max_length: int, batch_size: int) -> float | None:
    import torch
    from transformers import AutoTokenizer

    from core.data import collate
    from core.encode import encode_all, prepare_tokenizer
    from core.lora import load_causal_lm
    from core.loss import mean_loss

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prepare_tokenizer(tokenizer)
    model: Any = load_causal_lm(model_dir, dtype=torch.float32).to(device)  # an adapter: base + adapter, merged
    model.eval()
    examples = encode_all(tokenizer, records, max_length).examples
    if not examples:
        return None
    pad = tokenizer.pad_token_id
    batches = (collate(examples[i : i + batch_size], pad) for i in range(0, len(examples), batch_size))
    loss = mean_loss(model, batches, device)
    return loss if math.isfinite(loss) else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m core.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True, type=Path, help="model folder (repeatable)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--eval", type=Path, help="frozen evaluation JSONL")
    source.add_argument("--run-dir", type=Path, help="a job's run folder: its own held-out set")
    parser.add_argument("--max-examples", type=int, default=256)
    parser.add_argument("--max-length", type=int, default=0, help="0: the job's max_length (or 256)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", type=Path, help="also write the JSON object to this file")
    args = parser.parse_args(argv)
    time.sleep(float(os.environ.get("TRAINBOX_TEST_EVAL_SLEEP", "0") or 0))  # tests only: a slow gate

    import torch

    from trainbox.records import load_records

    threads = os.environ.get("OMP_NUM_THREADS", "")
    n = int(threads) if threads.isdigit() and int(threads) > 0 else max(1, (os.cpu_count() or 2) // 2)
    torch.set_num_threads(n)
    torch.set_flush_denormal(True)  # as the worker: tiny models hit denormals
    if args.eval is not None:
        records, job_len = load_records(args.eval)[: args.max_examples], 256
        eval_set = str(args.eval)
    else:
        records, job_len = heldout_records(args.run_dir)
        eval_set = f"held-out set of {args.run_dir}"
    max_length = args.max_length or job_len
    losses = {str(m): score(m, records, max_length, args.batch_size) for m in args.model}
    report = {"losses": losses, "examples": len(records), "eval_set": eval_set}
    if args.out is not None:
        from trainbox.atomic import atomic_write_json

        atomic_write_json(args.out, report)
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
