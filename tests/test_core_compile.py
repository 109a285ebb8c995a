"""``training.compile = true`` where it is least obvious: LoRA with gradient checkpointing, packed rows and the
chunked loss, on the CPU, interrupted and resumed. One compile (about a minute of CPU on these machines, cold
cache); the resumed run's trainer reuses it in-process, as a resumed worker reuses the home's kernel cache."""

from __future__ import annotations

import copy
import random
from pathlib import Path
from typing import Any

import torch
import torch._dynamo.utils
from transformers import AutoModelForCausalLM

from core import lora
from core.encode import Example
from core.events import Event, StepEvent
from core.loading import enable_gradient_checkpointing
from core.train import Trainer
from trainbox.config import TrainingConfig

CPU = torch.device("cpu")


def mixed_lengths(vocab: int) -> list[Example]:
    rng = random.Random(3)
    out = []
    for _ in range(24):
        ids = [rng.randrange(1, vocab) for _ in range(rng.choice((5, 9, 14, 23, 40)))]
        out.append(Example(ids, list(ids)))
    return out


def make(embedded: Path, examples: list[Example]) -> Trainer:
    cfg = TrainingConfig(
        max_steps=6,
        batch_size=4,
        learning_rate=3e-3,
        eval_every=0,
        checkpoint_every=0,
        compile=True,
        lora=True,
        lora_r=4,
        gradient_checkpointing=True,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(embedded, dtype=torch.float32)
    model = lora.wrap(model, cfg, embedded, lora.resolve_targets(cfg, model))
    enable_gradient_checkpointing(model)
    return Trainer(model, cfg, examples, [], pad_id=0, device=CPU)


def losses(events: list[Event]) -> list[float]:
    return [e.loss for e in events if isinstance(e, StepEvent)]


def test_compiled_lora_with_checkpointing_trains_and_resumes_bitwise(embedded: Path) -> None:
    examples = mixed_lengths(1024)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    straight, events = make(embedded, examples), []
    assert straight.compiled and straight.speedups.packed and straight.speedups.split is not None
    assert straight.run(events.append, lambda: False, lambda: Path()) == "completed"
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs  # compiled, not eager without a word
    assert len(losses(events)) == 6 and all(x == x for x in losses(events))

    first, saved = make(embedded, examples), {}
    first_events: list[Event] = []

    def save() -> Path:
        saved["state"] = copy.deepcopy(first.state_dict())
        saved["weights"] = {k: v.detach().clone() for k, v in first.model.state_dict().items()}
        return Path()

    assert first.run(first_events.append, lambda: first.state.step >= 3, save) == "interrupted"
    resumed, rest = make(embedded, examples), []
    resumed.model.load_state_dict(saved["weights"])
    torch.manual_seed(999)  # the checkpoint restores the RNG
    resumed.load_state_dict(saved["state"])
    assert resumed.run(rest.append, lambda: False, lambda: Path()) == "completed"
    assert losses(first_events + rest) == losses(events)
    a: dict[str, Any] = straight.model.state_dict()
    b: dict[str, Any] = resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
