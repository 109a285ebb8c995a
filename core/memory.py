"""How much memory a training step needs, and how much the device has: the numbers behind preflight's
memory check, the starting micro-batch and an out-of-memory failure's evidence.

``estimate_memory`` and ``pick_micro_batch`` are pure (a model's shape and settings in, bytes out), so they are
tested without a model; ``model_shape``, ``available_memory``, ``memory_snapshot`` and ``free_memory`` are the
small I/O around them.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import Any

import psutil
import torch

from trainbox.config import TrainingConfig

USABLE_FRACTION = 0.9  # of free memory: allocator fragmentation and other processes
GPU_OVERHEAD = 512 * 1024**2  # CUDA context, cuBLAS workspaces, allocator slack
CPU_OVERHEAD = 256 * 1024**2


@dataclass(frozen=True)
class ModelShape:
    params: int
    trainable: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int
    max_positions: int | None
    weight_bytes: int = 0  # the loaded weights as stored (fp32: 4 B/param, bf16: 2, a 4-bit base ~0.5); 0: params x 4
    adapted: int = 0  # linear layers carrying a LoRA adapter
    lora_r: int = 0


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    grads: int
    optimizer: int
    activations: int
    overhead: int
    engine: int = 0  # the hybrid engine's copies of the trainable weights and AdamW state

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer + self.activations + self.overhead + self.engine

    def as_dict(self) -> dict[str, int]:
        return {
            "weights": self.weights,
            "grads": self.grads,
            "optimizer": self.optimizer,
            "activations": self.activations,
            "overhead": self.overhead,
            "engine": self.engine,
            "total": self.total,
        }


# --- pure ---------------------------------------------------------------------------------------


def estimate_memory(
    shape: ModelShape,
    micro_batch: int,
    max_length: int,
    bf16: bool,
    cuda: bool,
    checkpointing: bool = False,
    shards: int = 1,
    engine_copies: int = 0,
    loss_chunk: int = 0,
) -> MemoryEstimate:
    """Bytes for a training step: the weights as loaded (fp32 master weights for a full fine-tune; a
    frozen LoRA base as stored, about 0.5 B/param in 4 bits under QLoRA), fp32 grads and AdamW's two
    moments of the trainable parameters only, and the activations kept for backward (about 34 x hidden
    values per token and layer, Korthikanti et al. 2022, frozen or not: backward still runs through
    every layer; attention scores too where no fused kernel avoids them, i.e. on the CPU; per LoRA
    adapter its dropped-out input and rank-r intermediate), plus logits and their gradient in fp32: of every
    token, or with the chunked loss (``loss_chunk`` tokens per chunk, core.loss) of one chunk, plus the
    trained positions' hidden states it picks, their gradient and the head's fp32 gradient it holds from
    forward to backward (core.head_loss).
    With gradient ``checkpointing`` only each layer's input (hidden values per token) is kept, plus one
    layer's full activations while it is recomputed. Over ``shards`` ranks (sharding 'fsdp') each rank
    holds its share of the weights, grads and AdamW state, plus the full weights of about two layers in
    flight (the one computing and the one prefetched: an even share of all weights per layer); the
    activations are per rank and do not shrink. ``engine_copies``: fp32 copies of the trainable parameters
    the hybrid engine keeps on the device (``hybrid_copies(cfg)``)."""
    act_bytes = 2 if bf16 else 4
    tokens = micro_batch * max_length
    per_layer = tokens * (34 // 2 * shape.hidden + 2 * shape.intermediate) * act_bytes
    if not cuda:
        per_layer += micro_batch * shape.heads * max_length * max_length * 2 * act_bytes
    logits = min(tokens, loss_chunk or tokens) * shape.vocab * 4 * 3
    if loss_chunk:  # the picked hidden states and their gradient; the fused loss's fp32 head gradient
        logits += 2 * tokens * shape.hidden * act_bytes + shape.vocab * shape.hidden * 4
    adapters = shape.adapted * tokens * (shape.hidden + shape.lora_r) * act_bytes
    if checkpointing:  # each layer's input, and one layer's full activations while it is recomputed
        kept = shape.layers * tokens * shape.hidden * act_bytes + per_layer + adapters // max(shape.layers, 1)
    else:
        kept = shape.layers * per_layer + adapters
    weights = shape.weight_bytes or shape.params * 4
    in_flight = 2 * weights // max(shape.layers, 1) if shards > 1 else 0
    return MemoryEstimate(
        weights=-(-weights // shards) + in_flight,
        grads=-(-shape.trainable * 4 // shards),
        optimizer=-(-shape.trainable * 8 // shards),
        activations=kept + logits,
        overhead=GPU_OVERHEAD if cuda else CPU_OVERHEAD,
        engine=shape.trainable * 4 * engine_copies,
    )


GOOD_POINT_COPIES = 3  # core.hybrid.goodpoint: weights, exp_avg, exp_avg_sq


def hybrid_copies(cfg: TrainingConfig) -> int:
    """fp32 copies of the trainable parameters the hybrid engine holds: the last good point it rolls back to (the
    weights and AdamW's two moments); 0 for the plain engine."""
    return GOOD_POINT_COPIES if cfg.engine == "hybrid" else 0


def halvings(configured: int) -> list[int]:
    """The micro-batches OOM back-off would try: configured, half, ..., 1."""
    out = [configured]
    while out[-1] > 1:
        out.append(out[-1] // 2)
    return out


def pick_micro_batch(
    shape: ModelShape,
    configured: int,
    max_length: int,
    bf16: bool,
    cuda: bool,
    available: int,
    checkpointing: bool = False,
    shards: int = 1,
    engine_copies: int = 0,
    loss_chunk: int = 0,
) -> tuple[int | None, MemoryEstimate]:
    """The largest micro-batch among ``halvings(configured)`` whose estimate fits ``available``
    (usable share); None when not even 1 fits. Also returns the estimate for the one chosen (or 1)."""
    budget = int(available * USABLE_FRACTION)
    est = estimate_memory(shape, 1, max_length, bf16, cuda, checkpointing, shards, engine_copies, loss_chunk)
    for m in halvings(configured):
        est = estimate_memory(shape, m, max_length, bf16, cuda, checkpointing, shards, engine_copies, loss_chunk)
        if est.total <= budget:
            return m, est
    return None, est


# --- I/O ----------------------------------------------------------------------------------------


def model_shape(model: Any) -> ModelShape:
    c = model.config
    text = c.get_text_config() if hasattr(c, "get_text_config") else c
    hidden = int(getattr(text, "hidden_size", 0) or 0)
    return ModelShape(
        params=sum(p.numel() for p in model.parameters()),
        trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
        hidden=hidden,
        intermediate=int(getattr(text, "intermediate_size", 0) or 4 * hidden),
        layers=int(getattr(text, "num_hidden_layers", 0) or 0),
        heads=int(getattr(text, "num_attention_heads", 0) or 0),
        vocab=int(getattr(text, "vocab_size", 0) or 0),
        max_positions=getattr(text, "max_position_embeddings", None),
        weight_bytes=sum(p.numel() * p.element_size() for p in model.parameters()),
        adapted=sum(1 for m in model.modules() if isinstance(getattr(m, "lora_A", None), torch.nn.ModuleDict)),
        lora_r=max(
            (int(r) for m in model.modules() if isinstance(getattr(m, "r", None), dict) for r in m.r.values()),
            default=0,
        ),
    )


def available_memory(device: torch.device) -> tuple[int, str]:
    """Free bytes where training runs, counting the model already loaded there as available."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free) + int(torch.cuda.memory_allocated(device)), f"GPU {torch.cuda.get_device_name(device)}"
    rss = psutil.Process().memory_info().rss
    return int(psutil.virtual_memory().available) + int(rss), "RAM"


def memory_snapshot(device: torch.device) -> dict[str, Any]:
    """Numbers for an OOM's evidence; best effort."""
    try:
        if device.type == "cuda":
            free, total = torch.cuda.mem_get_info(device)
            return {
                "gpu_free_bytes": int(free),
                "gpu_total_bytes": int(total),
                "allocated_bytes": int(torch.cuda.memory_allocated(device)),
                "reserved_bytes": int(torch.cuda.memory_reserved(device)),
                "peak_allocated_bytes": int(torch.cuda.max_memory_allocated(device)),
            }
        vm = psutil.virtual_memory()
        return {
            "ram_available_bytes": int(vm.available),
            "ram_total_bytes": int(vm.total),
            "rss_bytes": int(psutil.Process().memory_info().rss),
        }
    except Exception as e:  # boundary: evidence is a courtesy
        return {"memory_error": str(e)}


def free_memory(device: torch.device) -> None:
    """Before a retry after an out-of-memory error: tensors a failed attempt left in reference cycles (its
    traceback's frames hold the activations) are only freed by a collection, and the allocator's cached blocks
    go back to the device so the retry starts from unfragmented memory."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
