"""Everything a job's training starts from, and the weights a rollback goes back to.

``load_job`` runs the loading phase in its one safe order: the resume point and its settings, this process's
threads and device, the base model folder (built before joining the process group), the process group, the
model (LoRA-wrapped when asked), the data, and last the sharding (after the weights, before the optimizer).
``RollbackTarget`` is the trainer's ``restore``: the newest complete checkpoint, or the weights the run
started from at step 0.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from core import checkpoint, distributed, lora, replay, rng, sharding
from core.data import read_records, split_heldout
from core.distributed import Dist
from core.embedded import ensure_embedded_model
from core.encode import Encoded, Example, encode_all, prepare_tokenizer
from core.errors import DataError, PreflightError
from core.faults import Faults
from core.heartbeat import Progress
from core.preflight import check_lora_setup, check_lora_targets, check_sharding, raise_fatal
from core.reporting import Report
from core.runtime import describe_device, pick_device, resolve_config, use_threads
from core.train import Trainer
from trainbox.config import TrainingConfig, auto_learning_rate
from trainbox.data_stats import SHORT_TOKENS, DataStats
from trainbox.jobspec import JobSpec
from trainbox.records import Record

log = logging.getLogger("core.worker")


# --- the model ------------------------------------------------------------------------------------


def load_model(source: Path, device: torch.device, four_bit: bool = False) -> tuple[Any, Any]:
    """Model (fp32 master weights; bf16 happens in autocast) and tokenizer from a local folder. An
    adapter folder (a LoRA version) loads as its base with the adapter merged (core.lora). ``four_bit``:
    the QLoRA base, NF4 on the GPU (untested without a GPU)."""
    tokenizer = AutoTokenizer.from_pretrained(source)
    changes = prepare_tokenizer(tokenizer)
    if changes:
        log.info("tokenizer: %s", "; ".join(changes))
    if four_bit:
        if lora.is_adapter_folder(source):
            raise PreflightError(
                f"lora_4bit cannot quantize {source}: it is an adapter version, not a full model",
                evidence={"model": str(source)},
                fix="export it as a full model (trainbox models export V --out DIR) and set model = DIR",
            )
        model: Any = lora.load_4bit(source, device)
    else:
        model = lora.load_causal_lm(source, dtype=torch.float32).to(device)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def load_job_model(
    cfg: TrainingConfig, base: Path, source: Path, resuming: bool, device: torch.device, shard: bool
) -> tuple[Any, Any, dict[str, torch.Tensor] | None]:
    """(model, tokenizer, a LoRA run's initial adapter: its rollback target at step 0) of a job: from
    ``source`` (the base, or the checkpoint a resumed run continues from). One opaque stretch of
    loading: the caller keeps the heartbeat (LoadingBeat)."""
    if not cfg.lora:  # sharded: the full weights go to the CPU; wrapping moves each rank's shard to the device
        model, tokenizer = load_model(source, torch.device("cpu") if shard else device)
        return model, tokenizer, None
    raise_fatal(check_lora_setup(cfg, device.type == "cuda", lora.bitsandbytes_available()))
    model, tokenizer = load_model(base, device, four_bit=cfg.lora_4bit)
    model, initial_adapter = apply_lora(model, cfg, base)
    if resuming:
        lora.load_adapter_folder(model, source)
    return model, tokenizer, initial_adapter


def apply_lora(model: Any, cfg: TrainingConfig, base: Path) -> tuple[Any, dict[str, torch.Tensor]]:
    """The model wrapped with fresh LoRA adapters (after checking the targets exist) and a copy of
    their initial weights."""
    targets = lora.resolve_targets(cfg, model)
    missing = lora.missing_targets(model, targets)
    raise_fatal(check_lora_targets(cfg.lora_targets, missing, lora.linear_layer_names(model)))
    model = lora.wrap(model, cfg, base, targets)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info(
        "LoRA r=%d alpha=%g on %s: %d of %d parameters train", cfg.lora_r, cfg.lora_alpha, targets, trainable, total
    )
    return model, lora.adapter_state(model)


def enable_gradient_checkpointing(model: Any) -> None:
    """Hugging Face gradient checkpointing (non-reentrant: correct with frozen inputs and under DDP). A
    LoRA model's embeddings are frozen, so their output is made to require grad, as peft does."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    model.config.use_cache = False


def with_learning_rate(cfg: TrainingConfig, model: Any) -> TrainingConfig:
    """``learning_rate = 0`` (the default) becomes the automatic one for the model's trainable parameters."""
    if cfg.learning_rate != 0:
        return cfg
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    adapted = sum(p.numel() for p in model.parameters() if not p.requires_grad) if cfg.lora else 0
    cfg = cfg.model_copy(update={"learning_rate": auto_learning_rate(trainable, adapted)})
    log.info("learning rate: %.1e (automatic for %d trainable parameters)", cfg.learning_rate, trainable)
    return cfg


# --- the data -------------------------------------------------------------------------------------


@dataclass
class DataSets:
    train: list[Example]
    val: list[Example]
    stats: DataStats | None = None  # for the job report (runs/job-N/data-stats.json)
    train_lines: list[int] = field(default_factory=list)  # each training example's line in its file
    val_records: list[Record] = field(default_factory=list)  # kept as the job's memory (core.replay)
    train_records: list[Record] = field(default_factory=list)  # its own, without the replayed ones


def load_data(spec: JobSpec, cfg: TrainingConfig, tokenizer: Any, progress: Progress | None = None) -> DataSets:
    """Read, re-validate and encode the job's data. ``progress`` reports each stage with a heartbeat at
    a bounded interval: a file of millions of lines takes minutes here, longer than the watchdog's
    loading floor, and a worker that advances must not be judged hung."""
    progress = progress if progress is not None else Progress(None)
    progress.stage(f"reading {Path(spec.data_file).name}")
    numbers: list[int] = []
    records = read_records(Path(spec.data_file), progress.tick, numbers)
    if spec.eval_file:
        train_records, train_numbers = records, numbers
        progress.stage(f"reading {Path(spec.eval_file).name}")
        val_records = read_records(Path(spec.eval_file), progress.tick)[: cfg.eval_max_examples]
    else:
        train_records, val_records = split_heldout(records, cfg.eval_fraction, cfg.eval_max_examples, cfg.seed)
        train_numbers = split_heldout(numbers, cfg.eval_fraction, cfg.eval_max_examples, cfg.seed)[0]
    own_train = train_records
    replayed = replay.replay_records(spec, len(train_records), distributed.from_env().is_main)
    if replayed:  # earlier jobs' examples (issue 17); line 0: not a line of this job's file
        train_records, train_numbers = [*train_records, *replayed], [*train_numbers, *[0] * len(replayed)]
    progress.stage("encoding", len(train_records) + len(val_records))
    train = encode_all(tokenizer, train_records, cfg.max_length, progress.tick)
    val = encode_all(tokenizer, val_records, cfg.max_length, progress.tick)
    if train.dropped or val.dropped:
        log.warning(
            "dropped %d training and %d validation examples with nothing to train within max_length=%d",
            train.dropped,
            val.dropped,
            cfg.max_length,
        )
    if not train.examples:
        raise DataError(
            f"no training example has a trained token within max_length={cfg.max_length} "
            f"({train.dropped} dropped): raise max_length or shorten the prompts",
            evidence={"max_length": cfg.max_length, "dropped": train.dropped, "n_records": len(train_records)},
            fix=f"raise max_length (now {cfg.max_length}) or shorten the prompts so completions fit",
            failure_class="preflight",
        )
    log.info("data: %d training, %d validation examples", len(train.examples), len(val.examples))
    lines = [train_numbers[i] for i in train.kept]
    return DataSets(train.examples, val.examples, data_stats(len(records), train, val), lines, val_records, own_train)


def data_stats(records: int, train: Encoded, val: Encoded) -> DataStats:
    """The counts the job report's data rules need (``trainbox/data_stats.py``); one pass, no copies."""
    seen: set[int] = set()
    duplicates = 0
    for ex in train.examples:
        key = hash(tuple(ex.input_ids))
        duplicates += key in seen
        seen.add(key)
    return DataStats(
        records=records,
        train_examples=len(train.examples),
        val_examples=len(val.examples),
        dropped=train.dropped,
        truncated=train.truncated,
        longest=train.longest,
        duplicates=duplicates,
        short=sum(1 for ex in train.examples if ex.trained_tokens <= SHORT_TOKENS),
    )


# --- the job --------------------------------------------------------------------------------------


@dataclass
class LoadedJob:
    cfg: TrainingConfig  # job.json's, or the checkpoint's for a resumed run; the learning rate resolved
    device: torch.device
    device_name: str  # as the status file shows it, and the micro-batch cache keys it
    ranks: Dist
    shard: bool  # FSDP (core.sharding); one process shards nothing
    base: Path  # the folder the job started from
    source: Path  # where the weights came from now: the base, or the checkpoint a resumed run continues
    resumed_from: checkpoint.CheckpointInfo | None
    saved: dict[str, Any] | None  # that checkpoint's trainer state
    model: Any
    tokenizer: Any
    initial_adapter: dict[str, torch.Tensor] | None  # a LoRA run's rollback target at step 0
    data: DataSets


def load_job(spec: JobSpec, report: Report, faults: Faults) -> LoadedJob:
    """The loading phase of a job (module docstring), reported as phase ``loading`` with heartbeats."""
    run_dir = Path(spec.run_dir)
    report.phase("loading")
    faults.hang("loading")
    if distributed.from_env().is_main:  # rank 0 alone writes
        checkpoint.remove_partial(run_dir)
    latest = checkpoint.latest_complete(run_dir)
    saved = None
    if latest is not None:
        with report.loading(f"loading the training state of {latest.path.name}"):
            saved = checkpoint.load_state(latest.path)
    cfg = resolve_config(spec.training, saved["config"] if saved else None)
    threads = use_threads(cfg)
    device = pick_device(cfg)
    # base: the folder the job started from. Built before joining the process group: inside one,
    # transformers' save_pretrained writes on rank 0 only, and another rank could publish an empty folder.
    base = Path(spec.init_model) if spec.init_model else ensure_embedded_model(Path(spec.embedded_model_dir))
    ranks = distributed.init(device.type)
    if ranks.active:
        log.info("rank %d of %d (%s)", ranks.rank, ranks.world, "nccl" if device.type == "cuda" else "gloo")
    raise_fatal(check_sharding(cfg, ranks.world))
    shard = cfg.sharding == "fsdp" and ranks.active
    device_name = describe_device(device, threads)
    report.update(force=True, device=device_name, engine=cfg.engine)
    rng.seed_all(cfg.seed)

    source = latest.path / checkpoint.MODEL if latest else base
    log.info("job %d (%s): model %s on %s", spec.job_id, spec.job_name, source, device_name)
    with report.loading(f"loading the model {source.name or source}"):
        model, tokenizer, initial_adapter = load_job_model(cfg, base, source, bool(latest), device, shard)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
        log.info("gradient checkpointing on (activations recomputed in the backward pass)")
    cfg = with_learning_rate(cfg, model)
    data = load_data(spec, cfg, tokenizer, report.progress())
    if ranks.is_main and data.stats is not None:
        data.stats.save(run_dir)
    ranks.any_flag(False)  # every rank has read the replay sources before rank 0's keeping may cut them
    if ranks.is_main:
        replay.keep_memory(spec, data.val_records, data.train_records)
    if shard:  # after the weights, before the optimizer; every rank read the same files, so no broadcast
        layers = sharding.wrap(model, device, ranks.world)
        log.info("fsdp: %d decoder layers and the root sharded across %d ranks", layers, ranks.world)
    else:
        ranks.broadcast_params(model)
    return LoadedJob(
        cfg, device, device_name, ranks, shard, base, source, latest, saved, model, tokenizer, initial_adapter, data
    )


# --- going back -----------------------------------------------------------------------------------


def full_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Any Hugging Face folder's weights as full CPU tensors by name (an adapter folder: merged on its base)."""
    if lora.is_adapter_folder(folder):
        return dict(lora.load_causal_lm(folder, dtype=torch.float32).state_dict())
    if any(Path(folder).glob("*.safetensors")):
        return checkpoint.read_weights(folder)
    return dict(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict())


def restore_weights(model: Any, folder: Path) -> None:
    """Put a saved model's weights back into ``model`` in place (a rollback: the model, its optimizer and
    device placement stay); any Hugging Face folder, or an adapter folder (into a LoRA model: the adapter;
    into a full one: the merged model). A sharded model: every rank reads the full weights and keeps its
    shard (a collective)."""
    if lora.is_adapter_folder(folder) and lora.is_peft(model):
        lora.load_adapter_folder(model, folder)
        return
    weights = full_weights(folder)
    if sharding.is_sharded(model):
        sharding.scatter_weights(model, weights)
    else:
        checkpoint.apply_weights(model, weights, folder)


class RollbackTarget:
    """The trainer's ``restore``: back to the newest complete checkpoint (weights and trainer state), or, with
    none, to the weights the run started from at step 0; the reports follow, since the steps after it will be
    trained again."""

    def __init__(self, run_dir: Path, job: LoadedJob, trainer: Trainer, report: Report) -> None:
        self.run_dir, self.job, self.trainer, self.report = run_dir, job, trainer, report

    def __call__(self) -> None:
        model, trainer = self.job.model, self.trainer
        found = checkpoint.latest_complete(self.run_dir)
        if found is not None:
            restore_weights(model, found.path / checkpoint.MODEL)
            trainer.load_state_dict(checkpoint.load_state(found.path))
        else:
            if self.job.initial_adapter is not None:
                lora.load_adapter_state(model, self.job.initial_adapter)
            else:
                restore_weights(model, self.job.source)
            trainer.reset()
        s = trainer.state
        self.report.rolled_back(s.step, s.last_val_loss, to_checkpoint=found is not None)
