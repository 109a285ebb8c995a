"""A job's settings at admission: what the worker would otherwise find out too late, and where a
sidecar's eval file may be.

A sidecar comes from whoever can write to the inbox, so its ``eval_file`` may only name a file
inside the trainbox home (relative to the sidecar's folder, or absolute), or inside a folder the
operator listed in ``daemon.eval_dirs``: never ``~user``, never a symlink leading out. Messages name
the setting, never the content of a file outside the home.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from daemon.job_checks import bitsandbytes_installed, check_job_settings, check_model_folder, usable_cpus
from trainbox.config import DaemonConfig, TrainingConfig, job_training_config
from trainbox.home import Home
from trainbox.safefs import is_inside


class SettingsCheck:
    """The instance's [training] settings and the machine's devices, checked against a sidecar."""

    def __init__(self, training: TrainingConfig, gpus: int, cpus: int | None = None) -> None:
        self.training, self.gpus, self.cpus = training, gpus, cpus or usable_cpus()

    def problems(self, overrides: dict[str, Any]) -> list[str]:
        try:
            merged = job_training_config(self.training, overrides)
        except ValidationError as e:
            return [f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()]
        bnb = bitsandbytes_installed() if merged.lora_4bit else None
        out = check_job_settings(merged, gpus=self.gpus, cpus=self.cpus, bitsandbytes=bnb)
        if "model" in overrides and (bad := check_model_folder(merged.model, lora_4bit=merged.lora_4bit)) is not None:
            out.append(bad)
        return out


def resolve_eval_file(chosen: str, sidecar_dir: Path, home: Home, config: DaemonConfig) -> Path:
    """The eval file a sidecar names, or ``Rejected`` saying why it may not be used."""
    from daemon.admission import Rejected  # the exception lives with admission

    if chosen.startswith("~"):
        raise Rejected("bad_input", "sidecar: eval_file may not start with '~': give a path relative to the sidecar")
    path = Path(chosen)
    if not path.is_absolute():
        path = sidecar_dir / path
    allowed = [home.root, home.storage, *(Path(d) for d in config.eval_dirs)]
    if not any(is_inside(path, root) for root in allowed):
        if not os.path.lexists(path) and (is_inside(path.parent, home.root) or is_inside(path.parent, home.storage)):
            raise Rejected("bad_input", f"sidecar: eval_file not found: {chosen}")
        raise Rejected(
            "bad_input",
            f"sidecar: eval_file {chosen!r} is not inside the trainbox home (or it is missing); files elsewhere "
            "need the operator's daemon.eval_dirs in trainbox.toml",
        )
    resolved = path.resolve()
    if is_inside(resolved, home.inbox):
        raise Rejected("bad_input", "sidecar: an eval_file in the inbox must lie beside its sidecar")
    return resolved
