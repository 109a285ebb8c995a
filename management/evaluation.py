"""The gate's evaluation child: its argv, and running it to its end when a person waits (``promote``).

The daemon never waits on it: it starts and reaps the child in its tick (``daemon/gate.py``) and reads
the losses with ``parse_losses``. Kept apart from ``management/versions.py`` (the pointer and the gate's
decisions), which builds the argv and judges the losses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from trainbox.config import Settings

QUIET_OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1"}


EVALUATE_COMMAND = (sys.executable, "-m", "core.evaluate")  # the arguments follow (the daemon's kept child: without it)


class EvaluationError(RuntimeError):
    """The evaluation child gave no losses; the message says why."""


def evaluate_argv(
    models: list[Path],
    settings: Settings,
    eval_path: Path | None,
    run_dir: Path | None,
    max_length: int = 0,
    program: list[str] | None = None,
) -> list[str]:
    """The gate's evaluation child: ``python -m core.evaluate`` (``program`` replaces that prefix in
    tests) scoring ``models`` on a frozen file or a job's held-out set."""
    argv = list(program or EVALUATE_COMMAND)
    for m in models:
        argv += ["--model", str(m)]
    if eval_path is not None:
        argv += ["--eval", str(eval_path)]
    elif run_dir is not None:
        argv += ["--run-dir", str(run_dir)]
    argv += ["--max-examples", str(settings.models.eval_max_examples)]
    argv += ["--max-length", str(settings.models.eval_max_length or max_length)]
    return argv


def run_evaluate(argv: list[str], timeout: float) -> str:
    """Run an evaluation child to its end (``trainbox models promote``: a person waits; the daemon
    never calls this, it starts and reaps the child in its tick: ``daemon/gate.py``); its JSON line."""
    try:
        proc = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            env={**QUIET_OFFLINE_ENV, **os.environ},
        )
    except subprocess.TimeoutExpired:
        raise EvaluationError(f"evaluation took longer than models.eval_timeout ({timeout}s)") from None
    if proc.returncode != 0:
        tail = proc.stderr.decode(errors="replace").strip().splitlines()[-3:]
        raise EvaluationError(f"evaluation failed (exit {proc.returncode}): {' | '.join(tail)}")
    return proc.stdout.decode().strip().splitlines()[-1]  # the JSON object: ``parse_losses``, ``parse_memory``


def parse_losses(text: str) -> dict[str, float | None]:
    """The losses out of ``core.evaluate``'s JSON object."""
    losses: dict[str, float | None] = json.loads(text)["losses"]
    return losses


def parse_memory(text: str) -> list[dict[str, Any]] | None:
    """The memory-set rows out of ``core.evaluate``'s JSON object (None: it scored none)."""
    rows: list[dict[str, Any]] | None = json.loads(text).get("memory")
    return rows
