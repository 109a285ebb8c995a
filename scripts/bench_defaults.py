"""Benchmark: one epoch of a realistic file, trainbox with its defaults vs Hugging Face ``Trainer`` set up
the way its documentation recommends (issue 15, item 6).

``scripts/bench_throughput.py`` gives both loops the very same padded batches, so it measures loop
overhead alone. A user does not train that way: they drop a file whose examples range from a few
tokens to the max length (chat and instruction data are long-tailed), and the loop they would
otherwise run pads each batch to its longest example. This benchmark is that comparison:

- data: ``--examples`` examples drawn once, the same for every side: lengths from a log-normal
  distribution (median ``--median-tokens``, sigma 1.0) clipped to [8, max_length] tokens, half plain
  text (every token trained), half chat (assistant turns trained; the prompt masked), encoded by
  ``core.encode`` (so both sides train exactly the same ids and labels);
- ``trainbox``: ``core.train.Trainer`` with ``TrainingConfig`` defaults for everything but the
  profile's model, learning rate and LoRA, one epoch, batch 8 (the default), no evaluation or
  checkpoints (neither side evaluates or saves): whatever the defaults are (packing, length-aware
  batching, chunked loss, fused AdamW, compilation policy) is what runs;
- ``hf``: ``transformers.Trainer`` with ``DataCollatorForSeq2Seq(padding="longest",
  label_pad_token_id=-100)`` (dynamic padding to the longest example of each batch; the collator HF's
  examples use when labels are given, as in instruction tuning where the prompt is masked), the same
  learning rate, batch and epochs, ``weight_decay=0.01`` as the causal-LM guide sets it, HF's defaults
  otherwise (its fused AdamW, linear schedule, its random sampler);
- ``hf-grouped``: the same with ``train_sampling_strategy="group_by_length"`` (transformers 5's name for
  ``group_by_length=True``: its best documented option for varied lengths).

Measured per side, in a fresh process each, rounds alternating the side order: wall-clock of the
``train`` call (time to finish the epoch, from the call to its return), real (non-pad) tokens per
second over it, peak memory of the training phase (CPU: peak RSS reset after loading; CUDA: allocator
peak), and the mean training loss over the epoch (they must agree within noise: a faster run that
learns less is not faster). The table reports medians and paired ratios (trainbox / each HF side).

Run (CPU):  OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_defaults.py --write
Run (CUDA): .venv/bin/python scripts/bench_defaults.py --device cuda --write
``--write`` replaces the section "## One epoch of a realistic file: trainbox defaults vs HF Trainer
(issue 15)" of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_throughput import DEFAULT_CACHE, PeakMemory, bench_records, paired_ratio, replace_section  # noqa: E402

SECTION = "One epoch of a realistic file: trainbox defaults vs HF Trainer (issue 15)"
SIDES = ("trainbox", "hf", "hf-grouped")


@dataclass(frozen=True)
class Profile:
    name: str
    model: str  # "tiny" (the embedded model) or "smollm2"
    lora: bool
    learning_rate: float
    examples_cpu: int
    examples_cuda: int


PROFILES = {
    p.name: p
    for p in (
        Profile("tiny", "tiny", False, 2e-3, 600, 4000),
        Profile("smollm2-lora", "smollm2", True, 2e-4, 64, 2000),
        Profile("smollm2-full", "smollm2", False, 5e-5, 48, 2000),
    )
}


# --- data (pure parts unit-testable) ---------------------------------------------------------------


def draw_lengths(n: int, max_length: int, median: float, seed: int) -> list[int]:
    """Long-tailed example lengths in tokens: log-normal around ``median``, clipped to [8, max_length]."""
    rng = random.Random(seed)
    return [max(8, min(max_length, round(rng.lognormvariate(math.log(median), 1.0)))) for _ in range(n)]


def cut(ids: list[int], labels: list[int], length: int) -> tuple[list[int], list[int]] | None:
    """An example cut to ``length`` tokens; None when no trained label is left (a chat cut inside its prompt)."""
    ids, labels = ids[:length], labels[:length]
    return (ids, labels) if any(x != -100 for x in labels[1:]) else None


def make_data(model_dir: Path, n: int, max_length: int, median: float, seed: int) -> dict[str, Any]:
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from core.encode import encode_all, prepare_tokenizer

    hf_logging.set_verbosity_error()
    tok = AutoTokenizer.from_pretrained(model_dir)
    prepare_tokenizer(tok)
    lengths = draw_lengths(n, max_length, median, seed)
    pool = encode_all(tok, bench_records(2 * n + 32, max_length, seed), max_length).examples
    out: list[list[list[int]]] = []
    for e in pool:
        if len(out) == n:
            break
        got = cut(list(e.input_ids), list(e.labels), lengths[len(out)])
        if got is not None:
            out.append([got[0], got[1]])
    if len(out) < n:
        raise RuntimeError(f"only {len(out)} of {n} examples kept a trained token")
    return {"pad_id": tok.pad_token_id, "examples": out}


# --- one side, in its own process ------------------------------------------------------------------


@dataclass
class ChildSpec:
    side: str
    profile: str
    model_dir: str
    data_file: str
    result_file: str
    device: str
    threads: int
    learning_rate: float
    lora: bool
    max_length: int
    seed: int


@dataclass
class SideResult:
    side: str
    profile: str
    wall_s: float
    cpu_s: float
    steps: int
    tokens: int  # non-pad tokens trained in the epoch
    mean_loss: float
    peak_bytes: int
    base_bytes: int
    memory_kind: str
    settings: str  # what the side ran with, in words


def child(spec: ChildSpec) -> SideResult:
    from core import rng
    from core.encode import Example
    from core.loading import apply_lora, load_model
    from trainbox.config import TrainingConfig

    torch.set_num_threads(spec.threads)
    torch.set_flush_denormal(True)  # as the worker does; the HF side gets the same process setting
    device = torch.device(spec.device)
    cfg = TrainingConfig(
        epochs=1,
        max_length=spec.max_length,
        learning_rate=spec.learning_rate,
        lora=spec.lora,
        eval_every=0,
        checkpoint_every=0,
        seed=spec.seed,
        device=spec.device,
        threads=spec.threads,
    )
    rng.seed_all(cfg.seed)
    model, tokenizer = load_model(Path(spec.model_dir), device)
    if cfg.lora:
        model, _ = apply_lora(model, cfg, Path(spec.model_dir))
    data = json.loads(Path(spec.data_file).read_text())
    if tokenizer.pad_token_id != data["pad_id"]:
        raise RuntimeError(f"pad id {tokenizer.pad_token_id} != the encoding's {data['pad_id']}")
    examples = [Example(ids, labels) for ids, labels in data["examples"]]
    tokens = sum(len(e.input_ids) for e in examples)
    mem = PeakMemory(device)
    if spec.side == "trainbox":
        wall, cpu, steps, loss, settings = _trainbox(model, cfg, examples, data["pad_id"], device, mem)
    else:
        wall, cpu, steps, loss, settings = _hf(model, cfg, examples, tokenizer, device, mem, spec.side)
    return SideResult(spec.side, spec.profile, wall, cpu, steps, tokens, loss, mem.peak(), mem.base, mem.kind, settings)


def _trainbox(model: Any, cfg: Any, examples: list[Any], pad_id: int, device: torch.device, mem: PeakMemory) -> Any:
    from core.events import StepEvent
    from core.train import Trainer

    trainer = Trainer(model, cfg, examples, [], pad_id, device)
    losses: list[float] = []

    def emit(ev: Any) -> None:
        if isinstance(ev, StepEvent) and not ev.skipped:
            losses.append(ev.loss)

    mem.start()
    t0, c0 = time.perf_counter(), time.process_time()
    outcome = trainer.run(emit, lambda: False, lambda: Path("."))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    if outcome != "completed":
        raise RuntimeError(f"trainbox ended {outcome} at step {trainer.state.step}")
    sp = trainer.speedups
    chosen = f"packed {sp.packed}, chunked loss {sp.split is not None}, compiled {trainer.compiled}"
    fused = trainer.optimizer.defaults.get("fused")
    settings = f"defaults ({chosen}; {type(trainer.optimizer).__name__} fused={fused})"
    return wall, cpu, trainer.state.step, statistics.fmean(losses), settings


def _hf(model: Any, cfg: Any, examples: list[Any], tok: Any, device: torch.device, mem: PeakMemory, side: str) -> Any:
    """HF's side pads with the model's own tokenizer (prepared as the worker prepares it: same pad id)."""
    from transformers import DataCollatorForSeq2Seq, TrainingArguments
    from transformers import Trainer as HFTrainer

    from core.precision import amp_dtype

    dataset = [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            num_train_epochs=1,
            per_device_train_batch_size=cfg.batch_size,
            learning_rate=cfg.learning_rate,
            weight_decay=0.01,
            bf16=amp_dtype(cfg, device) == torch.bfloat16,
            use_cpu=device.type == "cpu",
            seed=cfg.seed,
            train_sampling_strategy="group_by_length" if side == "hf-grouped" else "random",
            report_to=[],
            eval_strategy="no",
            save_strategy="no",
            logging_strategy="no",
            remove_unused_columns=False,
            disable_tqdm=True,
        )
        collator = DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=-100)
        trainer = HFTrainer(model=model, args=args, train_dataset=dataset, data_collator=collator)  # type: ignore[arg-type]
        mem.start()
        t0, c0 = time.perf_counter(), time.process_time()
        result = trainer.train()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    settings = f"{args.optim.value}, {args.lr_scheduler_type.value} schedule, sampler {args.train_sampling_strategy}"
    return wall, cpu, result.global_step, float(result.training_loss), settings


# --- the driver ------------------------------------------------------------------------------------


def run_side(
    side: str, profile: Profile, model_dir: Path, data_file: Path, args: argparse.Namespace, tag: str
) -> SideResult:
    spec = ChildSpec(
        side, profile.name, str(model_dir), str(data_file), str(data_file.parent / f"{tag}.json"),
        args.device, args.threads, profile.learning_rate, profile.lora, args.max_length, args.seed,
    )  # fmt: skip
    spec_file = data_file.parent / f"{tag}-spec.json"
    spec_file.write_text(json.dumps(asdict(spec)))
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", str(spec_file)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise RuntimeError(f"{tag}: {side} exited {proc.returncode}")
    return SideResult(**json.loads(Path(spec.result_file).read_text()))


def table(results: dict[str, dict[str, list[SideResult]]], args: argparse.Namespace, started: float) -> str:
    lines = [
        f"Measured {time.strftime('%Y-%m-%d', time.gmtime(started))} on {args.device} ({args.threads} thread(s)), "
        f"{args.rounds} rounds alternating the side order, medians; examples long-tailed (median "
        f"{args.median_tokens} tokens, clipped to [8, {args.max_length}]), batch 8, one epoch.",
        "Command: `OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_defaults.py "
        f"--profiles {','.join(results)} --rounds {args.rounds}"
        f"{' --device cuda' if args.device == 'cuda' else ''} --write`",
        "",
        "| profile | side | time to epoch | steps | real tokens/s | peak memory | mean train loss "
        "| trainbox speed-up |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, sides in results.items():
        tb = [r.wall_s for r in sides["trainbox"]]
        for side, runs in sides.items():
            wall = statistics.median(r.wall_s for r in runs)
            ratio = "" if side == "trainbox" else f"{paired_ratio([r.wall_s for r in runs], tb[: len(runs)]):.2f}x"
            lines.append(
                f"| {name} | {side} | {wall:.1f} s | {runs[0].steps} | {runs[0].tokens / wall:,.0f} | "
                f"{statistics.median(r.peak_bytes for r in runs) / 2**30:.2f} GiB | "
                f"{statistics.median(r.mean_loss for r in runs):.4f} | {ratio} |"
            )
    lines += ["", "What each side ran with:"]
    for name, sides in results.items():
        lines += [f"- {name} {side}: {runs[0].settings}" for side, runs in sides.items()]
    lines.append(
        "\nThe speed-up is HF's time over trainbox's, paired by round (above 1: trainbox finishes the epoch sooner)."
    )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profiles", default=",".join(PROFILES))
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--examples", type=int, help="override the profile's example count")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--median-tokens", type=float, default=48.0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        spec = ChildSpec(**json.loads(args.child.read_text()))
        Path(spec.result_file).write_text(json.dumps(asdict(child(spec))))
        return

    from core.embedded import ensure_embedded_model
    from core.real_model import ensure_smollm2
    from core.runtime import thread_count

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.threads = thread_count(args.threads)
    names = [n for n in args.profiles.split(",") if n]
    started = time.time()
    results: dict[str, dict[str, list[SideResult]]] = {n: {s: [] for s in SIDES} for n in names}
    with tempfile.TemporaryDirectory(prefix="bench-defaults-") as tmp:
        work = Path(tmp)
        for i, name in enumerate(names):
            p = PROFILES[name]
            model_dir = (
                ensure_embedded_model(work / "embedded") if p.model == "tiny" else ensure_smollm2(args.cache_dir)
            )
            n = args.examples or (p.examples_cuda if args.device == "cuda" else p.examples_cpu)
            data_file = work / f"{name}-data.json"
            data_file.write_text(json.dumps(make_data(model_dir, n, args.max_length, args.median_tokens, args.seed)))
            for r in range(args.rounds):
                k = (r + i) % len(SIDES)
                for side in SIDES[k:] + SIDES[:k]:
                    res = run_side(side, p, model_dir, data_file, args, f"{name}-r{r}-{side}")
                    results[name][side].append(res)
                    print(
                        f"round {r} {name:13s} {side:10s} {res.wall_s:7.1f} s  {res.steps} steps  "
                        f"{res.tokens / res.wall_s:9,.0f} tok/s  loss {res.mean_loss:.4f}  "
                        f"peak {res.peak_bytes / 2**30:.2f} GiB  ({res.settings})",
                        flush=True,
                    )
    body = table(results, args, started)
    print("\n" + body)
    if args.json:
        args.json.write_text(
            json.dumps({n: {s: [asdict(x) for x in v] for s, v in d.items()} for n, d in results.items()})
        )
    if args.write:
        doc = ROOT / "docs" / "BENCHMARKS.md"
        doc.write_text(replace_section(doc.read_text(encoding="utf-8"), SECTION, body), encoding="utf-8")


if __name__ == "__main__":
    main()
