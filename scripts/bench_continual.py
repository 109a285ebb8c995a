"""Benchmark: continual training forgets; how much does replay win back, at what time cost (issue 17, item 6).

Three different jobs (scripts/continual_data.py: arithmetic as prompt/completion, French chat as
messages, simple-English stories as text) are trained in sequence, each continuing the previous model,
the way trainbox trains a queue: a real daemon (``python -m cli daemon``) on a fresh home per arm and
seed, each file renamed into its inbox once the previous one sits in ``queue/done/`` (its version
registered and gated). The home's ``trainbox.toml`` differs between arms only in ``replay_share``:
``plain`` is 0, ``replay`` the default, and ``--shares`` adds more arms. Everything else is trainbox's
defaults (3 epochs, automatic learning rate, batch 8, evaluation every 25 steps) but ``max_length``,
one CPU thread per worker, the data seed and ``models.forgetting_tolerance`` (raised so that every
version is promoted: the benchmark measures forgetting along one unbroken chain; the gate still runs
and is timed).

After the three jobs the daemon is stopped and every version is scored (``core.evaluate.score``, the
gate's own loss: mean loss per trained token) on every job's held-out set (``core.evaluate.
heldout_records``: the split the worker held out of that job's file, never trained on): the forgetting
matrix ``L[i][j]``, loss on job i's set after job j. Forgetting of set i after job j > i is
``L[i][j] - L[i][i]``; an arm's forgetting is the mean over those pairs. Also measured per job, from
the home's DB and metrics (``management.report_facts.gather`` and ``report_sections.time_split``, as the
job report splits a job's time): the worker's wall-clock, its training part (steps and final save:
start-up, evaluation and checkpoints apart), and the gate's time (the version's registration to its
verdict event). Arms alternate within each seed, their order rotated from seed to seed; ratios are
medians of per-seed ratios (drift between seeds cancels).

Run:  OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_continual.py --shares 0.1,0.25 --write
``--write`` replaces the section "## Continual training: forgetting, plain vs replay (issue 17)" of
docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

# bench_throughput sets the benchmarks' environment (one thread, offline, no progress bars) on import
from bench_throughput import paired_ratio, replace_section  # noqa: E402
from continual_data import JOBS  # noqa: E402

from tests.e2e_helpers import DaemonProc, wait_for  # noqa: E402
from trainbox.home import Home  # noqa: E402

SECTION = "Continual training: forgetting, plain vs replay (issue 17)"
TRAIN_PART = "training steps and the final save"  # report_sections.time_split's label
NO_TOLERANCE_LIMIT = 10.0  # models.forgetting_tolerance for the benchmark: every version promoted

Matrix = list[list[float | None]]  # L[i][j]: loss on job i's held-out set after job j (None where j < i)


# --- pure parts --------------------------------------------------------------------------------------


def forgetting_pairs(matrix: Matrix) -> list[float]:
    """``L[i][j] - L[i][i]`` for every earlier set i and later job j > i: how much worse set i got."""
    out = []
    for i, row in enumerate(matrix):
        own = row[i]
        for later in row[i + 1 :]:
            if own is None or later is None:
                raise ValueError(f"the matrix lacks a score of set {i}: {row}")
            out.append(later - own)
    return out


def mean_forgetting(matrix: Matrix) -> float:
    pairs = forgetting_pairs(matrix)
    if not pairs:
        raise ValueError("forgetting needs at least two jobs")
    return statistics.fmean(pairs)


def reduction(plain: float, replay: float) -> float:
    """The share of plain's forgetting that replay removed: 1 - replay / plain (0.5: halved)."""
    if plain <= 0:
        raise ValueError(f"plain training did not forget (mean forgetting {plain:.4f}): nothing to reduce")
    return 1.0 - replay / plain


def rotated(arms: Sequence[str], seed_index: int) -> list[str]:
    """The arms' order for one seed: rotated by the seed's index, so no arm always runs first."""
    k = seed_index % len(arms)
    return list(arms[k:]) + list(arms[:k])


def arm_name(share: float) -> str:
    return "plain" if share == 0 else f"replay {share:g}"


@dataclass
class JobTimes:
    worker_s: float  # the worker's wall-clock (every run of the job)
    train_s: float  # its training steps and final save (start-up, evaluation and checkpoints apart)
    gate_s: float | None  # registration to verdict; None when the job made no version
    steps: int
    gate_evaluated: bool | None = None  # whether the gate started an evaluation child (runs/job-N/gate.log)


@dataclass
class ArmRun:
    arm: str
    share: float
    seed: int
    jobs: list[str]
    matrix: Matrix  # L[i][j]
    base: list[float | None]  # each set's loss on the model the sequence started from
    times: list[JobTimes]
    promoted: list[bool]
    wall_s: float = 0.0  # the whole sequence, daemon start to the last job filed

    @property
    def forgetting(self) -> float:
        return mean_forgetting(self.matrix)

    def train_s(self, first_job: int = 1) -> float:
        """Training time of the jobs replay can change (every job after the first: the first has no past)."""
        return sum(t.train_s for t in self.times[first_job:])

    def worker_s(self, first_job: int = 1) -> float:
        return sum(t.worker_s for t in self.times[first_job:])

    def gate_s(self) -> float:
        return sum(t.gate_s or 0.0 for t in self.times)

    def steps(self, first_job: int = 1) -> int:
        return sum(t.steps for t in self.times[first_job:])


@dataclass
class ArmSummary:
    arm: str
    seeds: int
    forgetting: float  # mean over seeds of the mean forgetting
    reduction: float | None  # vs plain, of the seed means; None for plain
    train_ratio: float | None  # median over seeds of (arm / plain) training time of jobs 2..n
    worker_ratio: float | None
    steps_ratio: float | None  # the same for optimizer steps: the work, which timing noise does not blur
    train_s: float  # median over seeds, jobs 2..n
    worker_s: float
    gate_s: float  # median over seeds, all jobs
    steps: list[int] = field(default_factory=list)  # per job, from the first seed


def summarise(runs: Sequence[ArmRun]) -> list[ArmSummary]:
    """One row per arm, plain first; ratios are paired by seed with plain's run of the same seed."""
    arms = sorted({r.arm for r in runs}, key=lambda a: (a != "plain", a))
    plain = {r.seed: r for r in runs if r.arm == "plain"}
    out = []
    for arm in arms:
        mine = sorted((r for r in runs if r.arm == arm), key=lambda r: r.seed)
        paired = [(r, plain[r.seed]) for r in mine if r.seed in plain]
        forgetting = statistics.fmean(r.forgetting for r in mine)
        plain_forgetting = statistics.fmean(p.forgetting for _, p in paired) if paired else None
        is_plain = arm == "plain"
        out.append(
            ArmSummary(
                arm=arm,
                seeds=len(mine),
                forgetting=forgetting,
                reduction=None if is_plain or plain_forgetting is None else reduction(plain_forgetting, forgetting),
                train_ratio=None
                if is_plain or not paired
                else paired_ratio([r.train_s() for r, _ in paired], [p.train_s() for _, p in paired]),
                worker_ratio=None
                if is_plain or not paired
                else paired_ratio([r.worker_s() for r, _ in paired], [p.worker_s() for _, p in paired]),
                steps_ratio=None
                if is_plain or not paired
                else paired_ratio([r.steps() for r, _ in paired], [p.steps() for _, p in paired]),
                train_s=statistics.median(r.train_s() for r in mine),
                worker_s=statistics.median(r.worker_s() for r in mine),
                gate_s=statistics.median(r.gate_s() for r in mine),
                steps=[t.steps for t in mine[0].times],
            )
        )
    return out


def _loss(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def matrix_table(run: ArmRun) -> str:
    """One run's forgetting matrix as Markdown: a row per held-out set, a column per model."""
    head = ["held-out set", "before", *(f"after {j + 1}. {name}" for j, name in enumerate(run.jobs))]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(["---"] * len(head)) + " |"]
    for i, name in enumerate(run.jobs):
        cells = [f"{i + 1}. {name}", _loss(run.base[i]), *(_loss(x) for x in run.matrix[i])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_table(rows: Sequence[ArmSummary]) -> str:
    head = (
        "| arm | seeds | mean forgetting | reduction vs plain | training time, jobs 2-3 (ratio) "
        "| worker wall-clock, jobs 2-3 (ratio) | steps, jobs 2-3 (ratio) | gate time, 3 jobs | steps per job |"
    )
    lines = [head, "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        red = "-" if r.reduction is None else f"{r.reduction:.0%}"
        tr = "1.00x" if r.train_ratio is None else f"{r.train_ratio:.2f}x"
        wr = "1.00x" if r.worker_ratio is None else f"{r.worker_ratio:.2f}x"
        sr = "1.00x" if r.steps_ratio is None else f"{r.steps_ratio:.2f}x"
        lines.append(
            f"| {r.arm} | {r.seeds} | {r.forgetting:+.3f} | {red} | {r.train_s:.1f} s ({tr}) "
            f"| {r.worker_s:.1f} s ({wr}) | {sum(r.steps[1:])} ({sr}) | {r.gate_s:.1f} s "
            f"| {', '.join(map(str, r.steps))} |"
        )
    return "\n".join(lines)


# --- one sequence: a daemon on a fresh home ---------------------------------------------------------


def replay_supported() -> bool:
    from trainbox.config import TrainingConfig

    return "replay_share" in TrainingConfig.model_fields


def default_share() -> float | None:
    from trainbox.config import TrainingConfig

    field_ = TrainingConfig.model_fields.get("replay_share")
    return None if field_ is None else float(field_.default)


def home_config(seed: int, share: float, max_length: int) -> str:
    """The home's trainbox.toml: defaults but the arm's replay share, the seed and the bench's knobs."""
    from trainbox.config import ModelsConfig

    training = [f"seed = {seed}", f"max_length = {max_length}", "threads = 1"]
    if replay_supported():
        training.append(f"replay_share = {share}")
    elif share:
        raise SystemExit("this trainbox has no training.replay_share: run with --plain-only")
    models = []
    if "forgetting_tolerance" in ModelsConfig.model_fields:
        models.append(f"forgetting_tolerance = {NO_TOLERANCE_LIMIT}")
    text = "[daemon]\npoll_interval = 0.2\nsettle_seconds = 0.5\nrescan_interval = 1.0\n\n"
    text += "[training]\n" + "\n".join(training) + "\n"
    if models:
        text += "\n[models]\n" + "\n".join(models) + "\n"
    return text


def _filed(home: Home, name: str) -> str | None:
    """Where the spool filed a dropped file (``<job id>__<name>``), once it is filed."""
    for where in ("done", "failed"):
        if any((home.done if where == "done" else home.failed).glob(f"*__{name}")):
            return where
    return None


def run_sequence(model: Path, files: list[Path], share: float, seed: int, max_length: int, log: Path) -> ArmRun:
    """The jobs' files through a real daemon on a fresh home, one after another; then scored."""
    with tempfile.TemporaryDirectory(prefix="tb-bench-continual-") as tmp:
        home = Home(Path(tmp) / "home").ensure()
        home.config_file.write_text(home_config(seed, share, max_length))
        shutil.copytree(model, home.embedded_model)
        daemon = DaemonProc(home, env={"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
        t0 = time.monotonic()
        try:
            for f in files:
                staged = home.root / f".{f.name}.part"
                shutil.copyfile(f, staged)
                os.rename(staged, home.inbox / f.name)
                where = wait_for(functools.partial(_filed, home, f.name), 900, f"{f.name} filed", every=0.2)
                if where != "done":
                    raise RuntimeError(f"{f.name} was filed in {where}/")
            wall = time.monotonic() - t0
        except BaseException:
            daemon.stop()
            with open(log, "a", encoding="utf-8") as out:
                out.write(f"--- {arm_name(share)}, seed {seed}\n{daemon.log_text()}")
            print(f"the daemon's log: {log}", file=sys.stderr)
            raise
        daemon.stop()
        run = collect(home, [f.stem for f in files], share, seed)
        run.wall_s = wall
        return run


def collect(home: Home, names: list[str], share: float, seed: int) -> ArmRun:
    """The forgetting matrix and each job's times, from a home whose daemon has stopped."""
    from core.evaluate import heldout_records, score
    from daemon.gate import GATE_LOG
    from management.db import ModelDB
    from management.report_facts import gather
    from management.report_sections import time_split

    db = ModelDB(home.db_url)
    try:
        jobs = sorted(db.jobs(), key=lambda j: j.id)
        if [j.name for j in jobs] != [f"{n}.jsonl" for n in names]:
            raise RuntimeError(f"unexpected jobs in the home: {[j.name for j in jobs]}")
        sets, models, times, promoted = [], [], [], []
        for job in jobs:
            run_dir = home.run_dir(job.id)
            sets.append(heldout_records(run_dir, home.done / job.spool_name))
            version = db.version_of_job(job.id)
            if version is None or not version.path:
                raise RuntimeError(f"job {job.id} made no version")
            models.append(Path(version.path))
            facts = gather(home, db, job.id)
            split = time_split(
                facts.runs,
                [(p.step, p.time) for p in facts.series.train if p.time is not None],
                [(e.step, e.time) for e in facts.series.evals if e.time is not None],
                facts.checkpoint_times,
                1,
            )
            verdicts = [e for e in db.events(job.id) if e.kind in ("version_promoted", "version_not_promoted")]
            gate_s = verdicts[-1].time - version.created_at if verdicts else None
            promoted.append(bool(verdicts) and verdicts[-1].kind == "version_promoted")
            steps = facts.result.step if facts.result is not None else 0
            evaluated = (run_dir / GATE_LOG).is_file()
            times.append(JobTimes(split.wall_s, split.parts.get(TRAIN_PART, 0.0), gate_s, steps, evaluated))
        matrix: Matrix = [[None] * len(jobs) for _ in jobs]
        for j, model_dir in enumerate(models):
            for i in range(j + 1):
                records, max_length = sets[i]
                matrix[i][j] = score(model_dir, records, max_length, 8)
        base = [score(home.embedded_model, records, max_length, 8) for records, max_length in sets]
    finally:
        db.close()
    return ArmRun(arm_name(share), share, seed, names, matrix, base, times, promoted)


# --- main ----------------------------------------------------------------------------------------


def write_files(folder: Path, n: int, seed: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name, make in JOBS.items():
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in make(n, seed)), encoding="utf-8")
        out.append(path)
    return out


def verdict(row: ArmSummary) -> str:
    """One arm against issue 17's acceptance line: forgetting at least halved, at most 1.25x training time."""
    if row.reduction is None or row.train_ratio is None or row.steps_ratio is None:
        return "no plain run to compare with"
    ok = row.reduction >= 0.5 and row.train_ratio <= 1.25
    steps_ok = row.reduction >= 0.5 and row.steps_ratio <= 1.25
    if ok == steps_ok:
        said = (
            "holds on both the measured time and the steps"
            if ok
            else "holds on neither the measured time nor the steps"
        )
    else:
        said = (
            f"{'holds' if ok else 'does not hold'} on the measured time, {'holds' if steps_ok else 'not'} on the steps"
        )
    return (
        f"forgetting cut by {row.reduction:.0%} at {row.train_ratio:.2f}x the training time "
        f"({row.steps_ratio:.2f}x the steps, {row.worker_ratio:.2f}x the worker's wall-clock): the acceptance "
        f"line (at least half, at most 1.25x) {said}"
    )


def command_args(args: argparse.Namespace) -> str:
    """The options that made the numbers, spelled out (a summary re-made with --load names the run's own)."""
    seeds = ",".join(map(str, args.seeds))
    shares = f" --shares {args.shares}" if args.shares else ""
    return f"--seeds {seeds}{shares} --examples {args.examples} --max-length {args.max_length} --write"


def report(runs: list[ArmRun], rows: list[ArmSummary], args: argparse.Namespace, elapsed: float) -> str:
    import torch

    plain = next((r for r in runs if r.arm == "plain"), None)
    default = next((r for r in rows if r.arm == arm_name(args.default_share)), None) if args.default_share else None
    lines = [
        f"Command: `OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_continual.py {command_args(args)}` "
        f"({time.strftime('%Y-%m-%d')}, {elapsed / 60:.1f} min, {platform.machine()}, nproc {os.cpu_count()}, "
        f"torch {torch.__version__}, 1 CPU thread per worker; other engineers' jobs shared the 2 cores). "
        f"Jobs (scripts/continual_data.py, {args.examples} examples each, held-out split by the worker): "
        f"{', '.join(f'{i + 1}. {n}' for i, n in enumerate(JOBS))}; embedded model, trainbox's default training "
        f"settings but `max_length = {args.max_length}`, `threads = 1` and `seed` = the seed; "
        f"`models.forgetting_tolerance = {NO_TOLERANCE_LIMIT:g}` so every version is promoted (one unbroken "
        "chain per arm). Seeds: " + ", ".join(map(str, args.seeds)) + "; arms alternate, order rotated per seed.",
        "",
        summary_table(rows),
        "",
        "Mean forgetting: the loss on an earlier job's held-out set after a later job minus its loss right "
        "after its own job, averaged over the 3 (set, later job) pairs and the seeds. Reduction vs plain: "
        "1 - arm / plain. Training time: the jobs replay can change (2 and 3), from the first step to the "
        "final save without evaluations and checkpoints (the job report's split); worker wall-clock adds "
        "start-up, evaluation and checkpoints; ratios are medians of per-seed ratios to plain. Steps: the "
        "optimizer steps of jobs 2 and 3 (replayed examples are added to the job's own, so an epoch grows "
        "by share / (1 - share)): the work replay adds, which the shared machine's timing noise does not blur. "
        "Gate time: each version's registration to its verdict, summed over the 3 jobs.",
    ]
    evaluated = [t.gate_evaluated for r in runs for t in r.times]
    if None not in evaluated:
        lines[-1] += (
            f" The gate started an evaluation child (`python -m core.evaluate`) for {sum(map(bool, evaluated))} of "
            f"the {len(evaluated)} versions; it decided the others from the worker's own losses."
        )
    if default is not None:
        lines += ["", f"**Default share ({args.default_share:g}): {verdict(default)}.**"]
    others = [r for r in rows if r.reduction is not None and r is not default]
    if others:
        lines += ["", "Other shares:", "", *(f"- {r.arm}: {verdict(r)}." for r in others)]
    if plain is not None:
        lines += ["", f"Forgetting matrix, plain, seed {plain.seed} (rows: held-out sets; columns: models):", ""]
        lines.append(matrix_table(plain))
    for arm in sorted({r.arm for r in runs} - {"plain"}):
        run = next(r for r in runs if r.arm == arm and (plain is None or r.seed == plain.seed))
        lines += ["", f"The same, {arm}, seed {run.seed}:", "", matrix_table(run)]
    return "\n".join(lines) + "\n"


def load_run(saved: dict[str, Any]) -> ArmRun:
    return ArmRun(**{**saved, "times": [JobTimes(**t) for t in saved["times"]]})


def run_all(args: argparse.Namespace, shares: list[float]) -> list[ArmRun]:
    """Every seed's sequence for every arm, arms alternating in an order rotated per seed."""
    from core.embedded import ensure_embedded_model

    runs: list[ArmRun] = []
    with tempfile.TemporaryDirectory(prefix="tb-bench-continual-") as tmp:
        model = ensure_embedded_model(Path(tmp) / "model")
        log = args.out.with_suffix(".daemons.log") if args.out else Path(tempfile.gettempdir()) / "bench_continual.log"
        for k, seed in enumerate(args.seeds):
            files = write_files(Path(tmp) / f"data-{seed}", args.examples, seed)
            by_name = {arm_name(s): s for s in shares}
            for arm in rotated(list(by_name), k):
                t = time.monotonic()
                run = run_sequence(model, files, by_name[arm], seed, args.max_length, log)
                runs.append(run)
                print(
                    f"seed {seed} {arm}: forgetting {run.forgetting:+.3f}, train {run.train_s():.1f} s, "
                    f"worker {run.worker_s():.1f} s, gate {run.gate_s():.1f} s, steps "
                    f"{[x.steps for x in run.times]}, sequence {time.monotonic() - t:.0f} s",
                    flush=True,
                )
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    parser.add_argument("--shares", default="", help="more replay shares to run as arms, e.g. 0.1,0.25")
    parser.add_argument("--plain-only", action="store_true", help="no replay arms (a trainbox without replay)")
    parser.add_argument("--examples", type=int, default=240, help="examples per job file")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--out", type=Path, help="write every run's numbers here as JSON")
    parser.add_argument("--load", type=Path, help="no runs: summarise an --out file of an earlier run (same options)")
    parser.add_argument("--write", action="store_true", help="replace this benchmark's section of docs/BENCHMARKS.md")
    args = parser.parse_args()
    args.default_share = None if args.plain_only else default_share()
    shares = [0.0]
    if args.default_share is not None:
        shares.append(args.default_share)
    shares += [float(s) for s in args.shares.split(",") if s and float(s) not in shares]
    if args.plain_only and len(shares) > 1:
        raise SystemExit("--plain-only runs one arm; drop --shares")
    if len(shares) == 1 and not args.plain_only:
        raise SystemExit("this trainbox has no training.replay_share: run with --plain-only")
    if args.load is not None:
        saved = json.loads(args.load.read_text())
        saved = saved if isinstance(saved, dict) else {"runs": saved}  # the first runs' files: a bare list
        runs = [load_run(r) for r in saved["runs"]]
        elapsed = float(saved.get("elapsed_s") or sum(r.wall_s for r in runs))  # else: the sequences alone
    else:
        started = time.monotonic()
        runs = run_all(args, shares)
        elapsed = time.monotonic() - started
    rows = summarise(runs)
    print(summary_table(rows))
    for r in rows:
        if r.reduction is not None:
            print(f"{r.arm}: {verdict(r)}")
    if args.out is not None and args.load is None:
        args.out.write_text(json.dumps({"runs": [asdict(r) for r in runs], "elapsed_s": elapsed}, indent=1))
    if args.write:
        doc = ROOT / "docs" / "BENCHMARKS.md"
        doc.write_text(replace_section(doc.read_text(encoding="utf-8"), SECTION, report(runs, rows, args, elapsed)))


if __name__ == "__main__":
    main()
