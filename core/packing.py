"""Padding-free rows, and whether they are exact for a given model.

A forward pass's examples are packed into rows no wider than its longest example (first fit, longest
first), position ids restarting at 0 for every example. With no attention mask transformers reads the
boundaries from the position ids (``masking_utils.find_packed_sequence_indices``) and builds a
block-diagonal causal mask, so no token attends across examples. Rows rather than one long row: with a
masked attention kernel (sdpa, eager) the cost is quadratic in the row's width, so one row of a whole
micro-batch spends more on masked-out scores than padding spent on pad tokens (measured on the CPU:
8 x 256-token examples in one row of 2048 trained 0.7x as fast as padded rows); rows as wide as the longest
example never cost more attention than the padded batch. A row's tail is a filler segment (its own
positions from 0, no label), so it is attended by nothing real.

Exactness depends on the model: one whose attention or positions ignore per-example position ids (learned
absolute positions read from a counter, a recurrent state, a kernel that only takes a padding mask) would
let examples see each other. ``packing_problem`` runs a probe instead of keeping a list of families: one
packed row of two short sequences against each alone, on the model as it will train (its attention
implementation, LoRA wrapping, dtype).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from core.encode import IGNORE, Example

# The probe passes if the packed logits are this close to the separate ones, relative to how far apart
# letting the second sequence see the first puts them (fp32 kernels agree to ~1e-6; crossing moves them
# by orders of magnitude more on any trained or random model).
PROBE_RELATIVE = 0.01
PROBE_FLOOR = 1e-5


def place(lengths: Sequence[int], width: int) -> list[list[int]]:
    """Rows of example indices, first fit decreasing into rows of ``width`` tokens (stable: ties keep
    the batch's order), so the rows are as few as the greedy gets and their order is deterministic."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda k: -lengths[k]):
        n = lengths[i]
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(width - n)
    return rows


def pack_rows(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """The examples packed into rows (``place``); every example's first label is ignored (it would be
    predicted from whatever precedes it in the row), which the padded batch's shift ignores too, so the
    trained positions and the loss are the padded batch's. ``tokens`` counts the real (non-filler) ones."""
    lengths = [len(e.input_ids) for e in examples]
    width = max(lengths)
    rows = place(lengths, width)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    for r, members in enumerate(rows):
        at = 0
        for i in members:
            e, n = examples[i], lengths[i]
            ids[r, at : at + n] = torch.tensor(e.input_ids, dtype=torch.long)
            labels[r, at + 1 : at + n] = torch.tensor(e.labels[1:], dtype=torch.long)
            positions[r, at : at + n] = torch.arange(n)
            at += n
        positions[r, at:] = torch.arange(width - at)  # the filler: a segment of its own
    return {
        "input_ids": ids,
        "position_ids": positions,
        "labels": labels,
        "tokens": torch.tensor(sum(lengths)),
    }


@torch.no_grad()
def packing_problem(model: torch.nn.Module, device: torch.device, vocab: int) -> str:
    """'' when a packed row's logits equal each sequence's alone for this model, else why not (one line).
    Runs in eval mode (no dropout, so no RNG is drawn) and fp32 inputs; the model's mode is restored."""
    n = max(2, min(vocab, 64))
    a = torch.arange(1, 8) % n
    b = (torch.arange(3, 9) * 5) % n
    was_training = model.training
    model.eval()
    try:

        def logits(ids: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
            kw = {"position_ids": pos[None].to(device)} if pos is not None else {}
            out = model(input_ids=ids[None].to(device), use_cache=False, **kw).logits[0]
            return out.float().cpu()

        row = torch.cat([a, b])
        alone = logits(b, None)
        packed = logits(row, torch.cat([torch.arange(len(a)), torch.arange(len(b))]))[len(a) :]
        crossing = logits(row, None)[len(a) :]
    except Exception as e:  # boundary: any model code may refuse position ids or a packed row
        return f"packing off: the model cannot take a packed row ({type(e).__name__}: {str(e)[:120]})"
    finally:
        model.train(was_training)
    err = float((packed - alone).abs().max())
    cross = float((crossing - alone).abs().max())
    scale = float(alone.abs().max()) + 1.0
    if err <= max(PROBE_RELATIVE * cross, PROBE_FLOOR * scale):
        return ""
    return (
        f"packing off: {type(model).__name__} ({attention_name(model)}) lets packed examples see each other "
        f"(a packed row's logits differ from the example's alone by {err:.2g}); padded batches instead"
    )


def attention_name(model: torch.nn.Module) -> str:
    config = getattr(model, "config", None)
    return str(getattr(config, "_attn_implementation", None) or "attention unknown")
