"""The embedded tiny model: built once, deterministic, a normal Hugging Face folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from core import embedded
from core.embedded import ensure_embedded_model


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_embedded_model(tmp_path_factory.getbasetemp() / "embedded-model")


def test_reloads_with_auto_classes(model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert 500_000 <= model.num_parameters() <= 1_500_000
    assert model.config.max_position_embeddings >= 1024
    assert model.config.num_hidden_layers == 2 and model.config.num_attention_heads == 4
    assert 512 <= len(tok) <= 1024 == model.config.vocab_size
    assert None not in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    text = "Any text, even ünïcode and 数字, encodes: byte-level BPE has no unknown tokens."
    assert tok.decode(tok(text)["input_ids"]) == text


def test_chat_template_is_chatml_with_generation_prompt(model_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(model_dir)
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    assert tok.apply_chat_template(msgs, tokenize=False) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n"
    )
    prompt = tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert tok("x<|im_end|>", add_special_tokens=False)["input_ids"][-1] == im_end  # one special token


def test_build_is_deterministic_and_happens_once(model_dir: Path, tmp_path: Path) -> None:
    other = ensure_embedded_model(tmp_path / "again")
    assert (other / "model.safetensors").read_bytes() == (model_dir / "model.safetensors").read_bytes()
    assert (other / "tokenizer.json").read_text() == (model_dir / "tokenizer.json").read_text()
    mtime = (other / "model.safetensors").stat().st_mtime_ns
    assert ensure_embedded_model(other) == other
    assert (other / "model.safetensors").stat().st_mtime_ns == mtime


def test_losing_the_race_keeps_the_winners_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "tiny"
    real_build = embedded.build_model

    def build_while_another_process_finishes(tok: Any) -> Any:
        target.mkdir()
        (target / "config.json").write_text("{}")  # the winner's folder appears meanwhile
        (target / "winner").write_text("")
        return real_build(tok)

    monkeypatch.setattr(embedded, "build_model", build_while_another_process_finishes)
    assert ensure_embedded_model(target) == target
    assert (target / "winner").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"]  # our temp copy is gone
