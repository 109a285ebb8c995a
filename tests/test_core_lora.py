# ruff: noqa: F811 (pytest fixtures imported from the other core test modules)
"""LoRA: targets, preflight, the worker training only an adapter, exact resume, merging, the DB column."""

from __future__ import annotations

import json
import signal
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from core import checkpoint, lora
from core.preflight import check_lora_setup, check_lora_targets
from management.db import ModelDB
from tests.test_core_worker import (  # noqa: F401 (fixtures)
    data_file,
    eval_steps,
    finish,
    make_job,
    model_dir,
    run_in_process,
    start_worker,
    train_steps,
    wait_for_step,
)
from trainbox.config import TrainingConfig, auto_learning_rate
from trainbox.jobspec import WorkerResult
from trainbox.states import EXIT_COMPLETED, EXIT_FAILED, EXIT_INTERRUPTED, WorkerOutcome

LORA = {"lora": True, "lora_r": 4, "lora_alpha": 8.0, "lora_dropout": 0.1}


def tiny_llama() -> Any:
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    return LlamaForCausalLM(cfg)


def tiny_gpt2() -> Any:
    return GPT2LMHeadModel(
        GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0)
    )


def test_targets_auto_per_architecture_all_linear_and_lists() -> None:
    llama, gpt2 = tiny_llama(), tiny_gpt2()
    assert lora.resolve_targets(TrainingConfig(lora=True), llama) == ["q_proj", "v_proj"]
    assert lora.resolve_targets(TrainingConfig(lora=True), gpt2) == ["c_attn"]
    assert lora.resolve_targets(TrainingConfig(lora_targets="all-linear"), llama) == "all-linear"
    assert lora.resolve_targets(TrainingConfig(lora_targets=["o_proj"]), llama) == ["o_proj"]
    assert lora.linear_layer_names(llama) == [
        "down_proj",
        "gate_proj",
        "k_proj",
        "o_proj",
        "q_proj",
        "up_proj",
        "v_proj",
    ]
    assert lora.linear_layer_names(gpt2) == ["c_attn", "c_fc", "c_proj"]  # Conv1D counts; lm_head does not
    assert lora.missing_targets(llama, ["q_proj", "c_attn", "self_attn.v_proj"]) == ["c_attn"]
    wrapped = lora.wrap(gpt2, TrainingConfig(lora=True), Path("/base"), ["c_attn"])  # Conv1D: fan_in_fan_out
    assert wrapped.peft_config["default"].fan_in_fan_out
    assert {n.split(".")[-3] for n, p in wrapped.named_parameters() if p.requires_grad} == {"lora_A", "lora_B"}


def test_preflight_lora_checks_name_the_problem_and_the_fix() -> None:
    [p] = check_lora_setup(TrainingConfig(lora=True, lora_4bit=True), cuda=False, bitsandbytes=False)
    assert p.fatal and p.code == "lora_4bit" and "CUDA GPU" in p.message and "bitsandbytes" in p.message
    assert "pip install bitsandbytes" in p.fix and "lora_4bit = false" in p.fix
    [p] = check_lora_setup(TrainingConfig(lora=True, lora_4bit=True), cuda=True, bitsandbytes=False)
    assert "CUDA" not in p.message and "bitsandbytes" in p.message
    [p] = check_lora_setup(TrainingConfig(lora_4bit=True), cuda=True, bitsandbytes=True)
    assert p.fix == "set lora = true"
    assert check_lora_setup(TrainingConfig(lora=True, lora_4bit=True), cuda=True, bitsandbytes=True) == []
    [p] = check_lora_targets(["q_proj", "qkv"], ["qkv"], ["k_proj", "q_proj"])
    assert "qkv" in p.message and "k_proj, q_proj" in p.message and p.evidence["missing"] == ["qkv"]
    assert check_lora_targets("all-linear", [], ["q_proj"]) == []


def test_auto_learning_rate_for_lora() -> None:
    assert auto_learning_rate(8_192, lora_on_params=664_192) == 2e-3  # LoRA on the tiny model
    assert auto_learning_rate(460_000, lora_on_params=134_000_000) == 2e-4
    assert auto_learning_rate(134_000_000) == 2e-5


def test_worker_lora_preflight_failures(tmp_path: Path, data_file: Path, model_dir: Path) -> None:
    rc, r = run_in_process(make_job(tmp_path / "t", data_file, model_dir, **LORA, lora_targets=["q_proj", "c_attn"]))
    assert rc == EXIT_FAILED and r.failure_class == "preflight" and r.evidence["check"] == "lora_targets"
    assert "c_attn" in r.message and "q_proj, up_proj, v_proj" in r.message and r.fix
    rc, r = run_in_process(make_job(tmp_path / "q", data_file, model_dir, **LORA, lora_4bit=True))
    assert rc == EXIT_FAILED and r.failure_class == "preflight" and r.evidence["check"] == "lora_4bit"
    assert "CUDA GPU" in r.message and "bitsandbytes" in r.message


def test_worker_lora_nan_rollback_to_the_initial_adapter(
    tmp_path: Path, data_file: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRAINBOX_TEST_FAULT", "nan@1x1000")
    spec = make_job(tmp_path / "n", data_file, model_dir, **LORA, nan_max_skips=2, nan_max_rollbacks=1)
    rc, r = run_in_process(spec)
    assert rc == EXIT_FAILED and r.failure_class == "nan" and r.evidence["rollbacks"] == 1


@pytest.fixture(scope="session")
def straight_lora_run(tmp_path_factory: pytest.TempPathFactory, data_file: Path, model_dir: Path) -> Path:
    run_dir = tmp_path_factory.mktemp("straight-lora") / "run"
    make_job(run_dir, data_file, model_dir, **LORA)
    rc, out = finish(start_worker(run_dir))
    assert rc == EXIT_COMPLETED, out
    return run_dir


def test_worker_lora_trains_only_the_adapter_and_saves_it(straight_lora_run: Path, model_dir: Path) -> None:
    result = WorkerResult.load(straight_lora_run)
    assert result is not None and result.outcome == WorkerOutcome.COMPLETED and result.step == 24
    assert result.adapter and result.base_model == str(model_dir)
    assert result.val_loss is not None and result.first_val_loss is not None and result.val_loss < result.first_val_loss
    final = Path(result.final_model or "")
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {p.name for p in final.iterdir()}
    assert not (final / "model.safetensors").exists()
    config = json.loads((final / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(model_dir) and config["r"] == 4
    adapter = load_file(final / "adapter_model.safetensors")
    assert adapter and all(".lora_A." in k or ".lora_B." in k for k in adapter)
    assert any(float(v.abs().max()) > 0 for k, v in adapter.items() if "lora_B" in k)  # B starts at 0: it trained
    # checkpoints hold the adapter and an optimizer over the adapter's tensors only
    ckpt = checkpoint.latest_complete(straight_lora_run)
    assert ckpt is not None and (ckpt.path / "model" / "adapter_model.safetensors").exists()
    state = checkpoint.load_state(ckpt.path)
    n_opt = sum(v["exp_avg"].numel() for v in state["optimizer"]["state"].values())
    assert n_opt == sum(v.numel() for v in adapter.values())
    # the merged model differs from the base, and equals base + adapter through peft
    merged = lora.load_causal_lm(final)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    x = torch.tensor([[5, 6, 7, 8, 9]])
    assert not torch.allclose(merged(x).logits, base(x).logits)
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), final).eval()
    torch.testing.assert_close(merged(x).logits, peft_model(input_ids=x).logits, rtol=1e-4, atol=1e-4)


def test_worker_lora_sigterm_resume_is_exact(
    tmp_path: Path, data_file: Path, model_dir: Path, straight_lora_run: Path
) -> None:
    run_dir = tmp_path / "run"
    make_job(run_dir, data_file, model_dir, **LORA)
    proc = start_worker(run_dir, TRAINBOX_TEST_STEP_SLEEP="0.1")
    wait_for_step(proc, run_dir, 10)
    proc.send_signal(signal.SIGTERM)
    rc, out = finish(proc)
    assert rc == EXIT_INTERRUPTED, out
    stopped = WorkerResult.load(run_dir).step  # type: ignore[union-attr]
    assert 10 <= stopped < 24

    rc, out = finish(start_worker(run_dir))
    assert rc == EXIT_COMPLETED, out
    assert f"resuming at step {stopped}" in out
    assert train_steps(run_dir) == list(range(1, 25)) and eval_steps(run_dir) == [0, 8, 16, 24]
    a = load_file(straight_lora_run / "final" / "adapter_model.safetensors")
    b = load_file(run_dir / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bitwise, on the CPU


def test_adapter_chain_loads_merged(straight_lora_run: Path, tmp_path: Path) -> None:
    """An adapter whose base is an adapter version (a LoRA job started from a LoRA version)."""
    first = straight_lora_run / "final"
    base = lora.load_causal_lm(first)
    wrapped = lora.wrap(base, TrainingConfig(**LORA), first, ["o_proj"])
    with torch.no_grad():
        for n, p in wrapped.named_parameters():
            if "lora_B" in n:
                p.fill_(0.01)
    wrapped.save_pretrained(tmp_path / "second", save_embedding_layers=False)
    merged = lora.load_causal_lm(tmp_path / "second")
    x = torch.tensor([[3, 4, 5]])
    torch.testing.assert_close(merged(x).logits, wrapped.eval()(input_ids=x).logits, rtol=1e-4, atol=1e-4)


def test_old_db_gets_the_new_version_columns(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    con = sqlite3.connect(path)
    con.execute(
        "CREATE TABLE model_versions (id INTEGER PRIMARY KEY, path VARCHAR, parent_id INTEGER, job_id INTEGER, "
        "base_model VARCHAR, data_sha256 VARCHAR, train_loss FLOAT, val_loss FLOAT, steps INTEGER, created_at FLOAT)"
    )
    con.execute("INSERT INTO model_versions (id, path, steps) VALUES (1, '/m/v0001', 3)")
    con.commit()
    con.close()
    db = ModelDB(f"sqlite:///{path}")
    [v] = db.versions()
    assert (v.id, v.kind, v.adapter_of) == (1, "full", "")
    db.close()
    ModelDB(f"sqlite:///{path}").close()  # a second open finds nothing to add
