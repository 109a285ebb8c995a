"""What each tracker costs the training loop per step, side by side in one run.

For each round and each variant (the order alternating between rounds): a fresh home with ``[tracking]`` set,
the trackers opened as the worker opens them (``core.tracking.open_tracking``), then the same step events a
job with ``log_every = 1`` sends, timed; opening and closing (the final MLflow write, W&B's teardown) are
timed apart. ``mlflow, per step`` is the MLflow tracker with its batching off (a ``log_batch`` per step), to
show what the batching saves. Prints medians; ``--write`` appends the table to docs/BENCHMARKS.md.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_trackers.py --rounds 3 --steps 300 --write
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core import tracking_mlflow  # noqa: E402
from core.events import StepEvent  # noqa: E402
from core.tracking import open_tracking  # noqa: E402
from trainbox.config import TrainingConfig  # noqa: E402
from trainbox.home import Home  # noqa: E402
from trainbox.jobspec import JobSpec  # noqa: E402

VARIANTS = {
    "tensorboard": "tensorboard = true",
    "mlflow (SQLite store, batched: the default)": "mlflow = true",
    "mlflow, per step (batching off)": "mlflow = true",
    "wandb (offline)": "wandb = true",
}


def measure(variant: str, root: Path, steps: int) -> tuple[float, float, float]:
    """(ms per step event, s to open, s to close) for one fresh home."""
    home = Home(root).ensure()
    home.config_file.write_text(f"[tracking]\n{VARIANTS[variant]}\n")
    run_dir = home.run_dir(1)
    run_dir.mkdir(parents=True)
    spec = JobSpec(
        job_id=1, job_name="bench.jsonl", data_file="bench.jsonl", embedded_model_dir=str(home.embedded_model),
        run_dir=str(run_dir), status_file=str(home.status / "training.json"), db_url=home.db_url,
        training=TrainingConfig(max_steps=steps),
    )  # fmt: skip
    per_step = variant.startswith("mlflow, per step")
    tracking_mlflow.FLUSH_S, tracking_mlflow.FLUSH_METRICS = (0.0, 1) if per_step else (5.0, 900)
    tracking = open_tracking(spec)
    t0 = time.perf_counter()
    tracking.start(0, 1)
    opened = time.perf_counter() - t0
    assert tracking.trackers, f"{variant}: the tracker did not open"
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        tracking(StepEvent(step, steps, 3.0 / step, 1e-3, 0.5, 512, 4000.0, step / 100, float(step)))
    stepping = time.perf_counter() - t0
    t0 = time.perf_counter()
    tracking.close("completed")
    closed = time.perf_counter() - t0
    assert tracking.trackers, f"{variant}: the tracker failed (see the warning above)"
    return stepping / steps * 1000, opened, closed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--write", action="store_true", help="append the result to docs/BENCHMARKS.md")
    args = parser.parse_args()
    results: dict[str, list[tuple[float, float, float]]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = list(VARIANTS) if r % 2 == 0 else list(reversed(VARIANTS))
            for i, variant in enumerate(order):
                results[variant].append(measure(variant, Path(tmp) / f"r{r}-{i}", args.steps))
    rows = []
    for variant, runs in results.items():
        ms = [x[0] for x in runs]
        rows.append(
            f"| {variant} | {', '.join(f'{x:.2f}' for x in ms)} | {statistics.median(ms):.2f} ms "
            f"| {statistics.median(x[1] for x in runs):.2f} s | {statistics.median(x[2] for x in runs):.2f} s |"
        )
    per_step = statistics.median(x[0] for x in results["mlflow, per step (batching off)"])
    batched = statistics.median(x[0] for x in results["mlflow (SQLite store, batched: the default)"])
    lines = [
        "\n## Experiment trackers: what they cost a training step (issue 19)\n",
        f"### Tracker cost per step ({time.strftime('%Y-%m-%d')}, {platform.machine()}, {args.steps} step events, "
        f"{args.rounds} rounds alternating)\n",
        f"`OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_trackers.py --rounds {args.rounds} --steps {args.steps}`:"
        " the step events of a job with `log_every = 1` fed to the trackers as the worker opens them (fresh home"
        " each time; open and close timed apart).\n",
        "| tracker | ms per step, each round | median | open | close |",
        "| --- | --- | ---: | ---: | ---: |",
        *rows,
        "",
        f"MLflow batched vs a write per step: {per_step / batched:.0f}x less time per step"
        " (the SQLite store's first open runs MLflow's migrations: the open column).\n",
    ]
    print("\n".join(lines))
    if args.write:
        with open(ROOT / "docs" / "BENCHMARKS.md", "a", encoding="utf-8") as f:
            f.write("\n".join(lines))


if __name__ == "__main__":
    main()
