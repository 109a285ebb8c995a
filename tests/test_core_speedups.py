"""The engine's speed-ups: each on by default where it is exact, off with a reason where it is not, and the
chunked loss equal to the plain one in values and gradients (full fine-tune, tied head, LoRA)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, OPTConfig, OPTForCausalLM

from core import compiling, speedups
from core.data import DataPosition, collate
from core.distributed import Lockstep, StepPlan
from core.encode import IGNORE, Example
from core.events import Event, WarningEvent
from core.lookahead import Lookahead, PreparedStep
from core.loss import Head, batch_loss_sum, split_head
from core.train import Trainer
from trainbox.config import TrainingConfig

CPU = torch.device("cpu")


def batch_examples(vocab: int) -> list[Example]:
    """Lengths 3 to 30, some with untrained prompts: both padding and packing have something to do."""
    out = []
    for k, n in enumerate((30, 3, 17, 9, 24, 5, 12, 8)):
        ids = [(7 * k + 13 * j + 1) % vocab for j in range(n)]
        labels = [IGNORE] * (n // 3) + ids[n // 3 :] if k % 2 else list(ids)
        out.append(Example(ids, labels))
    return out


def opt_model() -> torch.nn.Module:
    """A tiny OPT: learned positions counted from the attention mask, so packed position ids are ignored."""
    torch.manual_seed(0)
    config = OPTConfig(
        hidden_size=32, ffn_dim=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64, word_embed_proj_dim=32
    )
    return OPTForCausalLM(config)


def test_auto_packing_and_chunked_loss_are_on_where_exact(embedded: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(embedded, dtype=torch.float32)
    on = speedups.choose(model, TrainingConfig(), CPU, Lockstep())
    assert on.packed and isinstance(on.split, Head) and on.notes == []
    off = speedups.choose(model, TrainingConfig(packing=False, chunked_loss=False), CPU, Lockstep())
    assert not off.packed and off.split is None and off.notes == []


def test_auto_packing_is_off_with_a_reason_where_attention_crosses_examples() -> None:
    model = opt_model()
    chosen = speedups.choose(model, TrainingConfig(), CPU, Lockstep())
    assert not chosen.packed
    assert len(chosen.notes) == 1 and chosen.notes[0].startswith("packing off: OPTForCausalLM (")
    assert speedups.choose(model, TrainingConfig(packing=True), CPU, Lockstep()).packed  # asked for: no probe
    cfg = TrainingConfig(max_steps=1, batch_size=4, eval_every=0, checkpoint_every=0)
    trainer = Trainer(model, cfg, batch_examples(64), [], pad_id=1, device=CPU)
    events: list[Event] = []
    assert trainer.run(events.append, lambda: False, lambda: Path()) == "completed"
    warned = [e for e in events if isinstance(e, WarningEvent) and e.kind == "speedup_off"]
    assert [w.message for w in warned] == chosen.notes


def gradients_of(model: torch.nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("lora", ["none", "attention", "head"])
@pytest.mark.parametrize("packed", [False, True])
def test_chunked_loss_equals_the_plain_loss_and_gradients(embedded: Path, lora: str, packed: bool) -> None:
    """Chunks of 7 trained positions (20 chunks) against the full logits, on the embedded model, whose head
    is tied to its input embeddings (the fused loss: gradients made in forward); with LoRA through peft on
    the attention (the same), and on the head too (not a plain linear layer: recomputed in backward)."""
    torch.manual_seed(3)
    model: Any = AutoModelForCausalLM.from_pretrained(embedded, dtype=torch.float32)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied
    if lora != "none":
        from peft import LoraConfig, get_peft_model

        targets = ["q_proj", "v_proj"] + (["lm_head"] if lora == "head" else [])
        config = LoraConfig(r=4, target_modules=targets, lora_dropout=0.0, ensure_weight_tying=lora == "head")
        model = get_peft_model(model, config)
        for name, p in model.named_parameters():
            if "lora_B" in name:  # zero at init: give A a gradient to compare
                torch.nn.init.normal_(p, std=0.02)
    split = split_head(model)
    assert isinstance(split, Head)
    batch = collate(batch_examples(1024), pad_id=0, packed=packed)
    plain = batch_loss_sum(model, batch, CPU)
    plain_grads = gradients_of(model, plain)
    chunked = batch_loss_sum(model, batch, CPU, Head(split.body, split.head, 7))
    chunked_grads = gradients_of(model, chunked)
    assert float(chunked.detach()) == pytest.approx(float(plain.detach()), rel=1e-6)
    assert chunked_grads.keys() == plain_grads.keys() and plain_grads
    assert any("lora_A" in n for n in plain_grads) == (lora != "none")
    assert (type(split.head) is torch.nn.Linear) == (lora != "head")
    for name, g in plain_grads.items():
        scale = float(g.abs().max())  # summation order differs: float noise relative to the tensor
        assert torch.allclose(chunked_grads[name], g, rtol=1e-4, atol=1e-6 * scale), name


def test_chunked_loss_is_off_where_the_head_is_not_a_plain_projection(embedded: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(embedded, dtype=torch.float32)
    model.config.final_logit_softcapping = 30.0  # as Gemma 2 does: not what the split computes
    chosen = speedups.choose(model, TrainingConfig(), CPU, Lockstep())
    assert chosen.split is None and chosen.packed
    assert chosen.notes == [
        "chunked loss off: LlamaForCausalLM transforms its logits after the head (final_logit_softcapping)"
    ]


def test_a_prepared_step_is_used_only_where_and_as_it_was_prepared() -> None:
    """The lookahead hands over the next step's batches only for the data position and micro-batch they were
    built for; after an out-of-memory back-off or a rollback the step is built afresh."""
    built: list[tuple[DataPosition, int]] = []

    def build(pos: DataPosition, micro: int) -> PreparedStep:
        built.append((pos, micro))
        return PreparedStep(StepPlan([], 0, 0, pos), [])

    ahead = Lookahead(build)
    ahead.prepare(DataPosition(0, 2), 4)
    assert ahead.take(DataPosition(0, 2), 4).plan.end == DataPosition(0, 2) and len(built) == 1
    assert ahead.take(DataPosition(0, 2), 4) is not None and len(built) == 2  # used once
    ahead.prepare(DataPosition(0, 4), 4)
    ahead.take(DataPosition(0, 4), 2)  # backed off to micro-batch 2
    ahead.prepare(DataPosition(0, 6), 4)
    ahead.take(DataPosition(0, 0), 4)  # rolled back
    assert built[2:] == [
        (DataPosition(0, 4), 4),
        (DataPosition(0, 4), 2),
        (DataPosition(0, 6), 4),
        (DataPosition(0, 0), 4),
    ]


def test_compile_auto_is_on_for_a_gpu_and_on_the_cpu_only_for_long_jobs() -> None:
    small = compiling.estimated_cpu_seconds(params=700_000, tokens=30_000, threads=1)  # an epoch of 600 texts
    assert small < 5
    assert compiling.decide("auto", "cpu", False, small)[0] is False
    assert "compile off: training is estimated at" in compiling.decide("auto", "cpu", False, small)[1]
    long = compiling.estimated_cpu_seconds(params=135_000_000, tokens=1_000_000, threads=2)
    assert long > 10 * compiling.CPU_COMPILE_SECONDS
    assert compiling.decide("auto", "cpu", False, long) == (True, "")
    assert compiling.decide("auto", "cuda", False, small) == (True, "")
    assert compiling.decide("auto", "cuda", True, long)[0] is False  # not with FSDP
    assert compiling.decide(True, "cpu", True, small) == (True, "")  # asked for
    assert compiling.decide(False, "cuda", False, long) == (False, "")
