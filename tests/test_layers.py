"""Package boundaries: ``management/`` is torch-free (the gate's evaluation program is
``core/evaluate.py``, run as a child), so the daemon, the CLI and retention never load torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_importing_every_management_module_loads_no_torch() -> None:
    modules = sorted(f"management.{p.stem}" for p in (ROOT / "management").glob("*.py") if p.stem != "__init__")
    modules += ["daemon.main", "daemon.gate", "safety.watchdog", "safety.crash"]
    code = f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False", modules
