"""The packages' layering (docs/ARCHITECTURE.md, "Packages and layers"), read from the source with ``ast``.

Every ``import`` and ``from ... import`` of every module, top-level or inside a function, is mapped to
the package it names. A package may import only packages on a lower layer; ``trainbox/`` imports none
of ours; the packages never import each other in a cycle. The one exception is a child program: a
module run only as ``python -m`` in a process of its own may import an upper layer inside its
functions (the eval gate's scorer needs the trainer's loss, and its process may load torch).

The status server and the watchdog also never load torch or transformers: checked by running them.
"""

from __future__ import annotations

import ast
import importlib
import json
import os
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.monitoring_helpers import populate, write_daemon_status, write_training_status
from trainbox.home import Home

REPO = Path(__file__).resolve().parent.parent

# Lower layers first; a package imports only packages on a lower layer than its own.
LAYERS: list[set[str]] = [
    {"trainbox"},  # foundations: formats and folders every process shares
    {"management"},  # the model DB, versions, retention
    {"core", "daemon", "safety", "monitoring"},  # one process each (worker, daemon, watchdog, server)
    {"cli"},  # the command line, `trainbox up`, systemd units: starts all of the above
]
LAYER = {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}


@dataclass(frozen=True)
class Import:
    module: str  # the importing file, relative to the repo
    target: str  # the imported module's dotted name
    line: int
    in_function: bool

    @property
    def source_pkg(self) -> str:
        return self.module.split("/")[0]

    @property
    def target_pkg(self) -> str:
        return self.target.split(".")[0]

    def __str__(self) -> str:
        where = "inside a function" if self.in_function else "at module level"
        return f"{self.module}:{self.line} imports {self.target} ({where})"


def packages() -> list[str]:
    """The packages pyproject installs."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    return list(config["tool"]["setuptools"]["packages"])


def imports_of(path: Path) -> list[Import]:
    rel = path.relative_to(REPO).as_posix()
    found: list[Import] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.extend(Import(rel, alias.name, child.lineno, in_function) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                found.append(Import(rel, child.module, child.lineno, in_function))
            # relative imports (level > 0) stay inside their package
            visit(child, in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda))

    visit(ast.parse(path.read_text(encoding="utf-8"), filename=rel), False)
    return found


def our_imports() -> list[Import]:
    ours = set(packages())
    out = []
    for pkg in sorted(ours):
        for path in sorted((REPO / pkg).rglob("*.py")):
            out += [i for i in imports_of(path) if i.target_pkg in ours and i.target_pkg != i.source_pkg]
    return out


def allowed(i: Import) -> bool:
    """No exceptions: even the gate's scorer, which loads torch, lives in core/ (a child program)."""
    return LAYER[i.target_pkg] < LAYER[i.source_pkg]


def test_every_package_has_a_layer() -> None:
    pkgs = set(packages())
    on_disk = {p.name for p in REPO.iterdir() if (p / "__init__.py").is_file()} - {"tests"}
    assert on_disk <= pkgs, f"packages pyproject does not install: {sorted(on_disk - pkgs)}"
    assert pkgs == set(LAYER), f"give each package a layer here and in docs/ARCHITECTURE.md: {pkgs ^ set(LAYER)}"


def test_the_walk_sees_function_level_imports() -> None:
    found = imports_of(REPO / "cli" / "siblings.py")
    assert any(i.in_function and i.target == "safety.watchdog" for i in found)
    assert any(not i.in_function and i.target == "cli.common" for i in found)


def test_foundations_import_no_other_package_of_ours() -> None:
    bad = [str(i) for i in our_imports() if i.source_pkg == "trainbox"]
    assert not bad, "trainbox/ is foundations only:\n" + "\n".join(bad)


def test_imports_follow_the_layers() -> None:
    bad = [str(i) for i in our_imports() if not allowed(i)]
    assert not bad, "imports against docs/ARCHITECTURE.md's layers:\n" + "\n".join(bad)


def test_no_cycle_between_packages() -> None:
    """Over every import but the child programs' upward ones (those run in a process of their own)."""
    edges: dict[str, set[str]] = {}
    for i in our_imports():
        edges.setdefault(i.source_pkg, set()).add(i.target_pkg)
    state: dict[str, str] = {}

    def walk(pkg: str, path: list[str]) -> None:
        state[pkg] = "open"
        for nxt in sorted(edges.get(pkg, ())):
            assert state.get(nxt) != "open", "import cycle: " + " -> ".join([*path, pkg, nxt])
            if nxt not in state:
                walk(nxt, [*path, pkg])
        state[pkg] = "done"

    for pkg in sorted(edges):
        if pkg not in state:
            walk(pkg, [])


# --- no torch in the status server or the watchdog ---------------------------------------------------

_PROBE = r"""
import json, sys, time
from pathlib import Path

from fastapi.testclient import TestClient

from monitoring.app import create_app
from safety.watchdog import Watchdog
from trainbox.config import load_settings
from trainbox.home import Home

home = Home(Path(sys.argv[1]))
settings = load_settings(home.config_file)
codes = {}
with TestClient(create_app(home, settings)) as client:
    for url in ("/", "/api/status", "/api/queue", "/api/jobs", "/api/jobs/5", "/api/jobs/5/metrics",
                "/api/models", "/api/system", "/api/events", "/metrics"):
        codes[url] = client.get(url).status_code
wd = Watchdog(home, settings)
wd.loop(time.time())
wd.shutdown()
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))
print(json.dumps({"codes": codes, "heavy": heavy}))
"""


@pytest.mark.timeout(120)
def test_status_server_and_watchdog_never_load_torch(tmp_path: Path) -> None:
    home = Home(tmp_path / "home")
    populate(home)
    write_daemon_status(home)
    write_training_status(home, step=120)
    # trainbox up's marker: the watchdog leaves daemon restarts to it, so this pass starts no process
    env = {**os.environ, "TRAINBOX_SUPERVISED": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, str(home.root)], env=env, capture_output=True, text=True, timeout=100
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert all(code == 200 for code in result["codes"].values()), result["codes"]
    assert result["heavy"] == [], f"the status server or the watchdog loaded {result['heavy'][:5]}"


def test_the_command_line_loads_no_process_package_until_a_command_needs_it() -> None:
    probe = "import sys, cli.main; print(sorted({m.split('.')[0] for m in sys.modules} & set(sys.argv[1:])))"
    others = [p for p in packages() if p not in ("cli", "trainbox")] + ["torch"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", probe, *others], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[]"


def test_the_entry_point_names_the_command_line() -> None:
    config = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    module, _, function = config["project"]["scripts"]["trainbox"].partition(":")
    assert module.split(".")[0] == "cli"
    assert callable(getattr(importlib.import_module(module), function))


def test_importing_every_management_module_loads_no_torch() -> None:
    """``management/`` is torch-free (the gate's evaluation program is ``core/evaluate.py``, run as a
    child), so the daemon, the CLI and retention never load torch."""
    modules = sorted(f"management.{p.stem}" for p in (REPO / "management").glob("*.py") if p.stem != "__init__")
    modules += ["daemon.main", "daemon.gate", "safety.watchdog", "safety.crash"]
    code = f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False", modules
