"""The training loss, defined once: the loop trains on it and ``core/evaluate.py`` scores model versions
with it (``mean_loss``), so a version's evaluation number is the same quantity as a job's validation loss.

Two ways to compute the same sum. Plain: the model's logits (tokens x vocabulary) then cross-entropy.
Chunked (``Head``, ``training.chunked_loss``): the model's body gives hidden states, and the output head
plus cross-entropy run over chunks of the trained positions only, each chunk's gradients made in the
forward pass (core.head_loss) or, for a head that is not a plain linear layer, its logits recomputed in the
backward pass (``torch.utils.checkpoint``), so at most one chunk's logits exist at a time. For a small model
with a large vocabulary the logits are the largest activation of the step (SmolLM2-135M: 49k vocabulary x
576 hidden, so the fp32 logits are 340x the hidden states they come from).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from core.data import MODEL_INPUTS
from core.encode import IGNORE, Example
from core.head_loss import fused_head_loss

CHUNK_LOGIT_BYTES = 256 * 1024**2  # fp32 logits of one chunk (smaller chunks measured slower on the CPU)
MIN_CHUNK_TOKENS = 256  # below this, a chunk's matmul is too small to run the head efficiently
# config keys of models that change the logits after the head (Gemma 2/3 soft-capping, Cohere, Granite)
AFTER_HEAD = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over trained positions (labels are aligned with inputs). The labels
    are shifted, not the logits: slicing the logits (batch x length x vocab, the largest activation) would
    copy them, and again in backward (measured: 131 vs 82 ms per micro-batch of 4 x 64 on SmolLM2)."""
    vocab = logits.shape[-1]
    shifted = F.pad(labels[:, 1:], (0, 1), value=IGNORE)
    return F.cross_entropy(logits.reshape(-1, vocab).float(), shifted.reshape(-1), ignore_index=IGNORE, reduction="sum")


def trained_positions(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != IGNORE).sum())


def example_trained(e: Example) -> int:
    """``trained_positions`` of one example, without collating it."""
    return sum(1 for label in e.labels[1:] if label != IGNORE)


def chunk_tokens(vocab: int) -> int:
    """Tokens per chunk: ``CHUNK_LOGIT_BYTES`` of fp32 logits, at least ``MIN_CHUNK_TOKENS``."""
    return max(MIN_CHUNK_TOKENS, CHUNK_LOGIT_BYTES // (4 * max(vocab, 1)))


@dataclass(frozen=True)
class Head:
    """A causal LM split at its output head: ``body`` gives the last hidden states, ``head`` the logits."""

    body: torch.nn.Module
    head: torch.nn.Module
    chunk: int  # trained positions per chunk


def split_head(model: torch.nn.Module) -> Head | str:
    """The model's body and head, or why it has none to split (a one-line reason). A peft model is split
    inside its adapters (the LoRA layers stay in the body and the head; peft's own forward adds nothing
    for LoRA). Whether the split computes the same loss is ``head_problem``'s probe."""
    unwrap: Any = getattr(model, "get_base_model", None)
    inner: Any = unwrap() if callable(unwrap) else model
    get_head = getattr(inner, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    body = getattr(inner, "base_model", None)
    if not isinstance(head, torch.nn.Module) or not isinstance(body, torch.nn.Module) or body is inner:
        return f"{type(inner).__name__} has no separate output head"
    config: Any = getattr(inner, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in AFTER_HEAD:  # a small random model's logits barely feel these: the probe alone would miss them
        if getattr(text, name, None) not in (None, 0, 1, 1.0):
            return f"{type(inner).__name__} transforms its logits after the head ({name})"
    vocab = getattr(head, "out_features", None) or int(getattr(text, "vocab_size", 0) or 0)
    return Head(body, head, chunk_tokens(int(vocab)))


def _chunk_loss(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


@dataclass(frozen=True)
class Staged:
    """A collated batch's tensors on the device, as the loss takes them; made ahead of the step that uses
    them (core.lookahead), on a GPU from pinned memory without waiting for the copy."""

    inputs: dict[str, Any]  # the model's keyword arguments
    labels: torch.Tensor | None  # the plain loss: aligned with the inputs
    where: torch.Tensor | None  # the chunked loss: the trained positions (flattened) and their targets
    targets: torch.Tensor | None


def stage(batch: dict[str, torch.Tensor], device: torch.device, split: Head | None) -> Staged:
    """The batch for ``staged_loss_sum``: the chunked loss's trained positions are picked here, on the host,
    where the labels are (so no step waits for the device to count them)."""
    pin = device.type == "cuda"

    def put(t: torch.Tensor) -> torch.Tensor:
        return (t.pin_memory() if pin else t).to(device, non_blocking=True)

    inputs = {"use_cache": False, **{k: put(batch[k]) for k in MODEL_INPUTS if k in batch}}
    if split is None:
        return Staged(inputs, put(batch["labels"]), None, None)
    shifted = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE).reshape(-1)
    where = (shifted != IGNORE).nonzero().squeeze(1)
    return Staged(inputs, None, put(where), put(shifted[where]))


def staged_loss_sum(
    model: torch.nn.Module, staged: Staged, split: Head | None = None, per_token: list[torch.Tensor] | None = None
) -> torch.Tensor:
    """``token_loss_sum`` of the model's logits for a staged batch: plain, or through ``split``. A plain
    linear head goes through the fused loss (core.head_loss: gradients made chunk by chunk in forward); any
    other head (a LoRA-wrapped one) above one chunk has each chunk's logits recomputed in backward.

    ``per_token``: the forward's loss at each position is appended to it, detached (the hybrid engine's
    per-example losses, at no extra pass): plain, one per position of the shifted labels (0 where ignored);
    chunked, one per trained position in ``staged.where``'s order."""
    if split is None or staged.where is None or staged.targets is None:
        assert staged.labels is not None
        logits = model(**staged.inputs).logits
        if per_token is None:
            return token_loss_sum(logits, staged.labels)
        shifted = F.pad(staged.labels[:, 1:], (0, 1), value=IGNORE).reshape(-1)
        token = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), shifted, ignore_index=IGNORE, reduction="none"
        )
        per_token.append(token.detach())
        return token.sum()
    hidden = split.body(**staged.inputs).last_hidden_state
    picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, staged.where)
    targets = staged.targets
    if type(split.head) is torch.nn.Linear:
        into = (
            torch.empty(picked.shape[0], dtype=torch.float32, device=picked.device) if per_token is not None else None
        )
        total = fused_head_loss(picked, split.head, targets, split.chunk, into)
        if per_token is not None and into is not None:
            per_token.append(into)
        return total
    if per_token is not None:  # each chunk's per-position losses; recomputed in backward like the sums below
        parts = [
            checkpoint(
                _chunk_token_losses,
                split.head,
                picked[s : s + split.chunk],
                targets[s : s + split.chunk],
                use_reentrant=False,
            )
            for s in range(0, picked.shape[0], split.chunk)
        ]
        token = torch.cat(parts)
        per_token.append(token.detach())
        return token.sum()
    if picked.shape[0] <= split.chunk:  # one chunk: nothing to recompute
        return _chunk_loss(split.head, picked, targets)
    total = torch.zeros((), device=picked.device)
    for start in range(0, picked.shape[0], split.chunk):
        end = start + split.chunk
        part = checkpoint(_chunk_loss, split.head, picked[start:end], targets[start:end], use_reentrant=False)
        total = total + part
    return total


def _chunk_token_losses(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="none")


def batch_loss_sum(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], device: torch.device, split: Head | None = None
) -> torch.Tensor:
    """The summed loss of one collated batch: plain, or through ``split`` when given."""
    return staged_loss_sum(model, stage(batch, device, split), split)


@torch.no_grad()
def head_problem(model: torch.nn.Module, split: Head, device: torch.device, vocab: int) -> str:
    """'' when the split loss equals the plain one on a small batch (fp32, eval mode), else why not: a model
    that does more than a linear head after its body (logit soft-capping, scaling) fails here."""
    n = max(2, min(vocab, 97))
    ids = (torch.arange(24).reshape(2, 12) * 7 + 3) % n
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    was_training = model.training
    model.eval()
    try:
        plain = float(batch_loss_sum(model, batch, device))
        chunked = float(batch_loss_sum(model, batch, device, Head(split.body, split.head, 5)))
    except Exception as e:  # boundary: any model code may refuse to be called in parts
        return f"chunked loss off: the model cannot be split at its head ({type(e).__name__}: {str(e)[:120]})"
    finally:
        model.train(was_training)
    if abs(chunked - plain) <= 1e-4 * max(1.0, abs(plain)):
        return ""
    return f"chunked loss off: the loss through the split head ({chunked:.6g}) differs from the model's ({plain:.6g})"


@torch.no_grad()
def mean_loss(
    model: Any,
    batches: Iterable[dict[str, torch.Tensor]],
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
    split: Head | None = None,
) -> float:
    """Mean loss per trained token over collated batches, no gradient (evaluation, the hybrid probe, the
    eval gate); the model is left in the mode it was in."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        with autocast():
            total += float(batch_loss_sum(model, batch, device, split))
        count += trained_positions(batch["labels"])
    model.train(was_training)
    return total / max(count, 1)
