"""Benchmark: trainbox's training loop vs Hugging Face ``Trainer``, side by side (issue 7).

Issue 7 asks for at least the throughput of HF ``Trainer`` on the same model, batch and precision. An
absolute tokens/s from a shared machine means little (../shared/ENVIRONMENT.md), so both loops run in
the same invocation, alternating, and the table reports medians and the paired ratio trainbox/HF.

What is the same on both sides (so the loop is the only difference):
- model and initial weights: the same folder loaded by ``core.loading.load_model`` (fp32 master weights),
  LoRA adapters added by ``core.loading.apply_lora`` (``core.lora.wrap``, same targets) after seeding
  with the same seed; a checksum of the trainable weights is compared before training;
- data: records from ``bench_hybrid.make_records`` grouped so that every example fills ``max_length``
  (even ones a long text, odd ones a multi-turn chat with loss on assistant turns only), encoded once
  by ``core.encode``; batches in ``core.data.Batches`` order (HF reads them with
  ``train_sampling_strategy="sequential"``), collated by ``core.data.collate`` on both sides (same
  padding, same labels);
- optimizer and schedule: AdamW (fused when trainbox's ``make_optimizer`` gets fused, else torch's
  default), same betas, weight decay (matrices only on both), clipping 1.0, gradient accumulation, and
  trainbox's warmup + cosine ``lr_at`` (HF through a ``LambdaLR``, so the lr of every step matches);
- precision: ``core.precision.amp_dtype`` (bf16 autocast on CUDA, fp32 on CPU) and HF's ``bf16`` set to it;
- process: each side runs in a fresh subprocess (clean peak memory), with the worker's thread count and
  denormal flushing. No evaluation, no saving, ``report_to=[]``, ``dataloader_num_workers=0``.

trainbox's side is ``core.train.Trainer.run`` itself, with an ``emit`` that only takes timestamps (a real
job's ``core.reporting.Reporter`` also writes a metrics line and the status file per step: not measured).

Timing: ``--warmup`` steps untimed, then ``--steps`` timed, from the end of the last warmup step to the
end of the last step (a CUDA synchronize at both ends only: no per-step syncs are added to either loop).
On the CPU the process CPU seconds of the same window are reported too, with the context switches: on a
shared machine wall time includes waiting for a core, CPU seconds do not, so they compare the loops' own
work when other jobs take turns on the cores.
Tokens: non-padding tokens, and padded positions (batch x width), of the timed steps, counted from the
batches. Peak memory: CUDA ``max_memory_allocated`` (reset after the model is loaded); CPU the peak RSS
(VmHWM, reset through /proc/self/clear_refs after loading) and its growth over the loaded process.

MFU = model FLOPs per second / the device's measured matrix rate (a square matmul timed here in the
training dtype: fp32 on CPU, bf16 on CUDA). Model FLOPs per useful (non-pad) token
(``train_flops_per_token``): every linear layer's weight counts 2 FLOPs per element forward and 2
backward for the input gradient, plus 2 for the weight gradient only when the weight trains: 6 N for a
full fine-tune (Kaplan/PaLM), 4 N_frozen + 6 N_adapter for LoRA (a frozen weight gets no weight gradient,
but activations still need their gradient down to the lowest adapter); plus attention scores and
values, 12 x layers x seq_len x attention width (PaLM's term). Embedding lookups are not matmuls and
are not counted; the tied LM head is.

Run (CPU):  OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 TQDM_DISABLE=1 .venv/bin/python scripts/bench_throughput.py --write
Run (CUDA): HF_HUB_OFFLINE=1 TQDM_DISABLE=1 .venv/bin/python scripts/bench_throughput.py --device cuda --write
``--write`` replaces the section "## Training throughput: trainbox vs Hugging Face Trainer (issue 7)" of
docs/BENCHMARKS.md (other sections untouched); ``--json`` writes every measurement.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_hybrid import make_records  # noqa: E402

from trainbox.records import Record  # noqa: E402

SECTION = "Training throughput: trainbox vs Hugging Face Trainer (issue 7)"
SIDES = ("trainbox", "hf")
DEFAULT_CACHE = Path.home() / ".cache" / "trainbox-tests"  # where the tests keep the converted SmolLM2


# --- profiles -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    batch_size: int
    max_length: int
    warmup: int  # untimed steps
    steps: int  # timed steps


@dataclass(frozen=True)
class Profile:
    name: str
    model: Literal["tiny", "smollm2"]
    lora: bool
    learning_rate: float
    cpu: Shape
    cuda: Shape


# CPU sizes keep the whole default run well under 10 minutes on 2 cores (SmolLM2 full fine-tune: about
# 5.7 s per step at 8 x 128 on this class of CPU); CUDA sizes are a realistic fine-tuning batch.
PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        Profile("tiny", "tiny", False, 2e-3, cpu=Shape(8, 128, 5, 60), cuda=Shape(32, 512, 10, 50)),
        Profile("smollm2-lora", "smollm2", True, 2e-4, cpu=Shape(4, 64, 2, 4), cuda=Shape(16, 1024, 5, 30)),
        Profile("smollm2-full", "smollm2", False, 5e-5, cpu=Shape(4, 64, 2, 4), cuda=Shape(16, 1024, 5, 30)),
    )
}


# --- pure helpers (unit-tested) ------------------------------------------------------------------


def train_flops_per_token(
    trainable_linear: int, frozen_linear: int, n_layers: int, attn_width: int, seq_len: int
) -> float:
    """Training FLOPs per token: see the module docstring. ``*_linear``: weight elements of linear layers
    (the matmuls), split by whether the weight trains; ``attn_width``: heads x head_dim of the queries."""
    return 6.0 * trainable_linear + 4.0 * frozen_linear + 12.0 * n_layers * seq_len * attn_width


def replace_section(text: str, heading: str, body: str) -> str:
    """``text`` with the level-2 section ``## heading`` replaced by ``body`` (appended when absent); the
    section runs to the next level-2 heading or the end, so other sections stay byte for byte."""
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip("\n") == f"## {heading}"), None)
    block = f"## {heading}\n\n{body.strip()}\n"
    if start is None:
        sep = "" if not text or text.endswith("\n\n") else ("\n" if text.endswith("\n") else "\n\n")
        return text + sep + block
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    tail = "".join(lines[end:])
    return "".join(lines[:start]) + block + ("\n" + tail if tail else "")


def paired_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    """Median over rounds of a/b, each round's two numbers measured back to back (drift cancels)."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


# --- data -----------------------------------------------------------------------------------------


def _plain(r: Record) -> str:
    if r.kind == "text":
        return r.text
    if r.kind == "prompt_completion":
        return r.prompt + r.completion
    return " ".join(content for role, content in r.messages if role != "system")


def _turn(r: Record) -> tuple[str, str]:
    if r.kind == "text":
        return "Write a sentence about animals.", r.text
    if r.kind == "prompt_completion":
        return r.prompt, r.completion.strip()
    user = next(c for role, c in r.messages if role == "user")
    return user, next(c for role, c in r.messages if role == "assistant")


def bench_records(n: int, max_length: int, seed: int = 11) -> list[Record]:
    """``n`` records long enough to fill ``max_length`` tokens, each built from consecutive generated ones:
    even ones a long text (every token trained), odd ones a multi-turn chat (assistant turns trained)
    whose turns carry up to four generated tasks each: few enough that the first answer fits in a short
    ``max_length``, enough that the template (rendered once per assistant turn) stays cheap at long ones."""
    per = max_length // 8 + 4  # generated records are 17-80 tokens: this overfills, truncation cuts
    per_turn = min(4, max(1, max_length // 128))
    base = make_records(n * per, seed)
    out = []
    for i in range(n):
        group = base[i * per : (i + 1) * per]
        if i % 2 == 0:
            out.append(Record(kind="text", text=" ".join(_plain(r) for r in group)))
            continue
        msgs = [("system", "Answer exactly.")]
        for j in range(0, len(group), per_turn):
            turns = [_turn(r) for r in group[j : j + per_turn]]
            msgs += [("user", "\n".join(q for q, _ in turns)), ("assistant", "\n".join(a for _, a in turns))]
        out.append(Record(kind="messages", messages=tuple(msgs)))
    return out


# --- measuring ------------------------------------------------------------------------------------


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int, reps: int) -> float:
    """FLOP/s of an n x n matmul in ``dtype`` on ``device``, best of ``reps`` (the machine's achievable
    matrix rate: the MFU denominator measured, not a datasheet number)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    best = math.inf
    for i in range(reps + 1):
        sync(device)
        t0 = time.perf_counter()
        _ = a @ b
        sync(device)
        if i > 0:  # the first one warms up the kernels and caches
            best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def proc_status_int(key: str) -> int:
    """A number from /proc/self/status (0 where there is none: not Linux)."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return 0
    m = re.search(rf"^{key}:\s+(\d+)", text, re.M)
    return int(m.group(1)) if m else 0


class PeakMemory:
    """Peak memory of the training phase only: CUDA's allocator peak, or the process's peak RSS."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.kind = "cuda max_memory_allocated" if device.type == "cuda" else "peak RSS (VmHWM)"
        self.base = 0

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return
        self.base = proc_status_int("VmRSS") * 1024  # kB
        try:  # "5" resets the peak RSS (Linux >= 4.0); without it the load's own peak could hide training's
            Path("/proc/self/clear_refs").write_text("5")
            self.kind = "peak RSS (VmHWM)"
        except OSError:
            self.kind = "peak RSS (VmHWM, not reset: includes loading)"

    def peak(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return proc_status_int("VmHWM") * 1024


class StepClock:
    """Step-end timestamps; synchronizes the device only at the timed window's two ends. Also the
    process's CPU time: on a shared CPU, wall time includes waiting for a core while CPU seconds do not,
    so CPU seconds per step compare the loops' own work even when other jobs take turns on the cores."""

    def __init__(self, device: torch.device, warmup: int, total: int) -> None:
        self.device, self.warmup, self.total = device, warmup, total
        self.ends: dict[int, float] = {}
        self.cpu_ends: dict[int, float] = {}
        self.switches: dict[str, int] = {}  # context switches in the window: waiting (voluntary) vs preempted

    def step_end(self, step: int) -> None:
        if step in (self.warmup, self.total):
            sync(self.device)
            sign = 1 if step == self.total else -1
            for key in ("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches"):
                self.switches[key] = self.switches.get(key, 0) + sign * proc_status_int(key)
        self.ends[step] = time.perf_counter()
        self.cpu_ends[step] = time.process_time()

    def window(self) -> float:
        return self.ends[self.total] - self.ends[self.warmup]

    def cpu_window(self) -> float:
        return self.cpu_ends[self.total] - self.cpu_ends[self.warmup]

    def step_times(self) -> list[float]:
        return [self.ends[s] - self.ends[s - 1] for s in range(self.warmup + 1, self.total + 1) if s - 1 in self.ends]


# --- one side, in its own process -----------------------------------------------------------------


@dataclass
class ChildSpec:
    side: str
    profile: str
    model_dir: str
    data_file: str
    result_file: str
    device: str
    threads: int
    warmup: int
    config: dict[str, Any]


@dataclass
class SideResult:
    side: str
    profile: str
    window_s: float
    cpu_s: float  # process CPU seconds in the window (all threads)
    step_times: list[float]
    mean_loss: float
    init_checksum: float
    peak_bytes: int
    base_bytes: int
    memory_kind: str
    trainable_linear: int
    frozen_linear: int
    n_layers: int
    attn_width: int
    trainable_params: int
    total_params: int
    optimizer: str
    bf16: bool
    extra: dict[str, Any] = field(default_factory=dict)


def linear_params(model: Any) -> tuple[int, int]:
    """(trainable, frozen) weight elements of the model's linear layers, the LM head included."""
    trainable = frozen = 0
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            if m.weight.requires_grad:
                trainable += m.weight.numel()
            else:
                frozen += m.weight.numel()
    return trainable, frozen


def describe_optimizer(opt: Any) -> str:
    """What actually stepped: implementation and weight-decay split (to show both sides ran the same)."""
    opt = getattr(opt, "optimizer", opt)  # accelerate wraps HF's
    impl = "fused" if opt.defaults.get("fused") else "foreach" if opt.defaults.get("foreach") else "default"
    decay = sum(len(g["params"]) for g in opt.param_groups if g["weight_decay"] > 0)
    total = sum(len(g["params"]) for g in opt.param_groups)
    return f"{type(opt).__name__} {impl}, decay on {decay}/{total} tensors"


def run_child(spec: ChildSpec) -> SideResult:
    """Load, wrap and train one side exactly as a trainbox worker sets up a job; return its measurements."""
    from core import rng
    from core.encode import Example
    from core.loading import apply_lora, load_model
    from core.precision import amp_dtype
    from core.schedule import make_optimizer
    from trainbox.config import TrainingConfig

    torch.set_num_threads(spec.threads)
    torch.set_flush_denormal(True)  # as the worker does; HF's side gets the same process setting
    device = torch.device(spec.device)
    cfg = TrainingConfig.model_validate(spec.config)
    rng.seed_all(cfg.seed)
    model, tokenizer = load_model(Path(spec.model_dir), device)
    if cfg.lora:  # adapters initialised from the seed above: the same on both sides
        model, _ = apply_lora(model, cfg, Path(spec.model_dir))
    data = json.loads(Path(spec.data_file).read_text())
    examples = [Example(ids, labels) for ids, labels in data["examples"]]
    if tokenizer.pad_token_id != data["pad_id"]:
        raise RuntimeError(f"pad id {tokenizer.pad_token_id} != the encoding's {data['pad_id']}")
    trainable = [p for p in model.parameters() if p.requires_grad]
    checksum = float(sum(p.detach().double().sum() for p in trainable))
    t_lin, f_lin = linear_params(model)
    mcfg = model.config
    n_heads = int(mcfg.num_attention_heads)
    head_dim = int(getattr(mcfg, "head_dim", None) or mcfg.hidden_size // n_heads)
    clock = StepClock(device, spec.warmup, cfg.max_steps)
    mem = PeakMemory(device)
    bf16 = amp_dtype(cfg, device) == torch.bfloat16
    probe = make_optimizer(model, cfg, device)  # what trainbox gets here, so HF is asked for the same
    fused = bool(probe.defaults.get("fused"))
    del probe
    if spec.side == "trainbox":
        mean_loss, optimizer = train_trainbox(model, cfg, examples, data["pad_id"], device, clock, mem)
    else:
        mean_loss, optimizer = train_hf(
            model, cfg, examples, data["order"], data["pad_id"], device, clock, mem, bf16, fused
        )
    return SideResult(
        side=spec.side,
        profile=spec.profile,
        window_s=clock.window(),
        cpu_s=clock.cpu_window(),
        step_times=clock.step_times(),
        mean_loss=mean_loss,
        init_checksum=checksum,
        peak_bytes=mem.peak(),
        base_bytes=mem.base,
        memory_kind=mem.kind,
        trainable_linear=t_lin,
        frozen_linear=f_lin,
        n_layers=int(mcfg.num_hidden_layers),
        attn_width=n_heads * head_dim,
        trainable_params=sum(p.numel() for p in trainable),
        total_params=sum(p.numel() for p in model.parameters()),
        optimizer=optimizer,
        bf16=bf16,
        extra={"ctxt_switches": clock.switches},
    )


def train_trainbox(
    model: Any, cfg: Any, examples: list[Any], pad_id: int, device: torch.device, clock: StepClock, mem: PeakMemory
) -> tuple[float, str]:
    """``core.train.Trainer.run``: the job's loop, no validation set (no evaluation), saving a no-op."""
    from core.events import StepEvent
    from core.train import Trainer

    trainer = Trainer(model, cfg, examples, [], pad_id, device)
    losses: list[float] = []

    def emit(ev: Any) -> None:
        if isinstance(ev, StepEvent):
            clock.step_end(ev.step)
            losses.append(ev.loss)

    mem.start()
    outcome = trainer.run(emit, lambda: False, lambda: Path("."))
    if outcome != "completed" or trainer.state.step != cfg.max_steps:
        raise RuntimeError(f"trainbox ended {outcome} at step {trainer.state.step}")
    return sum(losses) / len(losses), describe_optimizer(trainer.optimizer)


def train_hf(
    model: Any,
    cfg: Any,
    examples: list[Any],
    order: list[int],
    pad_id: int,
    device: torch.device,
    clock: StepClock,
    mem: PeakMemory,
    bf16: bool,
    fused: bool,
) -> tuple[float, str]:
    """``transformers.Trainer.train`` on the same batches (sequential sampler over trainbox's order), the
    same collate, optimizer settings and lr schedule; HF's defaults for everything else."""
    from torch.optim.lr_scheduler import LambdaLR
    from transformers import Trainer as HFTrainer
    from transformers import TrainerCallback, TrainingArguments

    from core.data import collate
    from core.schedule import lr_at

    class SameSchedule(HFTrainer):
        """trainbox's lr schedule (a pure function of the step) instead of HF's warmup shape."""

        def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
            if self.lr_scheduler is None:
                opt: Any = optimizer or self.optimizer
                self.lr_scheduler = LambdaLR(
                    opt,
                    lambda step: lr_at(step, num_training_steps, 1.0, cfg.warmup_ratio, cfg.min_lr_ratio),
                )
                self._created_lr_scheduler = True
            return self.lr_scheduler

    class Clock(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            clock.step_end(state.global_step)

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            max_steps=cfg.max_steps,
            per_device_train_batch_size=cfg.batch_size,
            gradient_accumulation_steps=cfg.grad_accum,
            learning_rate=cfg.learning_rate,
            weight_decay=cfg.weight_decay,
            adam_beta1=cfg.beta1,
            adam_beta2=cfg.beta2,
            max_grad_norm=cfg.grad_clip,
            optim="adamw_torch_fused" if fused else "adamw_torch",
            bf16=bf16,
            use_cpu=device.type == "cpu",
            seed=cfg.seed,
            report_to=[],
            eval_strategy="no",
            save_strategy="no",
            logging_strategy="no",
            dataloader_num_workers=0,
            train_sampling_strategy="sequential",
            remove_unused_columns=False,
            label_names=["labels"],
            disable_tqdm=True,
        )
        trainer = SameSchedule(
            model=model,
            args=args,
            train_dataset=[examples[i] for i in order],  # type: ignore[arg-type]  # any sized sequence works
            data_collator=lambda batch: collate(batch, pad_id),
            callbacks=[Clock()],
        )
        mem.start()
        out_ = trainer.train()
    if out_.global_step != cfg.max_steps:
        raise RuntimeError(f"HF Trainer ended at step {out_.global_step}")
    return float(out_.training_loss), describe_optimizer(trainer.optimizer)


def child_main(spec_file: Path) -> None:
    spec = ChildSpec(**json.loads(spec_file.read_text()))
    result = run_child(spec)
    Path(spec.result_file).write_text(json.dumps(asdict(result)))


# --- the driver -----------------------------------------------------------------------------------


@dataclass
class Prepared:
    profile: Profile
    shape: Shape
    model_dir: Path
    data_file: Path
    tokens: int  # non-pad tokens in the timed steps
    positions: int  # padded positions (batch x width) in the timed steps
    seq_len: int  # widest batch of the timed steps


def prepare(profile: Profile, shape: Shape, grad_accum: int, model_dir: Path, workdir: Path, seed: int) -> Prepared:
    """Encode the data once with the model's tokenizer (as the worker prepares it) and fix the batch order."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from core.data import Batches, DataPosition, collate
    from core.encode import encode_all, prepare_tokenizer

    hf_logging.set_verbosity_error()  # "sequence longer than the model's maximum": truncation follows
    tok = AutoTokenizer.from_pretrained(model_dir)
    prepare_tokenizer(tok)
    total = shape.warmup + shape.steps
    n = total * shape.batch_size * grad_accum  # exactly one epoch of full batches: no short last batch
    encoded = encode_all(tok, bench_records(n + 16, shape.max_length), shape.max_length).examples[:n]
    if len(encoded) < n:
        raise RuntimeError(f"only {len(encoded)} of {n} examples kept an assistant turn within max_length")
    batches, pos = Batches(n, shape.batch_size, seed), DataPosition()
    order: list[int] = []
    tokens = positions = seq_len = 0
    for step in range(1, total + 1):
        for _ in range(grad_accum):
            indices, pos = batches.take(pos)
            order += indices
            if step > shape.warmup:
                b = collate([encoded[i] for i in indices], tok.pad_token_id)
                tokens += int(b["attention_mask"].sum())
                positions += b["input_ids"].numel()
                seq_len = max(seq_len, b["input_ids"].shape[1])
    data_file = workdir / f"{profile.name}-data.json"
    payload = {"pad_id": tok.pad_token_id, "order": order, "examples": [[e.input_ids, e.labels] for e in encoded]}
    data_file.write_text(json.dumps(payload))
    return Prepared(profile, shape, model_dir, data_file, tokens, positions, seq_len)


def run_side(side: str, prep: Prepared, args: argparse.Namespace, workdir: Path, tag: str) -> SideResult:
    """One side in a fresh interpreter (clean memory, no state shared with the other side)."""
    from trainbox.config import TrainingConfig

    p, s = prep.profile, prep.shape
    cfg = TrainingConfig(
        max_steps=s.warmup + s.steps,
        batch_size=s.batch_size,
        grad_accum=args.grad_accum,
        max_length=s.max_length,
        learning_rate=p.learning_rate,
        eval_every=0,
        checkpoint_every=0,
        seed=args.seed,
        device=args.device,
        threads=args.threads,
        lora=p.lora,
        packing=False,  # the same padded batches on both sides: this row measures the loop alone
        compile=False,  # (scripts/bench_defaults.py compares trainbox's defaults with HF's)
    )
    spec = ChildSpec(
        side=side,
        profile=p.name,
        model_dir=str(prep.model_dir),
        data_file=str(prep.data_file),
        result_file=str(workdir / f"{tag}-result.json"),
        device=args.device,
        threads=args.threads,
        warmup=s.warmup,
        config=cfg.model_dump(mode="json"),
    )
    spec_file = workdir / f"{tag}-spec.json"
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


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def fmt_rate(x: float) -> str:
    return f"{x:,.0f}"


def machine_line(device: torch.device, threads: int) -> str:
    cpu = next(
        (x.split(":", 1)[1].strip() for x in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in x),
        platform.processor() or platform.machine(),
    )
    gpu = ""
    if device.type == "cuda":
        gpu = f"GPU {torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}); "
    return (
        f"{gpu}CPU {cpu}, {os.cpu_count()} cores, {platform.machine()}; torch {torch.__version__}, "
        f"{threads} torch thread{'s' if threads != 1 else ''}, Python {platform.python_version()}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profiles", default=",".join(PROFILES), help=f"comma list of {', '.join(PROFILES)}")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--rounds", type=int, default=3, help="repeats of every profile, side order rotated")
    ap.add_argument("--batch-size", type=int, help="override the profiles' batch size")
    ap.add_argument("--max-length", type=int, help="override the profiles' max length")
    ap.add_argument("--warmup", type=int, help="override the untimed steps (at least 1)")
    ap.add_argument("--steps", type=int, help="override the timed steps")
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch threads; 0: $OMP_NUM_THREADS, else half the cores")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="converted SmolLM2 folder cache")
    ap.add_argument("--write", action="store_true", help=f"replace the section '{SECTION}' of docs/BENCHMARKS.md")
    ap.add_argument("--json", type=Path, help="write every measurement here")
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        child_main(args.child)
        return

    from core.embedded import ensure_embedded_model
    from core.real_model import ensure_smollm2
    from core.runtime import thread_count

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    args.threads = thread_count(args.threads)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    mm_n, mm_reps = (8192, 20) if device.type == "cuda" else (1024, 8)
    names = [n for n in args.profiles.split(",") if n]
    unknown = [n for n in names if n not in PROFILES]
    if unknown:
        ap.error(f"unknown profiles {unknown}; known: {', '.join(PROFILES)}")
    started, load0 = time.time(), os.getloadavg()[0]
    rate0 = matmul_rate(device, dtype, mm_n, mm_reps)
    print(f"matrix rate ({mm_n}^3 {dtype}, {device}): {rate0 / 1e9:,.1f} GFLOP/s", flush=True)

    results: dict[str, dict[str, list[SideResult]]] = {n: {s: [] for s in SIDES} for n in names}
    with tempfile.TemporaryDirectory(prefix="bench-throughput-") as tmp:
        work = Path(tmp)
        preps: dict[str, Prepared] = {}
        for name in names:
            p = PROFILES[name]
            base = p.cuda if device.type == "cuda" else p.cpu
            shape = Shape(
                args.batch_size or base.batch_size,
                args.max_length or base.max_length,
                max(1, args.warmup if args.warmup is not None else base.warmup),
                args.steps or base.steps,
            )
            tiny = p.model == "tiny"
            model_dir = ensure_embedded_model(work / "embedded") if tiny else ensure_smollm2(args.cache_dir)
            same = next((x for x in preps.values() if (x.model_dir, x.shape) == (model_dir, shape)), None)
            if same is not None:  # LoRA and full fine-tune of one model: the same data, encoded once
                preps[name] = Prepared(p, shape, model_dir, same.data_file, same.tokens, same.positions, same.seq_len)
            else:
                preps[name] = prepare(p, shape, args.grad_accum, model_dir, work, args.seed)
            print(
                f"{name}: {model_dir.name}, batch {shape.batch_size} x {shape.max_length}, accum {args.grad_accum}, "
                f"{shape.warmup} warmup + {shape.steps} timed steps, {preps[name].tokens} timed tokens",
                flush=True,
            )
        for r in range(args.rounds):
            for i, name in enumerate(names):
                order = SIDES if (r + i) % 2 == 0 else SIDES[::-1]
                for side in order:
                    res = run_side(side, preps[name], args, work, f"{name}-r{r}-{side}")
                    results[name][side].append(res)
                    prep = preps[name]
                    print(
                        f"round {r} {name:13s} {side:8s} {prep.tokens / res.window_s:10,.0f} tok/s "
                        f"step {res.window_s / prep.shape.steps:.3f} s (cpu {res.cpu_s / prep.shape.steps:.3f} s)  "
                        f"loss {res.mean_loss:.4f}  switches {res.extra.get('ctxt_switches')}  "
                        f"peak {gib(res.peak_bytes)} (+{gib(res.peak_bytes - res.base_bytes)})",
                        flush=True,
                    )
    rate1 = matmul_rate(device, dtype, mm_n, mm_reps)
    rate = max(rate0, rate1)
    print(f"matrix rate again: {rate1 / 1e9:,.1f} GFLOP/s; MFU uses the better, {rate / 1e9:,.1f}", flush=True)
    body = report(args, preps, results, device, dtype, (mm_n, rate0, rate1), started, (load0, os.getloadavg()[0]))
    print("\n" + body)
    if args.json:
        everything = {n: {s: [asdict(x) for x in v] for s, v in sides.items()} for n, sides in results.items()}
        args.json.write_text(json.dumps(everything, indent=1))
    if args.write:
        doc = ROOT / "docs" / "BENCHMARKS.md"
        doc.write_text(replace_section(doc.read_text(encoding="utf-8"), SECTION, body), encoding="utf-8")
        print(f"wrote the section to {doc}")


def report(
    args: argparse.Namespace,
    preps: dict[str, Prepared],
    results: dict[str, dict[str, list[SideResult]]],
    device: torch.device,
    dtype: torch.dtype,
    rates: tuple[int, float, float],
    started: float,
    load: tuple[float, float],
) -> str:
    """The markdown section: command, date, machine, settings, per-side medians, paired ratios."""
    mm_n, rate0, rate1 = rates
    rate = max(rate0, rate1)
    on_cpu = device.type == "cpu"
    env = "OMP_NUM_THREADS=1 " if on_cpu else ""
    first_side = next(iter(next(iter(results.values())).values()))[0]
    lines = [
        f"Command: `{env}HF_HUB_OFFLINE=1 TQDM_DISABLE=1 .venv/bin/python scripts/bench_throughput.py "
        f"{' '.join(sys.argv[1:])}`",
        "",
        f"Date: {datetime.date.today().isoformat()}; {time.time() - started:.0f} s in all. Machine: "
        f"{machine_line(device, args.threads)}; device {device}, "
        f"{'bf16 autocast' if dtype == torch.bfloat16 else 'fp32'}. Measured matrix rate ({mm_n}x{mm_n} matmul, "
        f"{str(dtype).removeprefix('torch.')}): {rate0 / 1e9:,.1f} GFLOP/s before the runs, {rate1 / 1e9:,.1f} "
        "after; MFU divides by the better. The machine may be shared with other work (load average "
        f"{load[0]:.2f} at the start, {load[1]:.2f} at the end; the run itself keeps one core busy), "
        "so the sides alternate, "
        "each in a fresh process, and only same-round ratios are compared"
        + (
            "; on the CPU the process CPU seconds per step are reported too: they exclude time spent waiting "
            "for a core, so they compare the loops' own work when wall time is disturbed."
            if on_cpu
            else "."
        ),
        "",
        f"Each profile: {args.rounds} rounds, side order rotated; both sides train the same initial weights on the "
        "same batches (core.encode, core.data order and collate) with the same AdamW, clipping, lr schedule and "
        "precision (method in the docstring of scripts/bench_throughput.py). Tokens = non-padding tokens of the "
        "timed steps; positions = batch x padded width (the data fills max_length, so they coincide here). "
        f"Peak memory: {first_side.memory_kind} during training, and its growth over the process with the model "
        "loaded. MFU = tokens/s x training FLOPs per token / matrix rate. Numbers are medians over rounds.",
        "",
        "| profile | model | params trainable / total | batch x len, accum | warmup + timed steps "
        "| training FLOPs/token | same initial weights |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    rows = [
        "| profile | side | tokens/s | positions/s | step time |"
        + (" CPU s/step |" if on_cpu else "")
        + " peak memory (growth) | MFU | mean loss | optimizer |",
        "| --- | --- | --- | --- | --- |" + (" --- |" if on_cpu else "") + " --- | --- | --- | --- |",
    ]
    summary = [
        "| profile | trainbox / HF tokens/s (paired median) | per round |"
        + (" trainbox / HF by CPU time (paired median) | per round |" if on_cpu else ""),
        "| --- | --- | --- |" + (" --- | --- |" if on_cpu else ""),
    ]
    for name, sides in results.items():
        prep, shape = preps[name], preps[name].shape
        first = sides["trainbox"][0]
        same_init = len({x.init_checksum for v in sides.values() for x in v}) == 1
        flops = train_flops_per_token(
            first.trainable_linear, first.frozen_linear, first.n_layers, first.attn_width, prep.seq_len
        )
        lines.append(
            f"| {name} | {prep.model_dir.name.split('-')[0]} | {first.trainable_params / 1e6:.4g}M / "
            f"{first.total_params / 1e6:.4g}M | {shape.batch_size} x {shape.max_length}, {args.grad_accum} | "
            f"{shape.warmup} + {shape.steps} | {flops / 1e6:,.1f} M | {'yes' if same_init else 'NO'} |"
        )
        tps: dict[str, list[float]] = {}
        cps: dict[str, list[float]] = {}
        for side in SIDES:
            runs = sides[side]
            tps[side] = [prep.tokens / x.window_s for x in runs]
            cps[side] = [prep.tokens / x.cpu_s for x in runs]
            tok_s = statistics.median(tps[side])
            pos_s = statistics.median(prep.positions / x.window_s for x in runs)
            step = statistics.median(x.window_s / shape.steps for x in runs)
            cpu = statistics.median(x.cpu_s / shape.steps for x in runs)
            peak = statistics.median(x.peak_bytes for x in runs)
            grow = statistics.median(x.peak_bytes - x.base_bytes for x in runs)
            loss = statistics.median(x.mean_loss for x in runs)
            rows.append(
                f"| {name} | {'trainbox' if side == 'trainbox' else 'HF Trainer'} | {fmt_rate(tok_s)} | "
                f"{fmt_rate(pos_s)} | {step:.3f} s |"
                + (f" {cpu:.3f} s |" if on_cpu else "")
                + f" {gib(peak)} ({gib(grow)}) | {tok_s * flops / rate:.1%} | {loss:.4f} | {runs[0].optimizer} |"
            )
        per_round = ", ".join(f"{a / b:.2f}" for a, b in zip(tps["trainbox"], tps["hf"], strict=True))
        cpu_round = ", ".join(f"{a / b:.2f}" for a, b in zip(cps["trainbox"], cps["hf"], strict=True))
        summary.append(
            f"| {name} | {paired_ratio(tps['trainbox'], tps['hf']):.2f}x | {per_round} |"
            + (f" {paired_ratio(cps['trainbox'], cps['hf']):.2f}x | {cpu_round} |" if on_cpu else "")
        )
    switches = [x.extra.get("ctxt_switches", {}) for sides in results.values() for v in sides.values() for x in v]
    waits = sum(sw.get("voluntary_ctxt_switches", 0) for sw in switches)
    preempted = {
        side: statistics.median(
            x.extra.get("ctxt_switches", {}).get("nonvoluntary_ctxt_switches", 0)
            for sides in results.values()
            for x in sides[side]
        )
        for side in SIDES
    }
    note = (
        f"Context switches in the timed windows: {waits} voluntary in all runs together (neither loop blocks on "
        f"I/O or a lock), involuntary (preempted by other processes) median per run: trainbox "
        f"{preempted['trainbox']:.0f}, HF {preempted['hf']:.0f}: the wall-time spread between rounds is the "
        "shared machine's."
    )
    return "\n".join([*lines, "", *rows, "", *summary, "", note])


if __name__ == "__main__":
    main()
