"""``training.sharding = "fsdp"``: parameters, gradients and optimizer state sharded across the ranks (FSDP2).

Under ``replicate`` (core.distributed) every rank holds the whole model, its gradients and AdamW's two
moments: 16 bytes per parameter on every GPU. A model whose weights, gradients and optimizer state do not fit
one GPU needs them divided across the ranks, which is what ``torch.distributed.fsdp.fully_shard`` does: each
decoder layer (and the root: embeddings, final norm, head) keeps only its 1/world share and all-gathers the
full weights just for its forward and backward; gradients are reduce-scattered after each backward.

What this module keeps the same as the replicate mode, and why:
- The numbers. The loss is already divided by the trained tokens of the whole global step (core.distributed), so
  the per-rank gradients must be *summed*, not averaged as FSDP does by default: ``wrap`` sets the gradient
  divide factor to 1 with sum-only collectives (gloo has no pre-multiplied sum). Clipping and the gradient norm
  work on the shards; the norm comes back as a replicated DTensor and ``full`` turns it into a plain tensor.
- The lock-step. FSDP's collectives run inside every forward and backward, so every rank must run the same
  number of them: ``padding`` says how many extra passes a rank whose share of a micro-batch is short (or
  empty) runs, on ``zero_loss`` batches that contribute no loss, no gradient and no tokens.
- The files. Checkpoints and the final model are written by rank 0 in exactly the unsharded formats
  (save_pretrained weights; an optimizer state dict keyed by parameter index), so resume, model versions,
  export and the daemon never know a run was sharded, and a checkpoint resumes in either mode. Gathering is a
  collective: every rank calls ``gather`` / ``full_optimizer_state``, rank 0 receives the full CPU tensors
  (the others an empty dict) and alone writes.
- Loading. Every rank loads the full weights (to the CPU) before ``wrap``, which keeps each rank's own shard
  and moves it to the device; a resumed optimizer state and a rollback's weights are loaded as full state
  dicts that each rank slices to its shard (``load_optimizer_state``, ``scatter_weights``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from core.encode import IGNORE

# The loss is normalised by the whole global step's trained tokens: gradients are summed across ranks.
GRADIENT_DIVIDE_FACTOR = 1.0
GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)  # full CPU tensors on rank 0, {} elsewhere
SCATTER = StateDictOptions(full_state_dict=True)  # every rank passes the full state and keeps its shard


def is_sharded(model: torch.nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks, each its own FSDP unit: the modules whose class Hugging Face names in
    ``_no_split_modules`` (the blocks it never splits across devices), else ``model.model.layers``."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    found = [m for m in model.modules() if type(m).__name__ in names]
    if found:
        return found
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    return list(layers) if isinstance(layers, torch.nn.ModuleList) else []


def wrap(model: torch.nn.Module, device: torch.device, world: int) -> int:
    """Shard ``model`` in place across the ``world`` ranks (every decoder layer, then the root), with gradients
    summed across ranks; returns the number of decoder layers sharded. Call it after the weights are loaded
    and before the optimizer is built (the optimizer must hold the sharded parameters)."""
    mesh = init_device_mesh(device.type, (world,))
    layers = decoder_layers(model)
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for m in model.modules():
        if isinstance(m, FSDPModule):  # both settings are per module, not recursive
            m.set_gradient_divide_factor(GRADIENT_DIVIDE_FACTOR)
            m.set_force_sum_reduction_for_comms(True)
    return len(layers)


def reshard(model: torch.nn.Module) -> None:
    """Every unit back to its shards. FSDP leaves the root's weights gathered after a forward with no backward
    (evaluation) and registers them as plain tensors meanwhile; loading a state dict or mapping the
    optimizer's parameters to names needs the sharded ones."""
    for m in model.modules():
        if isinstance(m, FSDPModule):  # reshard() is not recursive
            m.reshard()


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a sharded tensor; a plain tensor as it is."""
    return t.to_local() if isinstance(t, DTensor) else t


def full(t: torch.Tensor) -> torch.Tensor:
    """A replicated or partial DTensor (a gradient norm) as a plain tensor; a plain tensor as it is."""
    return t.full_tensor() if isinstance(t, DTensor) else t


# --- the same forward passes on every rank --------------------------------------------------------


def padding(n: int, world: int, rank: int, micro: int, passes: Callable[[int], int] | None = None) -> int:
    """Extra forward passes this rank runs for one configured micro-batch of ``n`` examples, of which it trains
    every ``world``-th (``Dist.shard``) in passes of ``micro`` (or ``passes(share)`` of them, e.g. a
    token-balanced micro-batch's: core.data.Batches.pass_count): rank 0's share is the largest, so every rank
    runs as many passes as rank 0."""
    count = passes or (lambda k: math.ceil(k / micro))
    return count(math.ceil(n / world)) - count(len(range(rank, n, world)))


def zero_loss(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``batch`` with no trained position: its forward and backward run the collectives and add exactly zero
    to the loss and the gradients."""
    return {**batch, "labels": torch.full_like(batch["labels"], IGNORE)}


# --- full state dicts in the unsharded formats ----------------------------------------------------


def tie(model: torch.nn.Module, state: dict[str, Any]) -> dict[str, Any]:
    """``state`` with the tied parameters' names (a shared embedding and output head) pointing at one
    tensor, as an unsharded model's state dict does: save_pretrained then writes the tie once, and a folder
    saved without the tied copy loads."""
    first: dict[int, str] = {}
    out = dict(state)
    for name, p in model.named_parameters(remove_duplicate=False):
        owner = first.setdefault(id(p), name)
        if owner != name:
            if owner in out:
                out[name] = out[owner]
            elif name in out:
                out[owner] = out[name]
    return out


class GatheredModel:
    """The full weights of a sharded model, on rank 0 (empty on the others), with the few methods the save
    code uses on an unsharded model (``save_pretrained``, ``state_dict``, ``parameters``, ``config``), so
    core.checkpoint, the disk guard and the final save work unchanged and write the same files."""

    def __init__(self, model: Any, state: dict[str, Any]) -> None:
        self.model, self.state = model, state

    @property
    def config(self) -> Any:
        return self.model.config

    def state_dict(self) -> dict[str, Any]:
        return self.state

    def parameters(self) -> Iterator[Any]:
        return iter(self.state.values())

    def save_pretrained(self, path: Path, **kwargs: Any) -> None:
        # Hugging Face writes the given state dict (tied copies once), the config (its "FSDP" class-name
        # prefix stripped) and the generation config, on rank 0
        self.model.save_pretrained(path, state_dict=self.state, **kwargs)


def gather(model: torch.nn.Module) -> GatheredModel:
    """The full weights on rank 0. A collective: every rank must call it, in the same order."""
    reshard(model)
    return GatheredModel(model, tie(model, get_model_state_dict(model, options=GATHER)))


def scatter_weights(model: torch.nn.Module, weights: dict[str, Any]) -> None:
    """Full weights (a save_pretrained folder's tensors, on every rank) into the sharded model, each rank
    keeping its shard (a rollback). A collective."""
    reshard(model)
    set_model_state_dict(model, tie(model, weights), options=SCATTER)


def _param_names(optimizer: torch.optim.Optimizer, named: dict[str, Any]) -> list[list[str]]:
    """Each parameter group's parameter names, in the optimizer's order (the order its indices count)."""
    by_id = {id(p): name for name, p in named.items()}
    return [[by_id[id(p)] for p in group["params"]] for group in optimizer.param_groups]


def by_index(state: dict[str, Any], names: list[list[str]]) -> dict[str, Any]:
    """A name-keyed optimizer state dict (torch.distributed.checkpoint's) in ``Optimizer.state_dict()``'s
    format: state and each group's params keyed by the parameter's position across the groups."""
    index = {name: i for i, name in enumerate(n for group in names for n in group)}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]]
    return {"state": {index[n]: s for n, s in state["state"].items()}, "param_groups": groups}


def by_name(state: dict[str, Any], names: list[list[str]]) -> dict[str, Any]:
    """The inverse of ``by_index``."""
    flat = [n for group in names for n in group]
    groups = [{**g, "params": [flat[i] for i in g["params"]]} for g in state["param_groups"]]
    return {"state": {flat[int(i)]: s for i, s in state["state"].items()}, "param_groups": groups}


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's full state on rank 0 ({} on the others), in the unsharded ``state_dict()`` format.
    A collective."""
    reshard(model)
    state = get_optimizer_state_dict(model, optimizer, options=GATHER)
    if not state:
        return {}
    return by_index(state, _param_names(optimizer, dict(model.named_parameters())))


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """A full optimizer state (the unsharded format, on every rank) into the sharded optimizer. A collective."""
    reshard(model)
    names = _param_names(optimizer, dict(model.named_parameters()))
    set_optimizer_state_dict(model, optimizer, by_name(state, names), options=SCATTER)
