"""Checks before the first step: a job that cannot work fails at once with the reason and the fix.

Pure functions take numbers (model shape, settings, data counts, free memory) and return
``Problem``s; ``run_preflight`` is the small I/O wrapper the worker calls: it reads the model's
shape and the device's free memory, raises ``PreflightError`` for the first fatal problem, and
returns the warnings and the micro-batch to start with (never above the configured one). The memory
numbers themselves (the estimate, the micro-batch that fits, what the device has) are core.memory's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from core.distributed import from_env, resolve_nproc
from core.errors import PreflightError
from core.memory import ModelShape, available_memory, estimate_memory, hybrid_copies, model_shape, pick_micro_batch
from trainbox.config import TrainingConfig

MIN_VAL_EXAMPLES = 10  # fewer and the validation loss is mostly noise


@dataclass(frozen=True)
class Problem:
    # max_length, nproc_hybrid, fsdp_one_process, fsdp_lora, fsdp_fp16, bf16, eval_empty, eval_small, no_eval,
    # memory, lora_4bit, lora_targets
    code: str
    message: str
    fix: str
    fatal: bool
    evidence: dict[str, Any] = field(default_factory=dict)


def check_settings(cfg: TrainingConfig, shape: ModelShape, cuda: bool, bf16_supported: bool) -> list[Problem]:
    out = []
    if shape.max_positions is not None and cfg.max_length > shape.max_positions:
        out.append(
            Problem(
                "max_length",
                f"max_length {cfg.max_length} is above the model's {shape.max_positions} positions "
                "(max_position_embeddings): positions beyond it have no trained embedding",
                f"set max_length = {shape.max_positions} or less",
                True,
                {"max_length": cfg.max_length, "max_position_embeddings": shape.max_positions},
            )
        )
    if cfg.engine == "hybrid" and (resolve_nproc(cfg.nproc) > 1 or from_env().active):
        out.append(
            Problem(
                "nproc_hybrid",
                f"engine 'hybrid' runs in one process only; this job asks for nproc = {cfg.nproc}: the hybrid "
                "engine's per-example loss table and skip decisions are not yet kept the same on every rank",
                "set nproc = 1, or engine = 'plain' to train with several processes",
                True,
                {"engine": cfg.engine, "nproc": cfg.nproc},
            )
        )
    out += check_sharding(cfg, planned_world(cfg))
    if cfg.precision == "bf16" and not (cuda and bf16_supported):
        where = "this GPU does not support bf16" if cuda else "the job runs on the CPU"
        out.append(
            Problem(
                "bf16",
                f"precision = 'bf16' was requested but {where}",
                "set precision = 'auto' (bf16 where supported, fp32 otherwise) or 'fp32'",
                True,
                {"precision": cfg.precision, "device": "cuda" if cuda else "cpu", "bf16_supported": bf16_supported},
            )
        )
    return out


def planned_world(cfg: TrainingConfig) -> int:
    """The job's processes: torchrun's world inside a worker, else what ``nproc`` resolves to here."""
    env = from_env()
    return env.world if env.active else resolve_nproc(cfg.nproc)


def shard_count(cfg: TrainingConfig, world: int) -> int:
    """Ranks the weights, grads and optimizer state are divided across: the world under 'fsdp', else 1."""
    return world if cfg.sharding == "fsdp" and world > 1 else 1


def check_sharding(cfg: TrainingConfig, world: int) -> list[Problem]:
    """``sharding = 'fsdp'``: what it does not support, before any weight is loaded (the worker calls it
    first; check_settings repeats it for the warning)."""
    if cfg.sharding != "fsdp":
        return []
    evidence = {"sharding": cfg.sharding, "nproc": cfg.nproc, "processes": world}
    if world <= 1:
        return [
            Problem(
                "fsdp_one_process",
                f"sharding = 'fsdp' with one process (nproc = {cfg.nproc}) has nothing to shard across: "
                "the job trains unsharded, the whole model in one process",
                "set nproc = 2 or more (one process per GPU) to shard the model, or sharding = 'replicate'",
                False,
                evidence,
            )
        ]
    if cfg.precision == "fp16":
        return [
            Problem(
                "fsdp_fp16",
                "sharding = 'fsdp' does not support precision = 'fp16': the gradient scaler is not shard-aware here",
                "set precision = 'bf16' or 'auto' on a GPU with bf16, or sharding = 'replicate' for fp16",
                True,
                {**evidence, "precision": cfg.precision},
            )
        ]
    if cfg.lora:
        return [
            Problem(
                "fsdp_lora",
                "sharding = 'fsdp' does not support LoRA (lora = true): the adapter's wrapping, saving and "
                "rollback are not shard-aware, and a LoRA run's grads and optimizer state are small anyway",
                "set sharding = 'replicate' (each process then holds the frozen base; lora_4bit shrinks it), "
                "or lora = false for a sharded full fine-tune",
                True,
                {**evidence, "lora": True},
            )
        ]
    return []


def check_lora_setup(cfg: TrainingConfig, cuda: bool, bitsandbytes: bool) -> list[Problem]:
    """Before loading: QLoRA needs LoRA, a CUDA GPU and bitsandbytes (it loads the base in 4 bits)."""
    if not cfg.lora_4bit:
        return []
    evidence = {"lora": cfg.lora, "lora_4bit": True, "cuda": cuda, "bitsandbytes": bitsandbytes}
    if not cfg.lora:
        return [Problem("lora_4bit", "lora_4bit = true needs lora = true", "set lora = true", True, evidence)]
    missing = [what for what, ok in (("a CUDA GPU", cuda), ("the bitsandbytes package", bitsandbytes)) if not ok]
    if not missing:
        return []
    fixes = []
    if not cuda:
        fixes.append("run it on a machine with a CUDA GPU (device = 'auto' or 'cuda')")
    if not bitsandbytes:
        fixes.append("install bitsandbytes into trainbox's environment (.venv/bin/pip install bitsandbytes)")
    return [
        Problem(
            "lora_4bit",
            f"lora_4bit (QLoRA, a 4-bit base) needs {' and '.join(missing)}, which this machine lacks",
            "; ".join(fixes) + ", or set lora_4bit = false to train LoRA on the full-precision base",
            True,
            evidence,
        )
    ]


def check_lora_targets(requested: list[str] | str, missing: list[str], linear_layers: list[str]) -> list[Problem]:
    """After loading: every LoRA target module must exist in the model."""
    if not missing:
        return []
    return [
        Problem(
            "lora_targets",
            f"LoRA target module(s) {', '.join(missing)} not found in the model; its linear layers are: "
            f"{', '.join(linear_layers) or 'none'}",
            f"set lora_targets to names among {linear_layers}, or to 'auto' or 'all-linear'",
            True,
            {"lora_targets": requested, "missing": missing, "linear_layers": linear_layers},
        )
    ]


def raise_fatal(problems: list[Problem]) -> None:
    """``PreflightError`` for the first fatal problem (the others in its evidence); nothing if none."""
    fatal = [p for p in problems if p.fatal]
    if fatal:
        first = fatal[0]
        evidence = {**first.evidence, "check": first.code}
        if len(fatal) > 1:
            evidence["other_problems"] = [p.message for p in fatal[1:]]
        raise PreflightError(first.message, evidence=evidence, fix=first.fix)


def check_data(n_train: int, n_val: int, eval_file: bool, eval_fraction: float) -> list[Problem]:
    """Data counts after encoding (truncation and masking already dropped what has nothing to train)."""
    out = []
    if eval_file and n_val == 0:
        out.append(
            Problem(
                "eval_empty",
                "the eval_file has no example with a trained token within max_length",
                "raise max_length, shorten the eval prompts, or drop eval_file to hold out part of the data",
                True,
                {"n_val": 0},
            )
        )
    elif n_val == 0 and eval_fraction > 0:
        out.append(
            Problem(
                "no_eval",
                f"no validation set: {n_train} training example(s) are too few to hold any out",
                "add examples or give an eval_file",
                False,
                {"n_train": n_train},
            )
        )
    elif 0 < n_val < MIN_VAL_EXAMPLES:
        out.append(
            Problem(
                "eval_small",
                f"the validation set has only {n_val} example(s): its loss is mostly noise",
                f"give an eval_file with at least {MIN_VAL_EXAMPLES} examples, or more data",
                False,
                {"n_val": n_val},
            )
        )
    return out


def check_memory(
    shape: ModelShape,
    cfg: TrainingConfig,
    bf16: bool,
    cuda: bool,
    available: int,
    source: str,
    shards: int = 1,
    loss_chunk: int = 0,
) -> tuple[int, list[Problem]]:
    """(starting micro-batch, problems): fatal when the estimate exceeds the memory even at micro-batch 1.
    ``loss_chunk``: tokens per chunk of the chunked loss the run uses (0: the plain loss)."""
    micro, est = pick_micro_batch(
        shape,
        cfg.batch_size,
        cfg.max_length,
        bf16,
        cuda,
        available,
        cfg.gradient_checkpointing,
        shards,
        hybrid_copies(cfg),
        loss_chunk,
    )
    evidence = {"estimate_bytes": est.as_dict(), "available_bytes": available, "memory": source}
    engine_gib = est.engine / 2**30
    engine_fix = f", or engine = 'plain' (the hybrid engine's copies: {engine_gib:.1f} GiB)" if est.engine else ""
    if micro is None:
        return 1, [
            Problem(
                "memory",
                f"training needs about {est.total / 2**30:.1f} GiB at micro-batch 1 and max_length {cfg.max_length}, "
                f"{source} has {available / 2**30:.1f} GiB free",
                "lower max_length, use LoRA (lora = true) or a smaller model, shard it across GPUs (nproc = 2 or "
                "more with sharding = 'fsdp'), or free memory on the device" + engine_fix,
                True,
                {**evidence, "micro_batch": 1, "max_length": cfg.max_length},
            )
        ]
    if micro < cfg.batch_size:
        return micro, [
            Problem(
                "memory_micro_batch",
                f"starting with micro-batch {micro} (configured {cfg.batch_size}) so the estimate of "
                f"{est.total / 2**30:.2f} GiB fits the {available / 2**30:.2f} GiB free; "
                "the effective batch is unchanged",
                "",
                False,
                {**evidence, "micro_batch": micro},
            )
        ]
    return micro, []


@dataclass
class PreflightReport:
    micro_batch: int
    warnings: list[Problem]
    estimate: dict[str, Any]


def run_preflight(
    cfg: TrainingConfig,
    model: Any,
    device: torch.device,
    n_train: int,
    n_val: int,
    eval_file: bool,
    bf16: bool,
    loss_chunk: int = 0,
) -> PreflightReport:
    cuda = device.type == "cuda"
    shape = model_shape(model)
    bf16_supported = cuda and torch.cuda.is_bf16_supported()
    problems = check_settings(cfg, shape, cuda, bf16_supported) + check_data(
        n_train, n_val, eval_file, cfg.eval_fraction
    )
    available, source = available_memory(device)
    shards = shard_count(cfg, planned_world(cfg))
    micro, mem = check_memory(shape, cfg, bf16, cuda, available, source, shards, loss_chunk)
    problems += mem
    raise_fatal(problems)
    estimate = {
        "available_bytes": available,
        "memory": source,
        **estimate_memory(
            shape, micro, cfg.max_length, bf16, cuda, cfg.gradient_checkpointing, shards, hybrid_copies(cfg), loss_chunk
        ).as_dict(),
        **({"shards": shards} if shards > 1 else {}),
    }
    return PreflightReport(micro, [p for p in problems if not p.fatal], estimate)
