"""Benchmark: hybrid-predict engine (second design, issue 16) vs a tuned plain loop, time to the same validation loss.

Models (``--profile``): ``tiny``, the embedded tiny Llama (core.embedded) re-initialised per seed (training from
scratch; the CPU profile); ``smollm2-lora``, seeded LoRA adapters on the pretrained SmolLM2-135M-Instruct;
``smollm2-full``, all of SmolLM2's weights (the GPU profile, ``--device cuda``). ``auto``: tiny on the CPU.
Data (``--data``): ``one-epoch``, the deterministic four-task mix of the first design's benchmark (little
redundancy); ``default-job``, a realistic file for the default 3 epochs: a long-tailed length mix (a few examples
many times longer than the median), about a third near-duplicates of other examples (one word changed), and a share
of easy examples (short fixed answers); ``continual``, a second job from the first job's model: job 1 trains plain
(``--job1-lr`` x ``--job1-epochs``, the same for every run of a seed: the starting point, not the thing measured) on
a default-job file A; job 2's file B is half records of A's training part, verbatim, and half new ones, its held-out
set split off as the product does (core.data.split_heldout); everything below is job 2. On the CPU one thread,
denormals flushed.

1. The plain baseline: a sweep over learning rate (``--lrs``) and epochs (``--epochs``, 1 to 3 for default-job) on
   the first seed with core.train.Trainer (the real loop, its cosine schedule). Target = the sweep's best validation
   loss x (1 + ``--tolerance``); the baseline is the sweep's run that reaches the target soonest (so stopping early
   is not credited against a badly configured baseline).
2. Per seed (``--seeds``): the baseline's settings, and the hybrid at the baseline's lr over the sweep's most epochs
   (it decides its own stop), from the same initial weights and data order; runs alternate, the order rotating.
3. Time to target: training wall-clock and CPU seconds of the process (evaluation excluded: the benchmark's
   measurement, not the job's work; the hybrid's scoring pass and re-measurements ARE counted) at the first
   evaluation whose val loss <= target, with the steps, examples trained (= backward passes) and forward-only passes
   to it. The speedup is from CPU seconds (steadier than wall-clock on shared cores); the baseline is chosen by them.

Run: OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_hybrid.py --data default-job --seeds 0 [--write]
Prints a markdown table; ``--write`` appends it to docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch
from transformers import AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core import lora  # noqa: E402
from core.data import split_heldout  # noqa: E402
from core.embedded import build_model, ensure_embedded_model  # noqa: E402
from core.encode import Example, encode_all, prepare_tokenizer  # noqa: E402
from core.events import EvalEvent, PhaseEvent  # noqa: E402
from core.hybrid import HybridConfig  # noqa: E402
from core.hybrid.events import CorrectionEvent  # noqa: E402
from core.train import Trainer  # noqa: E402
from trainbox.config import TrainingConfig  # noqa: E402
from trainbox.records import Record  # noqa: E402

VARIANTS: dict[str, dict[str, Any]] = {
    "hybrid": {},  # the shipped [training.hybrid] defaults
    "hybrid-noskip": {"keep_shares": (1.0,)},  # the curve stop alone
    "hybrid-nostop": {"curve_stop": False},  # skipping alone
    "hybrid-plain": {"keep_shares": (1.0,), "curve_stop": False},  # neither: must train as plain does
    "hybrid-norollback": {"curve_stop": False, "val_tol": 100.0, "remeasure_tol": 100.0},  # skipping, never undone
    "hybrid-score": {"score_first": True},  # a forward-only scoring pass first: skipping from warmup + full steps
    "hybrid-score-nostop": {"score_first": True, "curve_stop": False},
    # Selective-Backprop with compaction: skipped examples' places filled from the next micro-batches, the schedule
    # on the data read, the run over once the planned epochs of data were read (fewer, full steps)
    "hybrid-compact": {"compact": True},
    "hybrid-compact-nostop": {"compact": True, "curve_stop": False},
    "hybrid-compact-score": {"compact": True, "score_first": True},
    "hybrid-compact-learned": {"compact": True, "learned_below": 0.25},  # skip only losses below 1/4 of the mean
}

# --- data -----------------------------------------------------------------------------------------

ANIMALS = [
    "cat",
    "dog",
    "horse",
    "bird",
    "fish",
    "cow",
    "sheep",
    "fox",
    "bear",
    "wolf",
    "duck",
    "goat",
    "mouse",
    "owl",
    "frog",
    "deer",
    "lion",
    "tiger",
]
COLORS = ["red", "blue", "green", "yellow", "black", "white", "brown", "grey", "orange", "purple", "pink", "silver"]
PLACES = ["garden", "forest", "river", "field", "barn", "hill", "lake", "city", "market", "station", "valley", "bridge"]
VERBS = ["sleeps", "runs", "eats", "plays", "waits", "sings", "rests", "hides", "jumps", "swims", "reads", "dances"]
TIMES = ["morning", "evening", "night", "noon", "dawn", "winter", "summer", "spring", "autumn"]
FRENCH = {
    "cat": "chat",
    "dog": "chien",
    "horse": "cheval",
    "bird": "oiseau",
    "fish": "poisson",
    "cow": "vache",
    "sheep": "mouton",
    "fox": "renard",
    "bear": "ours",
    "wolf": "loup",
    "duck": "canard",
    "goat": "chèvre",
    "mouse": "souris",
    "owl": "hibou",
    "frog": "grenouille",
    "deer": "cerf",
    "lion": "lion",
    "tiger": "tigre",
    "red": "rouge",
    "blue": "bleu",
    "green": "vert",
    "yellow": "jaune",
    "black": "noir",
    "white": "blanc",
    "brown": "marron",
    "grey": "gris",
    "orange": "orange",
    "purple": "violet",
    "pink": "rose",
}


def make_records(n: int, seed: int = 11) -> list[Record]:
    """A deterministic mix of four tasks; every answer follows from the prompt (learnable, not trivial)."""
    rng = random.Random(seed)
    out: list[Record] = []
    words = sorted(FRENCH)
    for i in range(n):
        kind = i % 4
        if kind == 0:
            a, c, p, v, t = (rng.choice(pool) for pool in (ANIMALS, COLORS, PLACES, VERBS, TIMES))
            b = rng.choice(ANIMALS)
            out.append(
                Record(kind="text", text=f"In the {t} the {c} {a} {v} near the {p}. The {b} watches the {a} who {v}.")
            )
        elif kind == 1:
            x, y = rng.randint(0, 99), rng.randint(0, 99)
            op = rng.choice(["plus", "minus", "times"])
            val = x + y if op == "plus" else x - y if op == "minus" else x * y
            out.append(Record(kind="prompt_completion", prompt=f"What is {x} {op} {y}?\nAnswer:", completion=f" {val}"))
        elif kind == 2:
            w = rng.choice(words)
            msgs = (
                ("system", "You translate English words into French."),
                ("user", f"Translate '{w}' into French."),
                ("assistant", f"In French, '{w}' is '{FRENCH[w]}'."),
            )
            out.append(Record(kind="messages", messages=msgs))
        else:
            items = [rng.choice(ANIMALS + COLORS) for _ in range(rng.randint(3, 6))]
            out.append(
                Record(
                    kind="prompt_completion",
                    prompt=f"Repeat the list backwards: {', '.join(items)}\nReversed:",
                    completion=" " + ", ".join(reversed(items)),
                )
            )
    return out


def make_job_records(n: int, seed: int = 13) -> list[Record]:
    """The default-job profile's file: ``make_records``'s tasks with a long-tailed length mix (a story repeated
    1 + a Pareto-distributed number of times), about a third near-duplicates of earlier records (one word changed)
    and a sixth easy ones (a fixed greeting and its fixed answer, in a few wordings)."""
    rng = random.Random(seed)
    base = make_records(n, seed)
    out: list[Record] = []
    for rec in base:
        roll = rng.random()
        if roll < 1 / 6:
            who = rng.choice(["friend", "there", "everyone", "team"])
            out.append(
                Record(kind="prompt_completion", prompt=f"Say hello to {who}.\nReply:", completion=f" Hello, {who}!")
            )
        elif roll < 1 / 2 and out:
            src = out[rng.randrange(len(out))]  # a near-duplicate of an earlier record: one word swapped
            out.append(_swap_word(src, rng))
        elif rec.kind == "text":
            repeats = 1 + min(int(rng.paretovariate(1.5)) - 1, 12)  # long tail: most once, a few up to 13x
            out.append(Record(kind="text", text=" ".join([rec.text] * repeats)))
        else:
            out.append(rec)
    return out


def _swap_word(rec: Record, rng: random.Random) -> Record:
    pool = ANIMALS + COLORS

    def swap(text: str) -> str:
        words = text.split(" ")
        hits = [k for k, w in enumerate(words) if w.strip(".,'?") in pool]
        if hits:
            k = rng.choice(hits)
            words[k] = words[k].replace(words[k].strip(".,'?"), rng.choice(pool))
        return " ".join(words)

    if rec.kind == "text":
        return Record(kind="text", text=swap(rec.text))
    if rec.kind == "prompt_completion":
        return Record(kind="prompt_completion", prompt=swap(rec.prompt), completion=rec.completion)
    return rec


# --- runs -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Point:
    """One evaluation of a run, with what training had cost up to it."""

    step: int
    wall_s: float  # training wall-clock (evaluation excluded)
    cpu_s: float  # this process's CPU seconds in training (evaluation excluded; one thread)
    val: float
    trained: int  # examples with a forward and backward pass (= backward passes)
    forward_only: int  # forward-only passes of the hybrid engine (scoring pass, re-measurements)


@dataclass
class RunResult:
    name: str
    seed: int
    lr: float
    epochs: float
    evals: list[Point] = field(default_factory=list)
    train_s: float = 0.0
    cpu_s: float = 0.0
    steps: int = 0
    trained: int = 0  # examples with a forward and backward pass
    overhead_s: float = 0.0
    remeasured: int = 0
    scored: int = 0
    rollbacks: int = 0
    stopped: str = ""

    @property
    def final(self) -> float:
        return self.evals[-1].val

    @property
    def best(self) -> float:
        return min(p.val for p in self.evals)

    def to_target(self, target: float) -> Point | None:
        return next((p for p in self.evals if p.val <= target), None)


class Clock:
    """Training wall-clock and CPU time: elapsed minus the time spent in evaluation (the benchmark's, not the job's).
    The CPU clock is the process's CPU time: with one thread and two other agents on the cores it is the steadier of
    the two. ``counts()`` gives (examples trained, forward-only passes) so far."""

    def __init__(self, result: RunResult, device: torch.device, counts: Any) -> None:
        self.result, self.device, self.counts = result, device, counts
        self.start, self.cpu_start = time.perf_counter(), time.process_time()
        self.eval_s = self.eval_cpu = 0.0
        self._eval_start: tuple[float, float] | None = None

    def __call__(self, ev: Any) -> None:
        if self.device.type == "cuda" and isinstance(ev, (PhaseEvent, EvalEvent)):
            torch.cuda.synchronize(self.device)  # the queued kernels belong to the phase that just ended
        now, cpu = time.perf_counter(), time.process_time()
        if isinstance(ev, PhaseEvent) and ev.phase == "evaluating":
            self._eval_start = (now, cpu)
        elif isinstance(ev, EvalEvent):
            assert self._eval_start is not None
            train_s = self._eval_start[0] - self.start - self.eval_s
            train_cpu = self._eval_start[1] - self.cpu_start - self.eval_cpu
            self.eval_s += now - self._eval_start[0]
            self.eval_cpu += cpu - self._eval_start[1]
            trained, forward_only = self.counts()
            self.result.evals.append(Point(ev.step, train_s, train_cpu, ev.val_loss, trained, forward_only))
            self.result.train_s, self.result.cpu_s = train_s, train_cpu


# per profile: (batch size, max length, steps, examples, val examples, lrs) unless given on the command line
PROFILE_DEFAULTS: dict[str, tuple[int, int, int, int, int, str]] = {
    "tiny": (8, 96, 300, 2400, 128, "2e-3,4e-3,8e-3"),
    "smollm2-lora": (4, 64, 100, 1200, 48, "1e-3,3e-3,1e-2"),
    "smollm2-full": (16, 256, 300, 6000, 256, "1e-5,3e-5,1e-4"),
}


class Profile:
    """What is trained: ``tiny`` re-initialises the embedded model from a seed (from-scratch training);
    ``smollm2-lora`` adds seeded LoRA adapters to the pretrained SmolLM2-135M-Instruct (a real fine-tune, whose
    trajectory is expected to be smoother); ``smollm2-full`` fine-tunes all of SmolLM2's weights (the GPU profile).
    ``init(seed)`` gives the trainable starting point, ``model(init)`` a fresh model holding it."""

    def __init__(self, name: str, cache: Path) -> None:
        self.name = name
        if name == "tiny":
            self.folder = ensure_embedded_model(cache / "embedded")
        elif name in ("smollm2-lora", "smollm2-full"):
            from core.real_model import ensure_smollm2

            self.folder = ensure_smollm2(cache)
        else:
            raise SystemExit(f"unknown profile {name!r}: {', '.join(PROFILE_DEFAULTS)}")
        self.tok: Any = AutoTokenizer.from_pretrained(self.folder)
        prepare_tokenizer(self.tok)
        self.lora = TrainingConfig(lora=True, lora_r=8, lora_alpha=16, lora_dropout=0.0)

    def model(self, init: dict[str, torch.Tensor]) -> Any:
        if self.name == "tiny":
            model = build_model(self.tok, seed=0)
            model.load_state_dict(init)
            return model
        if self.name == "smollm2-full":
            return self._base()  # the pretrained weights are the start of every seed
        model = lora.wrap(self._base(), self.lora, self.folder, lora.resolve_targets(self.lora, self._base()))
        lora.load_adapter_state(model, init)
        return model

    def init(self, seed: int) -> dict[str, torch.Tensor]:
        if self.name == "tiny":
            return copy.deepcopy(build_model(self.tok, seed=1000 + seed).state_dict())  # type: ignore[arg-type]
        if self.name == "smollm2-full":
            return {}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1000 + seed)
            model = lora.wrap(self._base(), self.lora, self.folder, lora.resolve_targets(self.lora, self._base()))
        return {k: v.clone() for k, v in lora.adapter_state(model).items()}

    def trainable(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """What ``model(init)`` takes back: a trained model's weights (tiny) or adapters (smollm2-lora)."""
        if self.name == "tiny":
            return {k: v.detach().clone() for k, v in model.state_dict().items()}
        return {k: v.clone() for k, v in lora.adapter_state(model).items()}

    def _base(self) -> Any:
        return lora.load_causal_lm(self.folder, dtype=torch.float32)


def continual_records(n: int, n_val: int) -> tuple[list[Record], list[Record]]:
    """The continual profile's two files: A (``make_job_records``), job 1's; B, job 2's: half of it records of A's
    training part (verbatim: what job 1 trained on), half new ones (``make_job_records`` of another seed: the same
    tasks, new content), in a seeded shuffle."""
    first = make_job_records(n)
    a_train, _ = split_heldout(first, n_val / len(first), n_val, seed=5)  # as ``split`` does for job 1
    rng = random.Random(17)
    repeated = rng.sample(a_train, n // 2)
    second = repeated + make_job_records(n - n // 2, seed=29)
    rng.shuffle(second)
    return first, second


def split(tok: Any, records: list[Record], n_val: int, max_length: int) -> tuple[list[Example], list[Example]]:
    """(train, val) examples, ``n_val`` held out by ``core.data.split_heldout`` (the product's split)."""
    train_recs, val_recs = split_heldout(records, n_val / len(records), n_val, seed=5)
    return encode_all(tok, train_recs, max_length).examples, encode_all(tok, val_recs, max_length).examples


def dataset(
    tok: Any, examples: int, n_val: int, max_length: int, data: str = "one-epoch"
) -> tuple[list[Example], list[Example]]:
    """The benchmark's (train, val) examples: ``make_records`` (one-epoch), ``make_job_records`` (default-job) of
    ``examples`` records, or continual's job-2 file B; ``n_val`` held out."""
    if data == "continual":
        return split(tok, continual_records(examples, n_val)[1], n_val, max_length)
    records = make_job_records(examples) if data == "default-job" else make_records(examples)
    return split(tok, records, n_val, max_length)


def train_config(
    steps: int, batch_size: int, lr: float, eval_every: int, seed: int, epochs: float = 3.0
) -> TrainingConfig:
    """The settings of every benchmark run: no checkpoints, 5 % warmup, the Trainer's schedule; ``steps`` 0: by
    ``epochs``."""
    return TrainingConfig(
        max_steps=steps,
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=lr,
        eval_every=eval_every,
        checkpoint_every=0,
        seed=seed,
        warmup_ratio=0.05,
    )


def make_trainer(
    prof: Profile,
    init: dict[str, torch.Tensor],
    data: tuple[list[Example], list[Example]],
    cfg: TrainingConfig,
    device: torch.device,
) -> Trainer:
    model = prof.model(init).to(device)
    torch.manual_seed(cfg.seed)
    return Trainer(model, cfg, data[0], data[1], prof.tok.pad_token_id, device)


def run_plain(
    prof: Profile,
    init: dict[str, torch.Tensor],
    data: Any,
    cfg: TrainingConfig,
    name: str,
    device: torch.device,
    keep: list[torch.nn.Module] | None = None,
) -> RunResult:
    """The real loop, plain; ``keep`` (a list) receives the trained model (continual's job 1)."""
    res = RunResult(name, cfg.seed, cfg.learning_rate, cfg.epochs)
    tr = make_trainer(prof, init, data, cfg, device)
    n, size = len(data[0]), cfg.batch_size

    def counts() -> tuple[int, int]:  # fixed-size micro-batches in a shuffled order: the data position says it
        pos = tr.state.position
        return pos.epoch * n + min(pos.index * size, n), 0

    clock = Clock(res, device, counts)
    tr.run(clock, lambda: False, lambda: Path("."))
    res.steps = tr.state.step
    res.trained = counts()[0]
    if keep is not None:
        keep.append(tr.model)
    return res


def run_hybrid(
    prof: Profile,
    init: dict[str, torch.Tensor],
    data: Any,
    cfg: TrainingConfig,
    hcfg: HybridConfig,
    name: str,
    device: torch.device,
) -> RunResult:
    """The real loop with ``engine = "hybrid"`` (core.train.Trainer builds the engine)."""
    res = RunResult(name, cfg.seed, cfg.learning_rate, cfg.epochs)
    tr = make_trainer(prof, init, data, cfg.model_copy(update={"engine": "hybrid", "hybrid": hcfg}), device)
    eng = tr.hybrid
    assert eng is not None
    clock = Clock(res, device, lambda: (eng.counters.examples_trained, eng.counters.remeasured + eng.counters.scored))
    corrections: list[CorrectionEvent] = []

    def emit(ev: Any) -> None:
        clock(ev)
        if isinstance(ev, CorrectionEvent):
            corrections.append(ev)

    tr.run(emit, lambda: False, lambda: Path("."))
    c = eng.counters
    res.steps, res.trained, res.overhead_s = c.steps, c.examples_trained, c.overhead_s
    res.remeasured, res.rollbacks, res.stopped = c.remeasured, c.rollbacks, eng.stopped or "planned steps"
    res.scored = c.scored
    return res


# --- report ---------------------------------------------------------------------------------------


def fmt_t(x: Point | None) -> str:
    return "not reached" if x is None else f"{x.wall_s:.1f} s / {x.step}"


def fmt_cost(x: Point | None) -> str:
    """Wall s / CPU s / step / examples trained (= backward passes) / forward-only passes, at the target."""
    if x is None:
        return "not reached | - | - | -"
    return f"{x.wall_s:.1f} / {x.cpu_s:.1f} | {x.step} | {x.trained} | {x.forward_only}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="auto", help="tiny, smollm2-lora, smollm2-full; auto: tiny on the CPU")
    ap.add_argument("--data", default="default-job", choices=["default-job", "one-epoch", "continual"])
    ap.add_argument("--job1-lr", type=float, default=4e-3, help="continual: job 1's lr (plain, the same every run)")
    ap.add_argument("--job1-epochs", type=float, default=3.0, help="continual: job 1's epochs")
    ap.add_argument("--device", default="auto", help="cpu, cuda, or auto (cuda when present)")
    ap.add_argument("--max-length", type=int, help="default: per profile (PROFILE_DEFAULTS)")
    ap.add_argument(
        "--cache",
        type=Path,
        default=Path.home() / ".cache" / "trainbox-tests",
        help="where SmolLM2's conversion is cached (the tests' cache by default)",
    )
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--lrs", help="plain lr sweep; default: per profile")
    ap.add_argument("--epochs", help="plain epochs sweep; default: 1,2,3 (default-job), 1 (one-epoch)")
    ap.add_argument("--examples", type=int, help="default: per profile")
    ap.add_argument("--batch-size", type=int, help="default: per profile")
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--val", type=int, help="default: per profile")
    ap.add_argument("--tolerance", type=float, default=0.02)
    ap.add_argument("--variants", default="hybrid", help=f"comma list of {', '.join(VARIANTS)}")
    ap.add_argument(
        "--reuse-sweep",
        help="TARGET,LR,EPOCHS of an earlier run's sweep (printed by it): skip the sweep, for iterating on the hybrid",
    )
    ap.add_argument("--write", action="store_true", help="append the table to docs/BENCHMARKS.md")
    ap.add_argument("--json", type=Path, help="write every run's numbers here")
    args = ap.parse_args()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if args.profile == "auto":
        args.profile = "smollm2-full" if device.type == "cuda" else "tiny"
    if args.profile not in PROFILE_DEFAULTS:
        raise SystemExit(f"unknown profile {args.profile!r}: {', '.join(PROFILE_DEFAULTS)}")
    batch, length, _, examples, n_val, lrs_default = PROFILE_DEFAULTS[args.profile]
    args.batch_size = args.batch_size or batch
    args.max_length = args.max_length or length
    args.examples = args.examples or examples
    args.val = args.val or n_val
    args.lrs = args.lrs or lrs_default
    args.epochs = args.epochs or ("1" if args.data == "one-epoch" else "1,2,3")
    if args.data == "continual" and args.profile == "smollm2-full":
        raise SystemExit("the continual profile starts from job 1's trainable state: tiny or smollm2-lora")

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    torch.set_flush_denormal(True)
    seeds = [int(s) for s in args.seeds.split(",")]
    lrs = [float(x) for x in args.lrs.split(",")]
    epochs = [float(x) for x in args.epochs.split(",")]
    variants = [v for v in args.variants.split(",") if v]
    t_start = time.time()

    tmp = tempfile.TemporaryDirectory()
    prof = Profile(args.profile, Path(tmp.name) if args.profile == "tiny" else args.cache)
    data = dataset(prof.tok, args.examples, args.val, args.max_length, args.data)
    train, val = data

    def cfg_for(seed: int, lr: float, ep: float) -> TrainingConfig:
        return train_config(0, args.batch_size, lr, args.eval_every, seed, ep)

    starts: dict[int, dict[str, torch.Tensor]] = {}
    job1: list[RunResult] = []

    def start(seed: int) -> dict[str, torch.Tensor]:
        """The seed's starting point: its seeded init, or (continual) job 1's model trained from it on file A."""
        if args.data != "continual":
            return prof.init(seed)
        if seed not in starts:
            file_a = split(prof.tok, continual_records(args.examples, args.val)[0], args.val, args.max_length)
            trained: list[torch.nn.Module] = []
            cfg = cfg_for(seed, args.job1_lr, args.job1_epochs)
            job1.append(run_plain(prof, prof.init(seed), file_a, cfg, "job 1", device, trained))
            starts[seed] = prof.trainable(trained[0])
            print(f"seed {seed} job 1 (file A, plain): final val {job1[-1].final:.4f}", flush=True)
        return starts[seed]

    # 1. the plain sweep over lr and epochs on the first seed; target from its best loss, baseline the fastest to it
    if args.reuse_sweep:
        t_s, lr_s, ep_s = args.reuse_sweep.split(",")
        sweep, target = [], float(t_s)
        base = RunResult("plain", seeds[0], float(lr_s), float(ep_s))
    else:
        sweep = [
            run_plain(prof, start(seeds[0]), data, cfg_for(seeds[0], lr, ep), "plain", device)
            for lr in lrs
            for ep in epochs
        ]
        target = min(r.best for r in sweep) * (1 + args.tolerance)
        reached = [r for r in sweep if r.to_target(target)]
        base = min(reached, key=lambda r: r.to_target(target).cpu_s)  # type: ignore[union-attr]
    for r in sweep:
        print(
            f"sweep lr {r.lr:.0e} epochs {r.epochs:g}: best val {r.best:.4f} final {r.final:.4f} "
            f"to-target {fmt_t(r.to_target(target))}",
            flush=True,
        )
    print(f"target {target:.4f}; baseline lr {base.lr:.0e} epochs {base.epochs:g}", flush=True)

    # 2. per seed: the baseline and the variants, alternating; order rotates per seed
    runs: dict[str, list[RunResult]] = {"plain": [], **{v: [] for v in variants}}
    for i, seed in enumerate(seeds):
        init = start(seed)
        order = ["plain", *variants]
        order = order[i % len(order) :] + order[: i % len(order)]
        for name in order:
            if name == "plain":
                r = run_plain(prof, init, data, cfg_for(seed, base.lr, base.epochs), "plain", device)
            else:
                hcfg = HybridConfig(**VARIANTS[name])
                r = run_hybrid(prof, init, data, cfg_for(seed, base.lr, max(epochs)), hcfg, name, device)
            runs[name].append(r)
            print(
                f"seed {seed} {name:14s} final {r.final:.4f} to-target {fmt_t(r.to_target(target))} "
                f"cpu {fmt_cost(r.to_target(target))} train {r.train_s:.1f}s cpu {r.cpu_s:.1f}s steps {r.steps} "
                f"trained {r.trained} forward-only {r.remeasured + r.scored} overhead {r.overhead_s:.2f}s "
                f"rollbacks {r.rollbacks} {r.stopped}",
                flush=True,
            )

    # 3. table
    lines = [
        f"Command: `OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_hybrid.py --profile {args.profile} "
        f"--data {args.data} --device {device.type} --seeds {args.seeds} --lrs {args.lrs} --epochs {args.epochs} "
        f"--batch-size {args.batch_size} --max-length {args.max_length} --examples {args.examples} --val {args.val} "
        f"--eval-every {args.eval_every} --variants {args.variants}"
        + (f" --reuse-sweep {args.reuse_sweep}" if args.reuse_sweep else "")
        + (f" --job1-lr {args.job1_lr:g} --job1-epochs {args.job1_epochs:g}" if args.data == "continual" else "")
        + "`",
        "",
        f"Machine: {platform.machine()}, nproc {os.cpu_count()}, torch {torch.__version__}, "
        f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else '1 CPU thread'}, "
        f"Python {platform.python_version()}; profile {args.profile} ({prof.folder.name}), data {args.data}: "
        f"{len(train)} train / {len(val)} val examples, batch {args.batch_size}, max length {args.max_length}, "
        f"eval every {args.eval_every}. Total bench time {time.time() - t_start:.0f} s.",
        "",
        *(
            [
                "Job 1 (file A, plain, lr "
                f"{args.job1_lr:g} x {args.job1_epochs:g} epochs from the seed's init; every job-2 run of a seed "
                "starts from its model): " + ", ".join(f"seed {r.seed} final val {r.final:.4f}" for r in job1) + ".",
                "",
            ]
            if job1
            else []
        ),
        (
            "Plain sweep not rerun (--reuse-sweep, an earlier run's)"
            if args.reuse_sweep
            else f"Plain sweep (seed {seeds[0]}): "
            + ", ".join(
                f"lr {r.lr:.0e} x {r.epochs:g} ep -> best {r.best:.4f} ({fmt_t(r.to_target(target))}, "
                f"{'-' if r.to_target(target) is None else f'{r.to_target(target).cpu_s:.1f} CPU s'})"  # type: ignore[union-attr]
                for r in sweep
            )
        )
        + f". Target = best {target / (1 + args.tolerance):.4f} x {1 + args.tolerance:.2f} = {target:.4f}; baseline "
        f"lr {base.lr:.0e} x {base.epochs:g} epochs (the fastest to the target in CPU seconds); the hybrid runs lr "
        f"{base.lr:.0e} for up to {max(epochs):g} epochs.",
        "",
        "To target: training wall / CPU seconds (evaluation excluded), the step, examples trained (= backward "
        "passes: one per example trained) and the engine's forward-only passes (scoring pass, re-measurements) up "
        "to the first evaluation at or below the target. Speedup = the plain run's CPU seconds to target / this "
        "run's, same seed.",
        "",
        "| seed | engine | final val (vs baseline) | to target: wall / CPU s | step | examples trained | forward-only "
        "| speedup (CPU s) | steps run | rollbacks | overhead share | stop |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    summary: dict[str, dict[str, float | None]] = {}
    for name in runs:
        speedups, finals, rel = [], [], []
        for i, r in enumerate(runs[name]):
            p = runs["plain"][i]
            tt, pt = r.to_target(target), p.to_target(target)
            sp = pt.cpu_s / tt.cpu_s if tt and pt else None
            if sp is not None:
                speedups.append(sp)
            finals.append(r.final)
            rel.append(r.final / p.final - 1)
            share = r.overhead_s / max(r.train_s, 1e-9)
            lines.append(
                f"| {r.seed} | {name} | {r.final:.4f} ({r.final / p.final - 1:+.1%}) | {fmt_cost(tt)} | "
                f"{'-' if sp is None else f'{sp:.2f}x'} | {r.steps} | {r.rollbacks} | {share:.1%} | "
                f"{r.stopped or '-'} |"
            )
        summary[name] = {
            "median_speedup": statistics.median(speedups) if speedups else None,
            "median_final": statistics.median(finals),
            "median_final_rel": statistics.median(rel),
            "reached": sum(1 for r in runs[name] if r.to_target(target)),
            "overhead": statistics.median(r.overhead_s / max(r.train_s, 1e-9) for r in runs[name]),
        }
    lines += [
        "",
        "| engine | median speedup (CPU s) | median final val (vs baseline) | seeds reaching target "
        "| median overhead share |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, sm in summary.items():
        ms = sm["median_speedup"]
        lines.append(
            f"| {name} | {'-' if ms is None else f'{ms:.2f}x'} | {sm['median_final']:.4f} "
            f"({sm['median_final_rel']:+.1%}) | {sm['reached']}/{len(seeds)} | {sm['overhead']:.1%} |"
        )
    table = "\n".join(lines)
    print("\n" + table)
    if args.json:
        everything = {k: [asdict(r) for r in v] for k, v in runs.items()} | {"sweep": [asdict(r) for r in sweep]}
        args.json.write_text(json.dumps(everything, indent=1))
    if args.write:
        with open(ROOT / "docs" / "BENCHMARKS.md", "a", encoding="utf-8") as f:
            f.write("\n" + table + "\n")


if __name__ == "__main__":
    main()
