"""Several processes per job: ``training.nproc > 1`` runs the worker under ``torchrun`` (DDP, or FSDP below).

How it stays one run (``Lockstep`` below splits each step's data and takes the decisions the ranks share; the
worker does the rank-0-only writing):
- The global batch is the configured one (``batch_size x grad_accum`` examples per optimizer step); every
  rank reads the same data position and takes every ``world``-th example of each configured micro-batch.
  The loss is normalised by the trained tokens of the whole global step, and the gradients are summed across
  ranks once per optimizer step (one all-reduce, as DDP does with ``no_sync`` during accumulation), so a
  2-process run equals a 1-process run up to summation order. The model is not wrapped in
  ``DistributedDataParallel``: the explicit sum keeps ``save_pretrained``, peft, gradient checkpointing and the
  checkpoint code unchanged, and handles a rank whose share of a micro-batch is empty.
- Every decision that changes control flow is agreed: the stop flag (SIGTERM reaches every rank through the
  torchrun agent; ``any_flag`` makes them stop at the same step boundary), an out-of-memory back-off on any
  rank, and NaN skips (the loss and gradients they are judged on are already global).
- Weights, optimizer state and RNG start identical on every rank (same files, same seed; parameters are
  broadcast from rank 0 at the start), and all ranks resume from the same checkpoint, which rank 0 wrote.
- Rank 0 alone writes status, metrics, DB rows, checkpoints, result.json and the final model.
- Evaluation runs on every rank over the whole validation set (the same number everywhere; no collective).

``training.sharding = "fsdp"`` (core.sharding) keeps all of the above but the gradient sum and the broadcast: for a
model whose weights + grads + AdamW state do not fit one GPU, the model is wrapped in FSDP2 (``fully_shard`` per
decoder layer, then the root) after loading and before the optimizer, so each rank holds 1/world of them.
- FSDP reduce-scatters the gradients after every backward, summed (divide factor 1, since the loss is already
  normalised by the global step's tokens), so ``sum_grads`` is skipped; the gradient norm and clipping work on the
  shards. The numbers equal the replicate scheme's up to summation order.
- FSDP's collectives run inside every forward and backward, so every rank runs rank 0's number of forward passes:
  a short or empty share is padded with zero-loss passes (replicate just runs fewer). Evaluation needs nothing
  more: every rank runs the same batches. An out-of-memory error cannot be backed off (one rank cannot retry
  while the others wait inside a collective): it fails the job with the fix.
- No broadcast: each rank loads the same files to the CPU and keeps its shard. Saving gathers the full weights and
  optimizer state (a collective on every rank) and rank 0 writes them in the unsharded formats, so checkpoints
  resume in either mode; a resume or rollback loads the full state on every rank, each keeping its shard.
"""

from __future__ import annotations

import datetime
import functools
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from core import sharding
from core.data import Batches, DataPosition
from core.encode import Example
from core.loss import example_trained, trained_positions
from core.state import first_line

log = logging.getLogger("core.worker")

INIT_TIMEOUT_S = 300
SHUTDOWN_WAIT_S = 120  # how long a finished rank waits at exit for the others (one may be saving the model)
ANOTHER_RANK_OOM = "out of memory on another rank"


@dataclass(frozen=True)
class Dist:
    """This process's place in the job: rank 0 of 1 when there is no torchrun."""

    rank: int = 0
    world: int = 1

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, indices: list[int]) -> list[int]:
        """This rank's share of one configured micro-batch (every ``world``-th example)."""
        return indices[self.rank :: self.world] if self.active else indices

    def any_flag(self, flag: bool) -> bool:
        """True on every rank when it is true on any: a decision all ranks take together."""
        if not self.active:
            return flag
        t = torch.tensor([1.0 if flag else 0.0])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def sum_values(self, values: list[float]) -> list[float]:
        if not self.active:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return [float(x) for x in t.tolist()]

    def sum_grads(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Sum the gradients of the trainable parameters across ranks, in one flat buffer; a parameter
        without a gradient here (an empty share) contributes zeros."""
        if not self.active:
            return
        params = [p for p in params if p.requires_grad]
        if not params:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for p, g in zip(params, grads, strict=True):
            n = g.numel()
            p.grad = flat[offset : offset + n].view_as(p).clone()
            offset += n

    def broadcast_params(self, model: torch.nn.Module) -> None:
        """Rank 0's weights on every rank (they should already agree: same files, same seed)."""
        if not self.active:
            return
        with torch.no_grad():
            for t in list(model.parameters()) + list(model.buffers()):
                dist.broadcast(t.data, src=0)


def from_env() -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    rank = int(os.environ.get("RANK", "0") or 0)
    return Dist(rank, world)


def init(device_type: str) -> Dist:
    """Join the process group when torchrun started this process (WORLD_SIZE > 1): gloo on the CPU,
    nccl on CUDA (one GPU per local rank)."""
    d = from_env()
    if not d.active or dist.is_initialized():
        return d
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=INIT_TIMEOUT_S))
    return d


def shutdown() -> None:
    """Leave the process group together: a rank that destroyed its gloo group while another was still
    writing the final model was seen to abort at exit (SIGABRT, "terminate called without an active
    exception"), failing a job that had completed. A rank that does not arrive within the bound (it failed)
    is not waited for longer."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=SHUTDOWN_WAIT_S))
        else:
            dist.barrier()
    except Exception as e:  # boundary: a peer that failed or left; the group is destroyed all the same
        log.warning("leaving the process group without every rank: %s", first_line(e))
    dist.destroy_process_group()


def resolve_nproc(configured: int) -> int:
    """``training.nproc``: 0 means one per visible GPU, or 1 without GPUs."""
    if configured > 0:
        return configured
    return max(1, torch.cuda.device_count() if torch.cuda.is_available() else 1)


# --- one global step on every rank ----------------------------------------------------------------


@dataclass
class StepPlan:
    """One optimizer step's forward passes on this rank."""

    passes: list[dict[str, torch.Tensor]]
    padding: int  # the last `padding` passes are zero-loss ones (sharded: see core.sharding)
    n_trained: int  # trained tokens the step's loss is divided by
    end: DataPosition  # the data position once the step is applied
    rows: list[list[int]] = field(default_factory=list)  # the example indices of each pass but the padding ones
    skipped: list[int] = field(default_factory=list)  # examples the hybrid engine left out of the step
    reads: int = 0  # micro-batches read from the data (more than grad_accum when compaction filled the step)


def fill(indices: list[int], draw: int, keep: Callable[[list[int], int], list[int]], skipped: list[int]) -> list[int]:
    """The kept examples of one micro-batch read (the step's ``draw``-th); the others are added to ``skipped``."""
    kept = keep(indices, draw)
    skipped += sorted(set(indices) - set(kept))
    return kept


@dataclass(frozen=True)
class Lockstep:
    """How this process takes part in one global step, so the trainer's step reads the same for one process,
    replicated ranks and sharded ones (FSDP): its share of the data, the zero-loss passes it pads with, the
    sums after the accumulation, and the decisions every rank must take together."""

    dist: Dist = Dist()
    sharded: bool = False

    @property
    def can_back_off(self) -> bool:
        """Sharded, one rank cannot retry a step alone: the others wait inside FSDP's collectives."""
        return not self.sharded

    @property
    def defers_oom(self) -> bool:
        """Replicated ranks finish the accumulation after an out-of-memory error and agree on it at the sum;
        one process (nothing to agree) and a sharded rank (the others wait in a collective) raise at once."""
        return self.dist.active and not self.sharded

    def plan(
        self,
        batches: Batches,
        pos: DataPosition,
        examples: list[Example],
        grad_accum: int,
        micro: int,
        collate: Callable[[list[Example]], dict[str, torch.Tensor]],
        keep: Callable[[list[int], int], list[int]] | None = None,
        reads: int = 1,
    ) -> StepPlan:
        """This rank's passes over ``grad_accum`` configured micro-batches from ``pos``: its share of each
        (``Dist.shard``) in passes of ``micro`` examples. With several ranks the loss is divided by the whole
        global step's trained tokens, so their summed gradients equal one process's. ``keep`` (the hybrid engine,
        one process only) picks the examples of each micro-batch read that get their passes (its second argument
        numbers the micro-batches read in the step, for its seeded draw); the rest are skipped. With ``reads`` > 1
        (compaction) a configured micro-batch whose kept examples fall short of the examples read is filled from
        the following micro-batches, up to ``reads`` of them read: the step stays (about) full and the data
        position moves on further."""
        passes: list[dict[str, torch.Tensor]] = []
        rows: list[list[int]] = []
        skipped: list[int] = []
        padding = n_trained = read = 0
        indices: list[int] = []
        for _ in range(grad_accum):
            indices, pos = batches.take(pos)
            read += 1
            if keep is not None:
                indices = fill(indices, read - 1, keep, skipped)
                for _extra in range(reads - 1):
                    if len(indices) >= batches.batch_size:
                        break
                    more, pos = batches.take(pos)
                    read += 1
                    indices = indices + fill(more, read - 1, keep, skipped)
            if self.dist.active:
                n_trained += sum(example_trained(examples[i]) for i in indices)
            for part in batches.passes(self.dist.shard(indices), micro):
                passes.append(collate([examples[i] for i in part]))
                rows.append(part)
            if self.sharded:  # FSDP's collectives need the same forward passes on every rank
                count = functools.partial(batches.pass_count, micro=micro)
                padding += sharding.padding(len(indices), self.dist.world, self.dist.rank, micro, count)
        if padding:  # real forward+backward passes (FSDP's gathers and reduce-scatters run in them) on one of the
            # step's examples with every label ignored: they add nothing to the loss, gradients or token count
            passes += [sharding.zero_loss(collate([examples[indices[0]]]))] * padding
        if not self.dist.active:
            n_trained = sum(trained_positions(b["labels"]) for b in passes)
        return StepPlan(passes, padding, n_trained, pos, rows, skipped, read)

    def reduce(
        self, oom: str, loss_sum: torch.Tensor, tokens: int, params: Iterable[torch.nn.Parameter]
    ) -> tuple[torch.Tensor, int]:
        """After the accumulation, one all-reduce per optimizer step: any rank's out-of-memory error is raised
        on every rank, then the gradients are summed (FSDP already did: reduce-scatter after each backward)
        and so are the step's loss and tokens."""
        if not self.dist.active:
            return loss_sum, tokens
        if self.dist.any_flag(bool(oom)):
            raise torch.cuda.OutOfMemoryError(oom or ANOTHER_RANK_OOM)
        if not self.sharded:
            self.dist.sum_grads(params)
        loss_total, tokens_total = self.dist.sum_values([float(loss_sum), float(tokens)])
        return torch.tensor(loss_total, device=loss_sum.device), int(tokens_total)

    def agree_oom(self, oom: str) -> str:
        """An out-of-memory error in the update on any rank, as every rank's message ('' when none)."""
        if self.dist.any_flag(bool(oom)) and not oom:
            return ANOTHER_RANK_OOM
        return oom

    def agree_finite(self, finite: bool) -> bool:
        """Sharded, each rank checked only its shards: the weights are finite when they are on every rank."""
        return not self.dist.any_flag(not finite) if self.sharded else finite

    def optimizer_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Sharded, the full state is gathered (the unsharded format; a collective: every rank calls it)."""
        return sharding.full_optimizer_state(model, optimizer) if self.sharded else optimizer.state_dict()

    def load_optimizer_state(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
    ) -> None:
        """Sharded, every rank gets the full (unsharded-format) state and keeps its shard."""
        if self.sharded:
            sharding.load_optimizer_state(model, optimizer, state)
        else:
            optimizer.load_state_dict(state)
