"""Configuration: one typed settings object built once, validated before any process starts.

``trainbox.toml`` in the home holds [daemon], [training] and [server] tables; every key has a
default and a description here, and ``trainbox config`` prints them all as a commented TOML file.
A per-job sidecar (``<name>.toml`` / ``<name>.json`` beside the JSONL) overrides [training] keys
for that job and may set ``priority`` and ``eval_file``. Unknown keys and bad values are refused
with a message naming the file and the key.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from trainbox.states import Priority


class ConfigError(ValueError):
    """A configuration file or sidecar that cannot be used; the message names file and key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DaemonConfig(_Strict):
    poll_interval: float = Field(0.5, gt=0, le=60, description="Seconds between main-loop ticks.")
    settle_seconds: float = Field(
        2.0,
        ge=0,
        le=3600,
        description="A file with no close event is complete once its size and mtime are unchanged this long.",
    )
    rescan_interval: float = Field(
        5.0, gt=0, le=3600, description="Seconds between full rescans of inbox/ (events are only hints)."
    )
    default_priority: Priority = Field(Priority.NORMAL, description="Priority of a file dropped straight into inbox/.")
    polling_observer: bool = Field(
        False, description="Use watchdog's polling observer (for network filesystems) instead of inotify."
    )
    worker_stop_timeout: float = Field(
        120.0, gt=0, description="Seconds a worker gets to checkpoint and exit after SIGTERM before SIGKILL."
    )
    log_tail_lines: int = Field(40, ge=0, le=10000, description="Worker log lines copied into an error file.")
    max_file_bytes: int = Field(
        2 * 1024**3, gt=0, description="Largest JSONL admitted, in bytes (bigger files are rejected)."
    )


class TrainingConfig(_Strict):
    model: str = Field(
        "",
        description="Local folder of a Hugging Face causal LM to start from. Empty: continue from the "
        "current model version, or the embedded tiny model if there is none yet.",
    )
    epochs: float = Field(3.0, gt=0, le=1000, description="Passes over the data (used when max_steps is 0).")
    max_steps: int = Field(0, ge=0, description="Optimizer steps to train; 0 means derive from epochs.")
    learning_rate: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Peak AdamW learning rate; 0: automatic, 2e-3 for tiny models (under 10M trainable "
        "parameters, like the embedded one), 2e-5 for others (a full fine-tune).",
    )
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Cosine schedule floor, as a share of the peak.")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Share of steps spent in linear warmup.")
    weight_decay: float = Field(0.01, ge=0, le=1, description="AdamW weight decay.")
    beta1: float = Field(0.9, gt=0, lt=1, description="AdamW beta1.")
    beta2: float = Field(0.95, gt=0, lt=1, description="AdamW beta2.")
    grad_clip: float = Field(1.0, ge=0, description="Max global gradient norm; 0 disables clipping.")
    batch_size: int = Field(8, ge=1, le=4096, description="Examples per micro-batch.")
    grad_accum: int = Field(1, ge=1, le=4096, description="Micro-batches per optimizer step.")
    max_length: int = Field(256, ge=8, le=1_000_000, description="Tokens per example; longer ones are truncated.")
    eval_fraction: float = Field(
        0.1, ge=0, lt=1, description="Share of examples held out for validation when no eval_file is given."
    )
    eval_max_examples: int = Field(256, ge=1, description="Cap on the held-out validation set.")
    eval_every: int = Field(25, ge=0, description="Evaluate every N steps (and at the end); 0: only at the end.")
    checkpoint_every: int = Field(
        50, ge=0, description="Checkpoint every N steps (and at the end); 0: only at the end."
    )
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints of a run kept by the worker (newest first).")
    log_every: int = Field(1, ge=1, description="Write a metrics line every N steps.")
    seed: int = Field(1234, description="Seed for shuffling, the validation split and initialisation.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when available, else CPU.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 autocast on CUDA that supports it, fp32 otherwise."
    )
    threads: int = Field(
        0, ge=0, le=1024, description="CPU threads for torch; 0: $OMP_NUM_THREADS if set, else half the cores."
    )
    engine: Literal["plain"] = Field("plain", description="Training engine.")


class ServerConfig(_Strict):
    host: str = Field("127.0.0.1", description="Address the status server binds.")
    port: int = Field(8377, ge=0, le=65535, description="Port of the status server (0: any free port).")
    read_requires_token: bool = Field(
        False, description="Require the API token for read endpoints too (the page itself stays open)."
    )
    max_upload_bytes: int = Field(64 * 1024**2, gt=0, description="Largest upload to POST /api/upload, in bytes.")


class Settings(_Strict):
    daemon: DaemonConfig = Field(default_factory=DaemonConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)


class JobOverrides(TrainingConfig):
    """A sidecar: any [training] key, plus where the job queues and what it validates on."""

    priority: Priority | None = Field(None, description="Queue for this job: high, normal or low.")
    eval_file: str | None = Field(None, description="Validation JSONL (absolute, or relative to the sidecar's folder).")


def _describe(err: ValidationError, source: str, prefix: str = "") -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"{source}: unknown key '{prefix}{key}'")
        else:
            lines.append(f"{source}: {prefix}{key}: {e['msg']} (got {e.get('input')!r})")
    return "; ".join(lines)


def load_settings(path: Path) -> Settings:
    """The settings in ``path``, or all defaults when it does not exist."""
    if not path.exists():
        return Settings()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from e
    try:
        return Settings.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_describe(e, str(path))) from e


def load_sidecar(path: Path) -> JobOverrides:
    """Parse a per-job sidecar; only the keys it sets count as overrides (``model_fields_set``)."""
    try:
        text = path.read_text(encoding="utf-8")
        data: Any = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path.name}: cannot parse sidecar: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path.name}: a sidecar must be a table/object of settings")
    if isinstance(data.get("training"), dict) and len(data) == 1:
        data = data["training"]  # also accept a [training] table
    try:
        return JobOverrides.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_describe(e, path.name)) from e


def job_training_config(base: TrainingConfig, overrides: dict[str, Any]) -> TrainingConfig:
    """The [training] settings of one job: the instance's, with the sidecar's keys on top."""
    merged = base.model_dump()
    merged.update({k: v for k, v in overrides.items() if k in TrainingConfig.model_fields})
    return TrainingConfig.model_validate(merged)


TINY_MODEL_PARAMS = 10_000_000
AUTO_LR_TINY = 2e-3
AUTO_LR_FULL = 2e-5


def auto_learning_rate(trainable_params: int) -> float:
    """The learning rate used when ``learning_rate = 0``: what works for the size of model.

    Measured on the embedded 0.66M-parameter model: 3e-4 barely moves it in 100 steps, 2e-3 to 3e-3
    learns fastest, 1e-2 is unstable. Full fine-tunes of real models use 1e-5 to 5e-5.
    """
    return AUTO_LR_TINY if trainable_params < TINY_MODEL_PARAMS else AUTO_LR_FULL


def defaults_toml() -> str:
    """Every key with its default and description, as a commented trainbox.toml."""
    out = ["# trainbox.toml: every key, its default and what it does. Uncomment to change.", ""]
    for table, model in (("daemon", DaemonConfig), ("training", TrainingConfig), ("server", ServerConfig)):
        out.append(f"[{table}]")
        for name, field in model.model_fields.items():
            default = field.get_default(call_default_factory=True)
            if isinstance(default, Priority):
                default = default.value
            value = json.dumps(default) if not isinstance(default, bool) else str(default).lower()
            out.append(f"# {field.description}")
            out.append(f"# {name} = {value}")
        out.append("")
    return "\n".join(out)
