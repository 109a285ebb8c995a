"""Score models on a frozen evaluation set: ``python -m core.evaluate --model DIR ... --eval FILE``.

The eval gate's program: a child process the daemon starts and reaps like a worker
(``daemon/gate.py``), so neither the daemon nor ``management/`` ever loads torch. It uses the
trainer's own encoding, collation and loss (``core.encode``, ``core.data``, ``core.loss``,
read-only), so its number is the same quantity as the worker's validation loss: mean loss per
trained token. ``--run-dir R`` instead of ``--eval``
rebuilds the job's own held-out set from ``R/job.json`` exactly as the worker chose it.
Prints one JSON object: ``{"losses": {DIR: loss, ...}, "examples": N, "eval_set": ...}`` (and, with
``--out FILE``, writes it there atomically). ``--memory-set JOB:SHA:N`` (issue 17) also scores the new and
the current model on earlier jobs' memory sets (``management/memory.py``), within ``--memory-seconds``:
``"memory": [{"job_id", "sha256", "n", "new", "current"}, ...]``. ``$TRAINBOX_TEST_EVAL_SLEEP`` (tests only) sleeps that
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


class Scorer:
    """One model, loaded once (an adapter: base + adapter, merged), scoring any number of record lists."""

    def __init__(self, model_dir: Path) -> None:
        import torch
        from transformers import AutoTokenizer

        from core.encode import prepare_tokenizer
        from core.lora import load_causal_lm

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        prepare_tokenizer(self.tokenizer)
        self.model: Any = load_causal_lm(model_dir, dtype=torch.float32).to(self.device)
        self.model.eval()

    def __call__(self, records: list[Any], max_length: int, batch_size: int) -> float | None:
        from core.data import collate
        from core.encode import encode_all
        from core.loss import mean_loss

        examples = encode_all(self.tokenizer, records, max_length).examples
        if not examples:
            return None
        pad = self.tokenizer.pad_token_id
        batches = (collate(examples[i : i + batch_size], pad) for i in range(0, len(examples), batch_size))
        loss = mean_loss(self.model, batches, self.device)
        return loss if math.isfinite(loss) else None


def score(model_dir: Path, records: list[Any], max_length: int, batch_size: int) -> float | None:
    return Scorer(model_dir)(records, max_length, batch_size)


def memory_scores(scorers: list[Scorer], args: argparse.Namespace, max_length: int) -> list[dict[str, Any]]:
    """The new (first) and the current (second) model on each memory set (``--memory-set JOB:SHA:N``; the
    first is the new job's own, scored whole). The earlier sets share ``--memory-seconds``: each is scored on
    as many of its first examples as the speed measured so far allows in an equal share of what is left
    (a multiple of 8, at least 8), and the current model is not scored where ``--known SHA:N:LOSS`` gives its
    stored loss on exactly those examples."""
    from management.memory_files import read_set

    known = {(sha, int(n)): float(loss) for sha, n, loss in (k.split(":") for k in args.known)}
    tasks = [(int(j), sha, int(n)) for j, sha, n in (m.split(":") for m in args.memory_set)]
    out: list[dict[str, Any]] = []
    started, scored = time.monotonic(), 0
    for i, (job_id, sha, n) in enumerate(tasks):
        if i > 0 and scored:
            left = max(0.0, args.memory_seconds - (time.monotonic() - started))
            rate = scored / max(time.monotonic() - started, 1e-6)  # examples per second, one model
            fit = int(rate * left / (len(tasks) - i) / max(1, len(scorers)))
            n = n if fit >= n else min(n, max(8, fit // 8 * 8))
        records = read_set(Path(args.memory_dir), sha, n)
        row: dict[str, Any] = {"job_id": job_id, "sha256": sha, "n": len(records)}
        row["new"] = scorers[0](records, max_length, args.batch_size)
        scored += len(records)
        if len(scorers) > 1:
            if (sha, len(records)) in known:
                row["current"], row["current_stored"] = known[(sha, len(records))], True
            else:
                row["current"] = scorers[1](records, max_length, args.batch_size)
                scored += len(records)
        out.append(row)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m core.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True, type=Path, help="model folder (repeatable)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--eval", type=Path, help="frozen evaluation JSONL")
    source.add_argument("--run-dir", type=Path, help="a job's run folder: its own held-out set")
    parser.add_argument("--max-examples", type=int, default=256)
    parser.add_argument("--max-length", type=int, default=0, help="0: the job's max_length (or 256)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--memory-dir", type=Path, help="the home's memory/ folder (with --memory-set)")
    parser.add_argument("--memory-set", action="append", default=[], help="JOB:SHA256:N, the new job's own first")
    parser.add_argument("--known", action="append", default=[], help="SHA256:N:LOSS, the current model's stored")
    parser.add_argument("--memory-seconds", type=float, default=300.0, help="time budget of the earlier sets")
    parser.add_argument("--out", type=Path, help="also write the JSON object to this file")
    args = parser.parse_args(argv)
    if args.eval is None and args.run_dir is None and not args.memory_set:
        parser.error("one of --eval, --run-dir or --memory-set is required")
    time.sleep(float(os.environ.get("TRAINBOX_TEST_EVAL_SLEEP", "0") or 0))  # tests only: a slow gate

    import torch

    from trainbox.records import load_records

    threads = os.environ.get("OMP_NUM_THREADS", "")
    n = int(threads) if threads.isdigit() and int(threads) > 0 else max(1, (os.cpu_count() or 2) // 2)
    torch.set_num_threads(n)
    torch.set_flush_denormal(True)  # as the worker: tiny models hit denormals
    records: list[Any] = []
    job_len, eval_set = 256, "memory sets"
    if args.eval is not None:
        records, job_len = load_records(args.eval)[: args.max_examples], 256
        eval_set = str(args.eval)
    elif args.run_dir is not None:
        records, job_len = heldout_records(args.run_dir)
        eval_set = f"held-out set of {args.run_dir}"
    max_length = args.max_length or job_len
    scorers = [Scorer(m) for m in args.model]
    losses = {
        str(m): s(records, max_length, args.batch_size) if records else None
        for m, s in zip(args.model, scorers, strict=True)
    }
    report: dict[str, Any] = {"losses": losses, "examples": len(records), "eval_set": eval_set}
    if args.memory_set:
        report["memory"] = memory_scores(scorers, args, max_length)
    if args.out is not None:
        from trainbox.atomic import atomic_write_json

        atomic_write_json(args.out, report)
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
