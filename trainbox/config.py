"""Configuration: one typed settings object built once, validated before any process starts.

``trainbox.toml`` in the home holds [daemon], [training] and [server] tables; every key has a
default and a description here, and ``trainbox config`` prints them all as a commented TOML file.
A per-job sidecar (``<name>.toml`` / ``<name>.json`` beside the JSONL) overrides [training] keys
for that job and may set ``priority`` and ``eval_file``. Unknown keys and bad values are refused
with a message naming the file and the key.
"""

from __future__ import annotations

import json
import socket
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from trainbox.lineage import check_lineage
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
        120.0,
        gt=0,
        le=3600,
        description="Seconds a worker gets to checkpoint and exit after SIGTERM before SIGKILL (at most an "
        "hour; units from install-systemd give the daemon this plus 180 s, at least 300 s, to stop).",
    )
    log_tail_lines: int = Field(40, ge=0, le=10000, description="Worker log lines copied into an error file.")
    warm_worker: bool = Field(
        True,
        description="Keep one worker process started ahead (imports done, no job, no GPU memory) and hand it "
        "the next single-process job: a job does not wait the 5-20 s of a worker's cold start. Without a GPU the "
        "standby is started only while no job trains (its imports would slow the training).",
    )
    max_retries: int = Field(
        2, ge=0, le=100, description="Retries of a job whose worker crashed or was killed (transient failures)."
    )
    retry_backoff: float = Field(
        30.0,
        ge=0,
        le=86400,
        description="Seconds before the first retry (at most a day); doubled for each further one.",
    )
    disk_resume_free_bytes: int = Field(
        1024**3,
        ge=0,
        le=10**12,
        description="After a disk-full pause, resume once this much is free in the home (or what the "
        "worker said it needs, if more); at most 1 TB, or intake could wait for good.",
    )
    max_file_bytes: int = Field(
        2 * 1024**3,
        gt=0,
        le=10**11,
        description="Largest JSONL admitted, in bytes (bigger files are rejected); at most 100 GB: the worker "
        "holds every record in memory.",
    )
    max_line_bytes: int = Field(
        16 * 1024**2,
        ge=1024,
        le=1024**3,
        description="Longest line of a JSONL file, in bytes; a longer line is a bad line (named in the error).",
    )
    max_json_depth: int = Field(
        64, ge=4, le=1000, description="Deepest nesting of brackets on one line; deeper is a bad line."
    )
    eval_dirs: list[str] = Field(
        default_factory=list,
        description="Folders outside the home from which a sidecar's eval_file may be read (absolute paths). "
        "Empty: sidecars may only name files inside the home.",
    )
    sidecar_wait_seconds: float = Field(
        600.0,
        ge=0,
        le=86400 * 7,
        description="A sidecar with no data file beside it waits this long for its file, then goes to "
        "queue/failed/ saying why (a sidecar must be dropped before its file).",
    )
    admission_budget: float = Field(
        1.0,
        gt=0,
        le=30,
        description="Seconds of admission work per main-loop tick; a bigger file is validated over several "
        "ticks, so the daemon keeps answering controls and its heartbeat.",
    )


class HybridConfig(_Strict):
    """The hybrid-predict engine's knobs (``core/hybrid/``): ``[training.hybrid]`` in trainbox.toml, ``[hybrid]``
    in a sidecar. It skips the forward and backward passes of examples predicted learned (their last measured
    loss low among the rest, and recent), re-measures a sample of them, and starts the learning-rate decay
    where the validation curve flattens."""

    warmup_steps: int = Field(
        20,
        ge=0,
        le=10**9,
        description="Full steps before the engine predicts anything (at most 1e9; more than the job's steps: never).",
    )
    full_steps: int = Field(
        10,
        ge=0,
        le=10**9,
        description="Full steps after the warmup before examples may be skipped; skipping also waits until "
        "min_coverage of the examples have a measured loss.",
    )
    min_coverage: float = Field(
        0.9, ge=0, le=1, description="Share of training examples with a measured loss before any is skipped."
    )
    score_first: bool = Field(
        False,
        description="Before the first step, measure every training example's loss forward only (no backward; its "
        "cost counts as the engine's overhead), so skipping may start after warmup_steps + full_steps instead of "
        "once min_coverage of the examples were trained: for a job from a model that already learned part of the "
        "file (a continual job repeating an earlier file's examples).",
    )
    keep_shares: tuple[Annotated[float, Field(gt=0, le=1)], ...] = Field(
        (1.0, 0.6, 0.4, 0.25),
        min_length=1,
        max_length=32,
        description="Bandit arms: expected share of each step's examples that get a forward and backward pass "
        "(above 0 and at most 1 each, at most 32 of them); the bandit picks by validation progress per second.",
    )
    compact: bool = Field(
        False,
        description="Selective-Backprop with compaction: a step whose examples were partly skipped is filled with "
        "the next kept examples (reading at most 2 / keep share micro-batches per configured one), so each step "
        "trains a full batch and an epoch takes fewer steps; the learning-rate schedule follows the data read, and "
        "the run ends once the job's planned epochs of data were read (or earlier, by the curve stop). Off: "
        "skipped examples only shrink their step; the step count is the job's.",
    )
    learned_below: float = Field(
        0.0,
        ge=0,
        le=100,
        description="Only examples whose predicted loss is below this share of the mean loss over the training set's "
        "measured examples may be skipped (an absolute 'learned', e.g. 0.25); 0: off, the rank rule alone (it skips "
        "its share of the lowest losses even where none is learned yet).",
    )
    keep_floor: float = Field(
        0.05, ge=0, le=1, description="Least probability of any example to be trained in a step (learned or not)."
    )
    max_stale_epochs: float = Field(
        2.0,
        gt=0,
        le=1000,
        description="An example whose loss was last measured more than this many epochs ago is trained again.",
    )
    correct_every: int = Field(
        20, ge=1, le=10**7, description="Steps between re-measurements of skipped examples (forward only)."
    )
    correct_examples: int = Field(
        16, ge=1, le=100_000, description="Skipped examples re-measured at each correction (a seeded sample)."
    )
    rise_tol: float = Field(
        0.1,
        ge=0,
        le=100,
        description="A re-measured example whose loss rose by more than this share is trained at its next turn.",
    )
    remeasure_tol: float = Field(
        0.5,
        ge=0,
        le=100,
        description="Re-measured examples whose mean loss rose by more than this share roll the engine back to "
        "its last good point (weights and optimizer state at the best evaluation since skipping began).",
    )
    val_tol: float = Field(
        0.05,
        ge=0,
        le=100,
        description="A validation loss this share above the best since skipping began, after an interval that "
        "skipped examples, rolls the engine back (at 0.02 the noise of a from-scratch run at its tuned lr rolled "
        "back an interval that had skipped nothing).",
    )
    cooldown_steps: int = Field(
        50, ge=1, le=10_000_000, description="Full steps after a rollback before skipping again; doubles each time."
    )
    max_cooldown_steps: int = Field(640, ge=1, le=10_000_000, description="Longest full stretch after a rollback.")
    bandit_alpha: float = Field(0.5, ge=0, le=100, description="LinUCB exploration weight over the keep_shares arms.")
    bandit_cost: Literal["wall", "compute"] = Field(
        "wall",
        description="What the bandit divides validation progress by: wall-clock seconds of training, or "
        "compute (tokens with a forward and backward pass x 3 + tokens re-measured): deterministic, for tests "
        "and for resumed runs that must repeat an uninterrupted run's choices.",
    )
    curve_stop: bool = Field(
        True,
        description="Fit the validation curve and, where it flattens, cut the cosine schedule short (a linear "
        "decay to the floor over decay_ratio of the steps so far) and stop after it; off: the job's planned steps.",
    )
    stop_tolerance: float = Field(
        0.01,
        ge=0,
        le=1,
        description="The curve has flattened where training on to the job's last step would improve the "
        "validation loss by less than this share (as fitted), the last curve_min_points evaluations improved "
        "by less than this share (as measured), and the loss is below the run's first evaluation by more than this "
        "share (a continual job's curve can sit flat above its start before it falls: nothing learned yet).",
    )
    curve_min_points: int = Field(
        4, ge=3, le=1000, description="Evaluations after the learning-rate warmup before the curve is fitted."
    )
    decay_ratio: float = Field(
        0.2,
        gt=0,
        lt=1,
        description="Length of the decay that ends a run the curve stopped, as a share of the run's steps "
        "(decay_ratio / (1 - decay_ratio) x the steps before it).",
    )


def is_host_port(value: str) -> bool:
    """``host:port`` as torchrun's ``--rdzv-endpoint`` takes it (an IPv6 address in brackets), port 1-65535."""
    host, sep, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return bool(sep and host and port.isascii() and port.isdigit() and 0 < int(port) < 65536) and not any(
        c.isspace() or c in "/[]" for c in host
    )


class TrainingConfig(_Strict):
    model: str = Field(
        "",
        description="Local folder of a Hugging Face causal LM to start from. Empty: continue from the "
        "current model version, or the embedded tiny model if there is none yet.",
    )
    epochs: float = Field(3.0, gt=0, le=1000, description="Passes over the data (used when max_steps is 0).")
    max_steps: int = Field(
        0, ge=0, le=10_000_000, description="Optimizer steps to train (at most 10 million); 0 means derive from epochs."
    )
    learning_rate: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Peak AdamW learning rate; 0: automatic, 2e-3 for tiny models (under 10M trainable "
        "parameters, like the embedded one), 2e-5 for others (a full fine-tune), 2e-4 for LoRA on a model "
        "of 10M parameters or more.",
    )
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Cosine schedule floor, as a share of the peak.")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Share of steps spent in linear warmup.")
    weight_decay: float = Field(0.01, ge=0, le=1, description="AdamW weight decay.")
    beta1: float = Field(0.9, gt=0, lt=1, description="AdamW beta1.")
    beta2: float = Field(0.95, gt=0, lt=1, description="AdamW beta2.")
    grad_clip: float = Field(
        1.0, ge=0, le=10_000, description="Max global gradient norm (at most 10,000); 0 disables clipping."
    )
    batch_size: int = Field(8, ge=1, le=4096, description="Examples per micro-batch.")
    grad_accum: int = Field(1, ge=1, le=4096, description="Micro-batches per optimizer step.")
    max_length: int = Field(256, ge=8, le=1_000_000, description="Tokens per example; longer ones are truncated.")
    packing: bool | Literal["auto"] = Field(
        "auto",
        description="Padding-free batches: each forward pass's examples are laid end to end in rows no wider "
        "than its longest example (first fit, longest first), position ids restarting at every example, and "
        "attention confined to each example (block-diagonal causal mask), so the loss equals the padded "
        "batch's and no compute goes to padding. auto: on where that is exact for the model, which a probe "
        "checks at the start of every run (a packed row's logits against each example alone; off, with the "
        "reason in the job's log, for a model whose attention ignores per-example position ids). true: on "
        "without the probe. false: right-padded batches.",
    )
    group_by_length: bool = Field(
        False,
        description="Length-grouped batches (Hugging Face's group_by_length): each epoch's shuffled order is cut "
        "into mega-batches of 50 micro-batches, each sorted by length and split into micro-batches whose order "
        "is then shuffled, the longest first. Deterministic from the seed; the examples per micro-batch and "
        "step are unchanged. Off by default: it changes which examples train together, and one epoch of 600 "
        "texts of long-tailed lengths on the embedded model ended with a 2-13 % higher validation loss (4 "
        "seeds) for 5-10 % more speed than packing alone, which removes the padding without changing the "
        "batches. Worth it for padded batches (packing off) on data with very mixed lengths.",
    )
    balance_tokens: bool = Field(
        True,
        description="With packed rows, cut each epoch's shuffled order into micro-batches of near-equal token "
        "counts instead of batch_size examples each: as many micro-batches (so the same steps and schedule), "
        "batch_size examples on average, every example once per epoch in the same random order, so a step's "
        "time and memory are steady on data of mixed lengths. Off with padded batches or group_by_length.",
    )
    chunked_loss: bool = Field(
        True,
        description="Compute the loss over the vocabulary in chunks of trained tokens (256 MiB of fp32 logits "
        "each), each chunk's gradients made at once in the forward pass (fused linear cross-entropy; a "
        "LoRA-wrapped head recomputes its chunk in backward instead), so the full logits tensor (tokens x "
        "vocabulary, fp32) is never held: the largest activation of a small model with a large vocabulary. "
        "Only trained positions get logits. Off automatically, with the reason in the log, for a head that "
        "transforms its logits (soft-capping, scaling), where a probe finds the loss differs, or under "
        "sharding 'fsdp'.",
    )
    compile: bool | Literal["auto"] = Field(
        "auto",
        description="torch.compile the model (dynamic shapes; kernels cached in the home's cache/inductor). auto: "
        "on a GPU; on the CPU only when the job's estimated training time is at least 10 times the compile "
        "time (about 40 s for the embedded model on one core), so small CPU jobs stay eager; not with "
        "sharding 'fsdp'. Code that fails to compile runs eagerly with a warning in the log; the job trains.",
    )
    eval_fraction: float = Field(
        0.1, ge=0, lt=1, description="Share of examples held out for validation when no eval_file is given."
    )
    replay_share: float = Field(
        0.15,
        ge=0,
        lt=1,
        description="Share of the job's training data replayed from earlier jobs' kept training samples (the "
        "lineage of the version it starts from), in proportion to each sample's size, chosen by the seed and "
        "recorded in the run (runs/job-N/replay.jsonl) so a resume trains the same; 0: off. Against "
        "forgetting an earlier file (issue 17).",
    )
    eval_max_examples: int = Field(256, ge=1, le=100_000, description="Cap on the held-out validation set.")
    eval_every: int = Field(
        25, ge=0, le=10_000_000, description="Evaluate every N steps (and at the end); 0: only at the end."
    )
    checkpoint_every: int = Field(
        50, ge=0, le=10_000_000, description="Checkpoint every N steps (and at the end); 0: only at the end."
    )
    keep_checkpoints: int = Field(
        2, ge=1, le=1000, description="Checkpoints of a run kept by the worker (newest first)."
    )
    log_every: int = Field(1, ge=1, le=10_000_000, description="Write a metrics line every N steps.")
    seed: int = Field(
        1234,
        ge=0,
        lt=2**32,
        description="Seed for shuffling, the validation split and initialisation: 0 to 2**32 - 1, what python's "
        "random, numpy and torch all accept.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when available, else CPU.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="auto: bf16 autocast on a GPU that supports it, fp16 autocast with a gradient scaler on "
        "one that does not (before Ampere), fp32 on the CPU. fp16: always fp16 with the scaler (an overflowing "
        "step is rerun at half the loss scale).",
    )
    threads: int = Field(
        0, ge=0, le=1024, description="CPU threads for torch; 0: $OMP_NUM_THREADS if set, else half the cores."
    )
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute each layer's activations in the backward pass instead of keeping them "
        "(Hugging Face gradient checkpointing, use_reentrant=False): much less activation memory for about "
        "a third more compute; the loss and gradients are unchanged. Works with LoRA. The optimizer is "
        "always AdamW, fused where torch offers it for the device, else the foreach implementation.",
    )
    nproc: int = Field(
        1,
        ge=0,
        le=256,
        description="Processes per job (at most 256, and no more than the visible GPUs on CUDA or the CPUs on "
        "the CPU). Above 1 the worker runs under 'torchrun --nproc-per-node N' (DDP): on "
        "the CPU with the gloo backend, on CUDA one process per GPU with nccl. 0: one per visible GPU, or 1 "
        "without GPUs. batch_size x grad_accum stays the global batch per optimizer step, split across the "
        "processes, so results match a one-process run with the same settings (up to summation order); rank "
        "0 alone writes status, metrics, checkpoints and the model. Not with engine 'hybrid'.",
    )
    nnodes: int = Field(
        1,
        ge=1,
        le=1024,
        description="Hosts one job spans (multi-node data parallel). Above 1 each host runs a torchrun agent with "
        "nproc processes, meeting at rdzv_endpoint (c10d rendezvous); the host that claimed the job is node 0 "
        "and holds global rank 0 (it writes status, metrics, checkpoints and the model). The global batch "
        "stays batch_size x grad_accum, split across nnodes x nproc ranks. The run folder, data and model "
        "paths must be the same on every host (shared storage). Not with engine 'hybrid'.",
    )
    rdzv_endpoint: str = Field(
        "",
        description="'host:port' of the rendezvous for nnodes > 1 (required then): the claiming host's address "
        "as every host of the job reaches it, and a free TCP port there, where its torchrun agent hosts the "
        "c10d store.",
    )
    sharding: Literal["replicate", "fsdp"] = Field(
        "replicate",
        description="How several processes (nproc > 1) hold the model. replicate: every process holds all "
        "weights, gradients and AdamW state (16 bytes per parameter each; the fastest when that fits one "
        "GPU). fsdp: FSDP2 shards weights, gradients and AdamW state across the processes, gathering each "
        "layer's weights only while it computes: for a model whose weights + gradients + optimizer state do "
        "not fit one GPU. The same numbers and the same checkpoint and model files either way. Not with LoRA; "
        "no out-of-memory back-off (an OOM fails the job); with one process it shards nothing (a warning).",
    )
    engine: Literal["plain", "hybrid"] = Field(
        "plain",
        description="Training engine. hybrid: examples predicted learned skip their forward and backward "
        "passes, and the lr decay starts where the validation curve flattens ([training.hybrid]); "
        "experimental (docs/BENCHMARKS.md).",
    )
    hybrid: HybridConfig = Field(
        default_factory=HybridConfig, description="Settings of the hybrid engine (used when engine is 'hybrid')."
    )
    nan_max_skips: int = Field(
        3,
        ge=1,
        le=25,
        description="Steps skipped for a NaN/Inf loss or gradient (within 25 steps, so at most 25) that trigger a "
        "rollback to the last good checkpoint with a lower learning rate.",
    )
    nan_lr_factor: float = Field(
        0.5, gt=0, le=1, description="Learning-rate multiplier applied at each NaN/Inf rollback."
    )
    nan_max_rollbacks: int = Field(
        2, ge=0, le=100, description="NaN/Inf rollbacks allowed; one more fails the job with failure class 'nan'."
    )
    disk_margin_mb: int = Field(
        256,
        ge=0,
        le=1_000_000,
        description="Free space (MB) to keep beyond a checkpoint's expected size before saving it; at most "
        "1,000,000 (1 TB), or the job could wait for room that never comes.",
    )
    overfit_patience: int = Field(
        3,
        ge=1,
        le=1000,
        description="Evaluations in a row with rising validation loss (and falling train loss) that "
        "count as overfitting (a warning).",
    )
    early_stop_on_overfit: bool = Field(
        False, description="Finish the job early (as completed, saying why) when overfitting is detected."
    )
    lora: bool = Field(
        False,
        description="Train a LoRA adapter (peft) instead of all weights: the base stays frozen, the version "
        "holds the adapter and records its base; 'trainbox models export V' writes the merged model.",
    )
    lora_r: int = Field(8, ge=1, le=4096, description="LoRA rank.")
    lora_alpha: float = Field(
        16.0, gt=0, le=16384, description="LoRA alpha; the update is scaled by lora_alpha / lora_r."
    )
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    lora_targets: list[str] | Literal["auto", "all-linear"] = Field(
        "auto",
        description='Modules that get adapters: a list of module names (e.g. ["q_proj", "v_proj"]); '
        "'auto': the usual ones for the architecture (q_proj and v_proj for Llama, Qwen, Mistral; c_attn for "
        "GPT-2); 'all-linear': every linear layer but the output head.",
    )
    lora_4bit: bool = Field(
        False,
        description="QLoRA: load the frozen base in 4 bits (NF4) through bitsandbytes; needs lora (true), a "
        "CUDA GPU and the bitsandbytes package.",
    )

    @field_validator("rdzv_endpoint")
    @classmethod
    def _endpoint_is_host_port(cls, value: str) -> str:
        if value and not is_host_port(value):
            raise ValueError("expected 'host:port' (a host name or address, ':', a TCP port from 1 to 65535)")
        return value


class ServerConfig(_Strict):
    host: str = Field("127.0.0.1", description="Address the status server binds.")
    port: int = Field(8377, ge=0, le=65535, description="Port of the status server (0: any free port).")
    read_requires_token: bool = Field(
        False, description="Require the API token for read endpoints too (the page itself stays open)."
    )
    max_upload_bytes: int = Field(
        64 * 1024**2, gt=0, le=10**11, description="Largest upload to POST /api/upload, in bytes (at most 100 GB)."
    )


class WatchdogConfig(_Strict):
    interval: float = Field(1.0, gt=0, le=60, description="Seconds between watchdog checks.")
    restart_daemon: Literal["auto", "always", "never"] = Field(
        "auto",
        description="Restart a dead or hung daemon. auto: yes, unless systemd ($INVOCATION_ID) or trainbox up "
        "($TRAINBOX_SUPERVISED) runs it, which restart it themselves.",
    )
    restart_backoff: float = Field(
        5.0, gt=0, le=3600, description="Seconds before the first daemon restart; doubles per restart in a row."
    )
    startup_grace: float = Field(
        60.0, gt=0, le=3600, description="Seconds a restarted daemon gets to write its first heartbeat."
    )
    hang_factor: float = Field(
        5.0,
        ge=1,
        le=1000,
        description="A worker phase is hung after this many times the longest heartbeat interval measured in "
        "that phase (clamped to the phase's floor and ceiling; the ceiling until one is measured).",
    )
    loading_floor: float = Field(120.0, gt=0, le=86400, description="Seconds: least time allowed for loading.")
    loading_ceiling: float = Field(
        1800.0, gt=0, le=86400, description="Seconds: most time allowed for loading a model and data."
    )
    training_floor: float = Field(
        60.0, gt=0, le=86400, description="Seconds: least time allowed between heartbeats in training."
    )
    training_ceiling: float = Field(
        1800.0, gt=0, le=86400, description="Seconds: most time allowed between training heartbeats."
    )
    evaluating_floor: float = Field(
        120.0, gt=0, le=86400, description="Seconds: least time allowed for one evaluation."
    )
    evaluating_ceiling: float = Field(
        3600.0, gt=0, le=86400, description="Seconds: most time allowed for one evaluation."
    )
    checkpointing_floor: float = Field(
        120.0, gt=0, le=86400, description="Seconds: least time allowed for one checkpoint save."
    )
    checkpointing_ceiling: float = Field(
        1800.0, gt=0, le=86400, description="Seconds: most time allowed for a checkpoint save."
    )
    kill_grace: float = Field(
        30.0, gt=0, le=3600, description="Seconds between SIGTERM and SIGKILL for a hung worker or daemon."
    )


class RetentionConfig(_Strict):
    interval: float = Field(60.0, gt=0, le=86400, description="Seconds between retention passes.")
    keep_last: int = Field(2, ge=0, le=10_000, description="Newest checkpoints kept per run.")
    keep_best: int = Field(1, ge=0, le=10_000, description="Checkpoints with the lowest validation loss kept per run.")
    milestone_every: int = Field(
        0, ge=0, le=10_000_000, description="Keep checkpoints whose step is a multiple of this; 0: none."
    )
    min_age: float = Field(
        3600.0,
        ge=0,
        le=31_536_000,
        description="Seconds (at most a year): checkpoints younger than this are never deleted.",
    )
    max_total_gb: float = Field(
        0.0,
        ge=0,
        le=1_000_000,
        description="Cap on all checkpoints together, in GB (1e9 bytes, at most 1,000,000); 0: no cap. Lowest value "
        "goes first.",
    )
    min_free_share: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="Keep at least this share of the home's disk free by deleting the lowest-value checkpoints.",
    )
    set_aside_days: float = Field(
        14.0,
        ge=0,
        le=3650,
        description="Days a model folder that start-up reconciliation set aside under models/.orphaned/ (one "
        "whose version row was lost) is kept for a person to look at before retention deletes it; 0: forever.",
    )


class ModelsConfig(_Strict):
    eval_file: str = Field(
        "",
        description="Frozen evaluation JSONL (absolute or relative to the home) every new version is scored on. "
        "Empty: gate on the job's own held-out loss, new model against the one it started from.",
    )
    regression_tolerance: float = Field(
        0.02,
        ge=0,
        le=10,
        description="Promote a new version only if its eval loss is at most (1 + this) times the current one's.",
    )
    eval_max_examples: int = Field(256, ge=1, le=100_000, description="Cap on the frozen evaluation set.")
    eval_max_length: int = Field(
        0, ge=0, le=1_000_000, description="Tokens per evaluated example; 0: the job's max_length."
    )
    eval_timeout: float = Field(
        1800.0,
        gt=0,
        le=86400,
        description="Seconds (at most a day) the gate evaluation may take; on timeout the version is not promoted.",
    )
    forgetting_tolerance: float = Field(
        0.25,
        ge=0,
        le=100,
        description="Promote a new version only if its own job's memory set improves and, on every earlier job's "
        "set (its lineage's validation examples), it loses at most this share of what that job taught (the "
        "drop of the set's loss from the model the job started from to the current version; the relative rise "
        "of the loss where that is unknown). 0.25: the README's examples in sequence, with replay_share 0.15, "
        "lose 9 % at worst; a file teaching the opposite of an earlier one loses far more (docs/ARCHITECTURE.md).",
    )
    memory_eval_examples: int = Field(
        256, ge=1, le=100_000, description="Cap on the validation examples kept per job as its memory set."
    )
    memory_train_examples: int = Field(
        512,
        ge=0,
        le=1_000_000,
        description="Cap on the training examples kept per job for later jobs to replay (0: none kept).",
    )
    memory_job_mb: float = Field(
        8.0, gt=0, le=100_000, description="Cap in MB on each of a job's two memory sets (at least one example)."
    )
    memory_total_mb: float = Field(
        512.0,
        gt=0,
        le=10_000_000,
        description="Cap in MB on all memory sets together: over it, every older set is cut to the same share "
        "of its size (its seeded sample's first examples), each keeping one at least; none is dropped.",
    )
    memory_eval_seconds: float = Field(
        300.0,
        gt=0,
        le=86400,
        description="Time budget of a gate's scoring of earlier jobs' memory sets: each is scored on as many of "
        "its examples as the measured speed allows, in equal shares.",
    )


NotifyEvent = Literal["done", "failed", "paused", "gate_refused", "disk_full", "daemon_crash"]
NOTIFY_EVENTS: tuple[NotifyEvent, ...] = ("done", "failed", "paused", "gate_refused", "disk_full", "daemon_crash")


class WebhookConfig(_Strict):
    url: str = Field(
        pattern=r"^https?://[^\s]+$",
        description="URL the notification is POSTed to as JSON (http or https; Slack incoming webhooks work).",
    )
    events: list[NotifyEvent] = Field(
        default_factory=lambda: list(NOTIFY_EVENTS),
        description="Events this URL wants: done, failed, paused, gate_refused, disk_full, daemon_crash.",
    )


class NotifyConfig(_Strict):
    webhooks: list[WebhookConfig] = Field(
        default_factory=list,
        description="Webhooks, as [[notify.webhooks]] tables with url and events; none: no notifications.",
    )
    timeout: float = Field(5.0, gt=0, le=60, description="Seconds one delivery may take before it counts as failed.")
    max_attempts: int = Field(
        8, ge=1, le=100, description="Deliveries tried per notification before it is given up (with an event)."
    )
    retry_backoff: float = Field(
        5.0, gt=0, le=3600, description="Seconds before the second delivery try; doubles per failed try."
    )
    max_backoff: float = Field(600.0, gt=0, le=86400, description="Longest wait between two tries, in seconds.")
    poll_interval: float = Field(
        1.0, gt=0, le=60, description="Seconds between the notifier's looks at new events and due deliveries."
    )
    server_url: str = Field(
        "",
        description="Base URL of the status server for report links (http://host:port); empty: from [server] "
        "host and port when the port is fixed.",
    )


class ReportConfig(_Strict):
    """What the job report prices a job at (issue 19): both prices 0 means no cost line."""

    price_per_kwh: float = Field(
        0.0, ge=0, le=1_000_000, description="Electricity price per kWh the GPUs drew (NVML's energy counter); 0: none."
    )
    price_per_gpu_hour: float = Field(
        0.0, ge=0, le=1_000_000, description="Price per GPU-hour (a rented machine's rate); 0: none."
    )
    currency: str = Field("", max_length=8, description="Shown after the prices in the report, e.g. EUR; free text.")


class TrackingConfig(_Strict):
    tensorboard: bool = Field(
        False, description="Write TensorBoard event files under runs/job-N/tb/ from the worker (scalars, settings)."
    )
    mlflow: bool = Field(
        False,
        description="Log to MLflow from the worker (needs the mlflow or mlflow-skinny package): the scalars, the "
        "settings as params, the job report as artefacts.",
    )
    mlflow_uri: str = Field(
        "",
        max_length=2000,
        description="MLflow tracking URI: sqlite:///PATH.db, http(s)://SERVER, or a folder (MLflow's file store); "
        "relative paths are in the home. Empty: sqlite:///HOME/mlflow.db, artefacts in HOME/mlflow-artifacts/.",
    )
    wandb: bool = Field(
        False,
        description="Log to Weights & Biases from the worker (needs the wandb package): the scalars, the settings "
        "as config, the job report as an artefact. Files under runs/job-N/wandb/.",
    )
    wandb_mode: Literal["offline", "online"] = Field(
        "offline",
        description="offline: W&B writes only local files (upload later with `wandb sync`); online needs "
        "WANDB_API_KEY in the worker's environment and the network.",
    )
    project: str = Field(
        "trainbox", min_length=1, max_length=128, description="The MLflow experiment and the W&B project name."
    )


class DbConfig(_Strict):
    url: str = Field(
        "",
        description="SQLAlchemy URL of the model DB every process opens (daemon, worker, watchdog, retention, server, "
        "CLI); empty: the home's SQLite file trainbox.db. PostgreSQL: postgresql+psycopg://USER:PASSWORD@HOST/DB "
        "(or ?host=/run/postgresql for a Unix socket; a password here is never shown, prefer ~/.pgpass).",
    )

    def url_for(self, home_db_url: str) -> str:
        """The URL to open: this one, or the home's SQLite file (``Home.db_url``) when none is set."""
        return self.url or home_db_url


class StorageConfig(_Strict):
    shared: str = Field(
        "",
        description="Folder every host of a fleet reads and writes (a shared mount: NFS or any other): the inbox, "
        "the spool, runs and their checkpoints, model versions, memory sets. Empty: the home itself (one host). "
        "Relative paths are relative to the home. Renames stay inside it, so the spool's claims by rename hold.",
    )


MAX_HOST_NAME = 64  # HOST_NAME_MAX on Linux: any machine's own name fits


class FleetConfig(_Strict):
    """This daemon's place in a fleet: several daemons (one per host) sharing one model DB (issue 18)."""

    host: str = Field(
        "",
        max_length=MAX_HOST_NAME,
        validate_default=True,
        description="This daemon's name in the fleet (trainbox fleet, the dashboard, runs.host); unique among the "
        "daemons sharing the DB: a second live daemon with the same name is refused. Empty: the machine's host name.",
    )
    heartbeat_seconds: float = Field(
        5.0,
        gt=0,
        le=3600,
        description="Seconds between the daemon's heartbeats in the DB's hosts table (not every tick: a write "
        "costs); a host whose last one is older than 3 times this is shown stale, and its name may be taken.",
    )
    enabled: bool = Field(
        False,
        description="Dispatch through the DB's leases (management/leases.py): several daemons on one [db] url and "
        "one [storage] shared take jobs in priority order across the fleet, one job per lineage at a time; a dead "
        "host's job is resumed by another once its lease expires. Off: one daemon, exactly as before.",
    )
    lease_seconds: float = Field(
        30.0,
        ge=1.0,
        le=3600.0,
        description="How long a host's lease on a lineage (and on the fleet's leadership) lasts without renewal "
        "(renewed every third of it): a dead host's job waits this long before another host resumes it. The "
        "retention lease (one host's retention deletes) lasts this plus retention.interval.",
    )

    @field_validator("host")
    @classmethod
    def _resolve_host(cls, v: str) -> str:
        """Empty means this machine's name, resolved once at load; a name is shown in tables and pages, so
        it must be printable (no control or bidi characters) and have no surrounding space."""
        name = v or socket.gethostname()[:MAX_HOST_NAME]
        if not name.isprintable() or name != name.strip() or not name:
            raise ValueError(f"a host name must be printable, without surrounding spaces (got {name!r})")
        return name


class Settings(_Strict):
    daemon: DaemonConfig = Field(default_factory=DaemonConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    watchdog: WatchdogConfig = Field(default_factory=WatchdogConfig)
    retention: RetentionConfig = Field(default_factory=RetentionConfig)
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    notify: NotifyConfig = Field(default_factory=NotifyConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)
    db: DbConfig = Field(default_factory=DbConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    fleet: FleetConfig = Field(default_factory=FleetConfig)


class JobOverrides(TrainingConfig):
    """A sidecar: any [training] key, plus where the job queues and what it validates on."""

    priority: Priority | None = Field(None, description="Queue for this job: high, normal or low.")
    lineage: str | None = Field(
        None,
        description="The chain of model versions this job continues (default: the inbox folder it was dropped "
        "in, inbox/<lineage>/, else main). Each lineage has its own current version, gate and memory.",
    )
    eval_file: str | None = Field(None, description="Validation JSONL (absolute, or relative to the sidecar's folder).")
    requeue_of: int | None = Field(
        None,
        ge=1,
        description="Set by trainbox requeue: this file is job N's again, to train on top of the current version; "
        "admitted although job N's identical file was trained (not while one is waiting or training).",
    )

    @field_validator("lineage")
    @classmethod
    def _lineage_name(cls, v: str | None) -> str | None:
        return None if v is None else check_lineage(v)


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


MAX_SIDECAR_BYTES = 64 * 1024


def load_sidecar(path: Path) -> JobOverrides:
    """Parse a per-job sidecar; only the keys it sets count as overrides (``model_fields_set``)."""
    from trainbox.safefs import open_regular  # the sidecar comes from the inbox: never follow a link

    try:
        with open_regular(path) as f:
            raw = f.read(MAX_SIDECAR_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"{path.name}: cannot read sidecar: {e}") from e
    if len(raw) > MAX_SIDECAR_BYTES:
        raise ConfigError(f"{path.name}: sidecar larger than {MAX_SIDECAR_BYTES} bytes")
    try:
        text = raw.decode("utf-8-sig")
        data: Any = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path.name}: cannot parse sidecar: {e}") from e
    except (ValueError, RecursionError, MemoryError) as e:  # 100,000 nested brackets, huge integers
        raise ConfigError(f"{path.name}: cannot parse sidecar: {type(e).__name__}: {str(e)[:120]}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path.name}: a sidecar must be a table/object of settings")
    if isinstance(data.get("training"), dict) and len(data) == 1:
        data = data["training"]  # also accept a [training] table
    try:
        return JobOverrides.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_describe(e, path.name)) from e


def job_training_config(base: TrainingConfig, overrides: dict[str, Any]) -> TrainingConfig:
    """The [training] settings of one job: the instance's, with the sidecar's keys on top (a sidecar's
    [hybrid] table only replaces the keys it sets)."""
    merged = base.model_dump()
    for k, v in overrides.items():
        if k in TrainingConfig.model_fields:
            merged[k] = {**merged[k], **v} if isinstance(v, dict) and isinstance(merged[k], dict) else v
    return TrainingConfig.model_validate(merged)


TINY_MODEL_PARAMS = 10_000_000
AUTO_LR_TINY = 2e-3
AUTO_LR_FULL = 2e-5
AUTO_LR_LORA = 2e-4


def auto_learning_rate(trainable_params: int, lora_on_params: int = 0) -> float:
    """The learning rate used when ``learning_rate = 0``: what works for the size of model.

    Measured on the embedded 0.66M-parameter model: 3e-4 barely moves it in 100 steps, 2e-3 to 3e-3
    learns fastest, 1e-2 is unstable. Full fine-tunes of real models use 1e-5 to 5e-5; LoRA adapters
    (``lora_on_params``: the size of the model they adapt) 1e-4 to 3e-4, except on a tiny model.
    """
    if lora_on_params:
        return AUTO_LR_TINY if lora_on_params < TINY_MODEL_PARAMS else AUTO_LR_LORA
    return AUTO_LR_TINY if trainable_params < TINY_MODEL_PARAMS else AUTO_LR_FULL


def defaults_toml() -> str:
    """Every key with its default and description, as a commented trainbox.toml."""
    out = ["# trainbox.toml: every key, its default and what it does. Uncomment to change.", ""]
    for table, field_info in Settings.model_fields.items():
        model = field_info.annotation
        assert isinstance(model, type) and issubclass(model, _Strict)
        _table_toml(out, table, model)
    return "\n".join(out)


def _table_toml(out: list[str], table: str, model: type[_Strict]) -> None:
    """One table's keys, then its sub-tables (``[training.hybrid]``), which TOML wants after them."""
    out.append(f"[{table}]")
    nested = []
    for name, field in model.model_fields.items():
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, _Strict):
            nested.append((name, field.description, sub))
            continue
        default = field.get_default(call_default_factory=True)
        if isinstance(default, Priority):
            default = default.value
        value = json.dumps(default) if not isinstance(default, bool) else str(default).lower()
        out.append(f"# {field.description}")
        out.append(f"# {name} = {value}")
    out.append("")
    for name, description, sub in nested:
        out.append(f"# {description}")
        _table_toml(out, f"{table}.{name}", sub)
