"""Memory savers: gradient checkpointing changes memory, not numbers; preflight counts it; AdamW is fused."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from core import lora
from core.embedded import ensure_embedded_model
from core.encode import Example, encode_all
from core.events import StepEvent
from core.loading import enable_gradient_checkpointing
from core.loss import chunk_tokens
from core.memory import estimate_memory, hybrid_copies, model_shape, pick_micro_batch
from core.preflight import check_memory, check_settings
from core.schedule import make_optimizer
from core.train import Trainer
from tests.test_core_guards import SHAPE
from trainbox.config import TrainingConfig
from trainbox.records import Record

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Example]]:
    torch.set_flush_denormal(True)
    model_dir = ensure_embedded_model(tmp_path_factory.mktemp("memory") / "embedded-model")
    tok = AutoTokenizer.from_pretrained(model_dir)
    recs = [Record(kind="text", text=f"The garden was {i} steps from the station number {i * 7}.") for i in range(16)]
    return model_dir, encode_all(tok, recs, max_length=32).examples


def run_losses(model_dir: Path, data: list[Example], checkpointing: bool, **over: Any) -> tuple[list[float], Any]:
    torch.manual_seed(0)
    settings = {"max_steps": 4, "batch_size": 4, "learning_rate": 3e-3, "eval_every": 0, "checkpoint_every": 0}
    cfg = TrainingConfig(**settings, gradient_checkpointing=checkpointing, **over)
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if cfg.lora:
        model = lora.wrap(model, cfg, model_dir, lora.resolve_targets(cfg, model))
    if checkpointing:
        enable_gradient_checkpointing(model)
    t = Trainer(model, cfg, data, [], pad_id=0, device=CPU)
    events: list[Any] = []
    assert t.run(events.append, lambda: False, lambda: Path("/nonexistent")) == "completed"
    return [e.loss for e in events if isinstance(e, StepEvent)], model


@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
def test_gradient_checkpointing_gives_the_same_losses(tiny: tuple[Path, list[Example]], use_lora: bool) -> None:
    model_dir, data = tiny
    over = {"lora": True, "lora_dropout": 0.0} if use_lora else {}
    plain, _ = run_losses(model_dir, data, False, **over)
    saved, model = run_losses(model_dir, data, True, **over)
    base = model.get_base_model() if use_lora else model
    assert base.is_gradient_checkpointing
    assert len(plain) == 4
    assert saved == pytest.approx(plain, abs=1e-5)
    assert plain[-1] < plain[0]  # it trained: the LoRA adapters got gradients through the checkpointed layers


def test_preflight_activation_estimate_shrinks_with_checkpointing() -> None:
    full = estimate_memory(SHAPE, 8, 1024, bf16=True, cuda=True)
    saved = estimate_memory(SHAPE, 8, 1024, bf16=True, cuda=True, checkpointing=True)
    assert saved.activations < full.activations / 4
    assert (saved.weights, saved.grads, saved.optimizer) == (full.weights, full.grads, full.optimizer)
    # so a micro-batch that does not fit without it fits with it
    room = estimate_memory(SHAPE, 8, 1024, True, True, checkpointing=True).total
    assert pick_micro_batch(SHAPE, 8, 1024, True, True, int(room / 0.9) + 1)[0] != 8
    assert pick_micro_batch(SHAPE, 8, 1024, True, True, int(room / 0.9) + 1, checkpointing=True)[0] == 8


def test_preflight_counts_lora_as_trained_and_the_base_as_stored(tiny: tuple[Path, list[Example]]) -> None:
    """Under LoRA the frozen base costs its stored bytes only; grads and AdamW state follow the adapters."""
    model_dir, _ = tiny
    full = model_shape(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32))
    half = model_shape(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16))
    cfg = TrainingConfig(lora=True, lora_r=4, lora_targets="all-linear")
    base: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    wrapped = lora.wrap(base, cfg, model_dir, lora.resolve_targets(cfg, base))
    adapted = model_shape(wrapped)
    assert (full.weight_bytes, half.weight_bytes) == (4 * full.params, 2 * full.params)
    assert full.trainable == full.params and (full.adapted, full.lora_r) == (0, 0)
    n_lora = sum(p.numel() for n, p in wrapped.named_parameters() if "lora_" in n)
    assert adapted.trainable == n_lora and adapted.lora_r == 4
    assert adapted.adapted == 7 * adapted.layers  # q k v o gate up down in every block
    a = estimate_memory(adapted, 8, 64, bf16=False, cuda=False)
    f = estimate_memory(full, 8, 64, bf16=False, cuda=False)
    assert a.weights == adapted.weight_bytes and a.optimizer == 8 * n_lora and a.grads == 4 * n_lora
    assert f.activations < a.activations < f.activations * 1.5  # backward runs through every frozen layer
    # a 4-bit base (an eighth of the fp32 bytes) shrinks the estimate by the difference
    qlora = estimate_memory(replace(adapted, weight_bytes=adapted.weight_bytes // 8), 8, 64, True, True)
    assert qlora.total < estimate_memory(adapted, 8, 64, True, True).total


def test_adamw_is_fused_or_foreach() -> None:
    model = torch.nn.Linear(4, 4)
    opt = make_optimizer(model, TrainingConfig(), CPU)
    d = opt.defaults
    assert d.get("fused") or d.get("foreach")


def test_preflight_refuses_hybrid_with_several_processes() -> None:
    cfg = TrainingConfig(engine="hybrid", nproc=2)
    problems = check_settings(cfg, SHAPE, cuda=False, bf16_supported=False)
    assert [p.code for p in problems if p.fatal] == ["nproc_hybrid"]
    assert "nproc" in problems[0].fix


def test_preflight_counts_the_hybrid_engines_copies() -> None:
    """The hybrid engine holds a good point to roll back to (weights + AdamW moments): a full fine-tune that fits
    plain can need a smaller micro-batch with it, or not fit at all (and the fix then names the engine)."""
    plain_cfg = TrainingConfig()
    hybrid_cfg = TrainingConfig(engine="hybrid")
    copies = hybrid_copies(hybrid_cfg)
    assert hybrid_copies(plain_cfg) == 0 and copies == 3
    plain = estimate_memory(SHAPE, 8, 1024, True, True)
    hybrid = estimate_memory(SHAPE, 8, 1024, True, True, engine_copies=copies)
    assert hybrid.engine == SHAPE.trainable * 4 * copies
    assert hybrid.total - plain.total == hybrid.engine and plain.engine == 0
    room = int(plain.total / 0.9) + 1
    assert pick_micro_batch(SHAPE, 8, 1024, True, True, room)[0] == 8
    assert pick_micro_batch(SHAPE, 8, 1024, True, True, room, engine_copies=copies)[0] != 8
    # memory where micro-batch 1 fits plain but not hybrid
    one_plain = estimate_memory(SHAPE, 1, 1024, True, True).total
    one_hybrid = estimate_memory(SHAPE, 1, 1024, True, True, engine_copies=copies).total
    between = int((one_plain + one_hybrid) / 2 / 0.9)
    _, problems = check_memory(SHAPE, hybrid_cfg, True, True, between, "GPU 0")
    assert problems and problems[0].fatal and "engine = 'plain'" in problems[0].fix
    _, plain_problems = check_memory(SHAPE, plain_cfg, True, True, between, "GPU 0")
    assert not any(p.fatal for p in plain_problems)


def test_preflight_counts_one_chunk_of_logits_under_the_chunked_loss() -> None:
    """With the chunked loss the logits term is one chunk's (plus what the fused loss keeps: the picked hidden
    states, their gradient and the head's gradient), whatever the micro-batch; the rest is unchanged."""
    chunk = chunk_tokens(SHAPE.vocab)
    plain = estimate_memory(SHAPE, 8, 1024, True, True)
    chunked = estimate_memory(SHAPE, 8, 1024, True, True, loss_chunk=chunk)
    kept = 2 * 8 * 1024 * SHAPE.hidden * 2 + SHAPE.vocab * SHAPE.hidden * 4  # hidden states and grads, head grad
    saved = (8 * 1024 - chunk) * SHAPE.vocab * 12 - kept
    assert plain.activations - chunked.activations == saved > 0
    assert (chunked.weights, chunked.grads, chunked.optimizer) == (plain.weights, plain.grads, plain.optimizer)
    one = estimate_memory(SHAPE, 1, 1024, True, True, loss_chunk=chunk)
    assert pick_micro_batch(SHAPE, 8, 1024, True, True, int(chunked.total / 0.9) + 1)[0] != 8
    assert pick_micro_batch(SHAPE, 8, 1024, True, True, int(chunked.total / 0.9) + 1, loss_chunk=chunk)[0] == 8
    assert one.total < chunked.total
