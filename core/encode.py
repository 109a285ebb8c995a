"""Records to token ids and labels, with the loss masked to what the model should learn to write.

- text: every token is trained, and an end-of-text token is appended so the model learns to stop.
- prompt/completion: the prompt is context only (labels -100); completion + end-of-text are trained.
- messages: rendered with the tokenizer's own chat template; only the assistant turns' content and
  their end-of-turn token are trained. Assistant spans are found generically, for any template: the
  span of turn i is what the rendering of ``messages[:i+1]`` adds to the rendering of ``messages[:i]``
  with the generation prompt. Characters map to tokens through the fast tokenizer's offsets.

Labels are aligned with input ids (Hugging Face convention): the loss shifts them by one, so the
label at position 0 is never trained. Examples longer than ``max_length`` are truncated from the end.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from core.errors import DataError
from trainbox.records import Record

IGNORE = -100

# Used only for a tokenizer that has no chat template of its own (a base model). ChatML layout, but a
# turn ends with the tokenizer's end-of-text token, so generation stops where training taught it to.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]

    @property
    def trained_tokens(self) -> int:
        """Positions the shifted loss actually trains (position 0 has nothing before it)."""
        return sum(1 for t in self.labels[1:] if t != IGNORE)


@dataclass
class Encoded:
    examples: list[Example]
    dropped: int  # examples with no trained token left after truncation
    truncated: int = 0  # kept or dropped, examples longer than max_length (for the job report)
    longest: int = 0  # tokens of the longest example before truncation
    kept: list[int] = field(default_factory=list)  # each kept example's position in the records given


def prepare_tokenizer(tokenizer: Any) -> list[str]:
    """Give the tokenizer what training needs (pad token, chat template); returns what was changed."""
    changes = []
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no end-of-sequence token; set eos_token in its config")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
        changes.append("pad_token = eos_token")
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
        changes.append("chat_template = default ChatML ending turns with eos_token")
    return changes


def _with_eos(ids: list[int], eos: int) -> list[int]:
    return ids if ids and ids[-1] == eos else [*ids, eos]


def encode_text(tokenizer: Any, text: str) -> Example:
    ids = _with_eos(tokenizer(text, add_special_tokens=True)["input_ids"], tokenizer.eos_token_id)
    return Example(ids, list(ids))


def encode_prompt_completion(tokenizer: Any, prompt: str, completion: str) -> Example:
    """Prompt and completion are tokenized apart, as at inference, where the prompt comes alone."""
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    if prompt_ids and prompt_ids[-1] == tokenizer.eos_token_id:  # a tokenizer that appends eos itself
        prompt_ids = prompt_ids[:-1]
    completion_ids = _with_eos(tokenizer(completion, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id)
    return Example(prompt_ids + completion_ids, [IGNORE] * len(prompt_ids) + completion_ids)


def _render(tokenizer: Any, messages: Sequence[dict[str, str]], generation_prompt: bool) -> str:
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt)
    return str(text)


def assistant_spans(tokenizer: Any, messages: Sequence[tuple[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The full rendering and the character spans of the assistant turns (content + end of turn).

    Trailing whitespace after the end-of-turn marker (ChatML's newline) is not part of a span: it is
    layout, and the model stops generating at the marker anyway.
    """
    msgs = [{"role": role, "content": content} for role, content in messages]
    full = _render(tokenizer, msgs, generation_prompt=False)
    spans = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, msgs[:i], generation_prompt=True)
        through = _render(tokenizer, msgs[: i + 1], generation_prompt=False)
        if not (full.startswith(through) and through.startswith(before)):
            raise DataError(
                "the chat template does not render conversations turn by turn (a shorter conversation "
                "is not a prefix of a longer one), so assistant turns cannot be located; "
                "use prompt/completion records or a model with a prefix-stable template"
            )
        end = len(through.rstrip()) if through[len(before) :].strip() else len(through)
        spans.append((len(before), end))
    return full, spans


def encode_messages(tokenizer: Any, messages: Sequence[tuple[str, str]]) -> Example:
    full, spans = assistant_spans(tokenizer, messages)
    # the template writes any bos itself; letting the tokenizer add one would double it
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = enc["input_ids"]
    labels = [IGNORE] * len(ids)
    for t, (start, _end) in enumerate(enc["offset_mapping"]):
        if any(a <= start < b for a, b in spans):
            labels[t] = ids[t]
    return Example(ids, labels)


def encode_record(tokenizer: Any, record: Record) -> Example:
    if record.kind == "text":
        return encode_text(tokenizer, record.text)
    if record.kind == "prompt_completion":
        return encode_prompt_completion(tokenizer, record.prompt, record.completion)
    if record.kind == "messages":
        return encode_messages(tokenizer, record.messages)
    raise DataError(f"unknown record kind {record.kind!r}")


def truncate(example: Example, max_length: int) -> Example:
    return Example(example.input_ids[:max_length], example.labels[:max_length])


def encode_all(
    tokenizer: Any, records: Sequence[Record], max_length: int, tick: Callable[[], None] | None = None
) -> Encoded:
    """Encode and truncate every record; drop (and count) those left with nothing to train. ``tick``
    is called after each record: millions of them take minutes, and the worker must keep its
    heartbeat meanwhile (core.heartbeat.Progress)."""
    out = Encoded([], 0)
    for i, record in enumerate(records):
        full = encode_record(tokenizer, record)
        out.longest = max(out.longest, len(full.input_ids))
        out.truncated += len(full.input_ids) > max_length
        ex = truncate(full, max_length)
        if ex.trained_tokens == 0:
            out.dropped += 1
        else:
            out.examples.append(ex)
            out.kept.append(i)
        if tick is not None:
            tick()
    return out
