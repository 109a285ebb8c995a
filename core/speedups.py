"""Which of the engine's speed-ups a run uses: packing and the chunked loss, each on where it is exact, and
torch.compile where it pays (core.compiling).

Both are on by default (``training.packing = "auto"``, ``training.chunked_loss``) and each is checked on the
model as loaded (its attention implementation, LoRA wrapping, tied head) by a probe of a few tokens, not by
a list of model families: transformers' models change between versions, and a probe cannot be out of date.
A speed-up that does not hold is turned off with a one-line reason for the job's log and its metrics. The
decision is a pure function of the model's weights and code, so a resumed run decides the same and stays
bitwise on its course. With several processes every rank probes its own copy and they agree (any rank's
"no" is everyone's).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from core import compiling, sharding
from core.data import Batches
from core.distributed import Lockstep
from core.encode import Example
from core.loss import Head, head_problem, split_head
from core.packing import packing_problem
from trainbox.config import TrainingConfig

log = logging.getLogger("core.speedups")


@dataclass
class Speedups:
    packed: bool = False
    split: Head | None = None  # the chunked loss's model split, None for the plain loss
    notes: list[str] = field(default_factory=list)  # why a speed-up asked for is off, one line each


def vocab_size(model: torch.nn.Module) -> int:
    config = getattr(model, "config", None)
    text = config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config
    return int(getattr(text, "vocab_size", 0) or 0)


def compile_if_it_pays(
    model: torch.nn.Module, split: Head | None, cfg: TrainingConfig, device: torch.device, tokens: int
) -> bool:
    """``training.compile`` (core.compiling) for a run that will train about ``tokens`` tokens; compiles the
    module the loss calls in place. True when compiled."""
    params = sum(p.numel() for p in model.parameters())
    cpu_seconds = compiling.estimated_cpu_seconds(params, tokens, torch.get_num_threads())
    on, why = compiling.decide(cfg.compile, device.type, sharding.is_sharded(model), cpu_seconds)
    if why:
        log.info("%s", why)
    if on:
        compiling.compile_in_place(split.body if split is not None else model)
    return on


def batches(train: list[Example], cfg: TrainingConfig, packed: bool) -> Batches:
    """The run's micro-batches: length-grouped (``group_by_length``), else token-balanced where rows are packed
    (``balance_tokens``; a padded batch costs its longest example times its rows, which balancing does not
    steady), else plain."""
    lengths = [len(e.input_ids) for e in train]
    if cfg.group_by_length:
        return Batches(len(train), cfg.batch_size, cfg.seed, lengths=lengths)
    if cfg.balance_tokens and packed:
        return Batches(len(train), cfg.batch_size, cfg.seed, balance=lengths)
    return Batches(len(train), cfg.batch_size, cfg.seed)


def choose(model: torch.nn.Module, cfg: TrainingConfig, device: torch.device, ranks: Lockstep) -> Speedups:
    """Packing and the chunked loss for this run, each probed where the config leaves it to us."""
    out = Speedups()
    vocab = vocab_size(model)
    if cfg.packing is True:
        out.packed = True
    elif cfg.packing == "auto":
        why = packing_problem(model, device, vocab)
        out.packed = not ranks.dist.any_flag(bool(why))
        if not out.packed:
            out.notes.append(why or "packing off: another rank's model failed the packing probe")
    if cfg.chunked_loss:
        split = split_head(model)
        if sharding.is_sharded(model):
            why = "chunked loss off: under sharding 'fsdp' the root module gathers the head in its own forward"
        elif isinstance(split, str):
            why = f"chunked loss off: {split}"
        else:
            why = head_problem(model, split, device, vocab)
        if not ranks.dist.any_flag(bool(why)) and isinstance(split, Head):
            out.split = split
        else:
            out.notes.append(why or "chunked loss off: another rank's model failed the split-head probe")
    for note in out.notes:
        log.info("%s", note)
    log.info(
        "speed-ups: packing %s, loss %s",
        "on" if out.packed else "off",
        f"chunked ({out.split.chunk} tokens per chunk)" if out.split else "plain",
    )
    return out
