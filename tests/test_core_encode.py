"""Loss masking: what each record shape trains, checked by decoding the trained tokens."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from core.embedded import ensure_embedded_model
from core.encode import (
    IGNORE,
    Example,
    assistant_spans,
    encode_all,
    encode_messages,
    encode_prompt_completion,
    encode_text,
    prepare_tokenizer,
)
from core.errors import DataError
from trainbox.records import Record


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_embedded_model(tmp_path_factory.getbasetemp() / "embedded-model")


@pytest.fixture
def tok(model_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(model_dir)


def trained_runs(tok: Any, ex: Example) -> list[str]:
    """The decoded text of each contiguous run of trained labels."""
    runs: list[list[int]] = []
    prev = False
    for t in ex.labels:
        on = t != IGNORE
        if on and not prev:
            runs.append([])
        if on:
            runs[-1].append(t)
        prev = on
    return [tok.decode(r, skip_special_tokens=False) for r in runs]


def test_text_trains_every_token_and_ends_with_eos(tok: Any) -> None:
    ex = encode_text(tok, "The cat sat on the mat.")
    assert ex.labels == ex.input_ids
    assert ex.input_ids[-1] == tok.eos_token_id
    assert tok.decode(ex.input_ids) == "The cat sat on the mat.<|endoftext|>"


def test_prompt_is_masked_completion_and_eos_trained(tok: Any) -> None:
    ex = encode_prompt_completion(tok, "Question: what is two plus three?\nAnswer:", " Five.")
    assert trained_runs(tok, ex) == [" Five.<|endoftext|>"]
    n_prompt = len(tok("Question: what is two plus three?\nAnswer:")["input_ids"])
    assert ex.labels[:n_prompt] == [IGNORE] * n_prompt
    assert tok.decode(ex.input_ids) == "Question: what is two plus three?\nAnswer: Five.<|endoftext|>"


CHAT = (
    ("system", "You are terse."),
    ("user", "Hi there"),
    ("assistant", "Hello!"),
    ("user", "What is 2+3?"),
    ("assistant", "It is 5."),
)


def test_chat_trains_exactly_the_assistant_turns(tok: Any) -> None:
    ex = encode_messages(tok, CHAT)
    assert trained_runs(tok, ex) == ["Hello!<|im_end|>", "It is 5.<|im_end|>"]
    # nothing of the system or user turns, nor the role headers, is trained
    full = tok.decode(ex.input_ids, skip_special_tokens=False)
    assert full.startswith("<|im_start|>system\nYou are terse.<|im_end|>\n")
    untrained = tok.decode([i for i, t in zip(ex.input_ids, ex.labels, strict=True) if t == IGNORE])
    assert "Hi there" in untrained and "You are terse." in untrained and "assistant" in untrained
    assert "Hello!" not in untrained and "It is 5." not in untrained


def test_assistant_spans_are_character_exact(tok: Any) -> None:
    full, spans = assistant_spans(tok, CHAT)
    assert [full[a:b] for a, b in spans] == ["Hello!<|im_end|>", "It is 5.<|im_end|>"]


def test_tokenizer_without_template_or_pad_gets_defaults(tok: Any) -> None:
    tok.chat_template = None
    tok.pad_token = None
    changes = prepare_tokenizer(tok)
    assert len(changes) == 2
    assert tok.pad_token_id == tok.eos_token_id
    ex = encode_messages(tok, (("user", "Hi"), ("assistant", "Hello there.")))
    assert trained_runs(tok, ex) == ["Hello there.<|endoftext|>"]


def test_template_that_is_not_prefix_stable_is_refused(tok: Any) -> None:
    tok.chat_template = "{% for m in messages|reverse %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(DataError, match="turn by turn"):
        encode_messages(tok, CHAT)


def test_truncation_drops_examples_with_nothing_left_to_train(tok: Any) -> None:
    long_prompt = "word " * 200
    records = [
        Record(kind="prompt_completion", prompt=long_prompt, completion=" done"),
        Record(kind="text", text="short text " * 100),
        Record(kind="prompt_completion", prompt="Hi", completion=" there"),
    ]
    out = encode_all(tok, records, max_length=32)
    assert out.dropped == 1
    assert len(out.examples) == 2
    assert all(len(e.input_ids) <= 32 for e in out.examples)
    assert out.examples[0].labels == out.examples[0].input_ids  # truncated text: still all trained


def test_real_chat_template_masks_exactly_the_assistant_turns(smollm2: Path) -> None:
    """SmolLM2-135M-Instruct's own template (it inserts a default system turn when none is given)."""
    real = AutoTokenizer.from_pretrained(smollm2)
    prepare_tokenizer(real)
    turns = (
        ("user", "Name a colour."),
        ("assistant", "Blue."),
        ("user", "And a fruit? Answer in a sentence."),
        ("assistant", "An apple is a fruit."),
    )
    for chat in (turns, (("system", "Be brief."), *turns)):
        ex = encode_messages(real, chat)
        assert trained_runs(real, ex) == ["Blue.<|im_end|>", "An apple is a fruit.<|im_end|>"]
        # every token outside those runs is masked: the template's text around them is all context
        trained = [i for i, t in zip(ex.input_ids, ex.labels, strict=True) if t != IGNORE]
        assert len(trained) == len(real("Blue.<|im_end|>An apple is a fruit.<|im_end|>")["input_ids"])
        untrained = real.decode([i for i, t in zip(ex.input_ids, ex.labels, strict=True) if t == IGNORE])
        assert "Name a colour." in untrained and "<|im_start|>assistant\n" in untrained
        assert "Blue." not in untrained and "apple" not in untrained
        assert real.decode(ex.input_ids) == real.apply_chat_template(
            [{"role": r, "content": c} for r, c in chat], tokenize=False
        )
