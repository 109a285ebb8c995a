"""The JSONL job format: each bad line is named with its field and what was expected."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainbox.records import RecordError, load_records, parse_record, validate_file


def test_three_formats_parse() -> None:
    assert parse_record({"text": "hello"}).kind == "text"
    r = parse_record({"prompt": "Q", "completion": "A", "id": 3})
    assert (r.kind, r.prompt, r.completion) == ("prompt_completion", "Q", "A")
    m = parse_record({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    assert m.messages == (("user", "hi"), ("assistant", "yo"))


@pytest.mark.parametrize(
    ("obj", "field", "fragment"),
    [
        ([1, 2], "", "expected a JSON object"),
        ({"txt": "x"}, "", "expected one of"),
        ({"text": 5}, "text", "expected a string, got int"),
        ({"text": "  "}, "text", "empty"),
        ({"prompt": "q"}, "completion", "missing"),
        ({"messages": []}, "messages", "non-empty list"),
        ({"messages": [{"role": "user"}]}, "messages[0].content", "missing"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "expected one of"),
        ({"messages": [{"role": "user", "content": "x"}]}, "messages", "no assistant message"),
    ],
)
def test_bad_records_name_field_and_expectation(obj: object, field: str, fragment: str) -> None:
    with pytest.raises(RecordError) as e:
        parse_record(obj)
    assert e.value.field == field
    assert fragment in e.value.reason


def test_validate_file_names_every_bad_line(tmp_path: Path) -> None:
    lines = [json.dumps({"text": f"line {i}"}) for i in range(1, 15)]
    lines[6] = '{"text": "broken'  # line 7: bad JSON
    lines[11] = json.dumps({"prompt": "only a prompt"})  # line 12: missing field
    f = tmp_path / "bad.jsonl"
    f.write_text("\n".join(lines) + "\n\n")
    report = validate_file(f)
    assert not report.ok
    assert report.n_records == 12 and report.n_errors == 2
    assert [(e.line, e.field) for e in report.errors] == [(7, ""), (12, "completion")]
    assert "invalid JSON" in report.errors[0].reason
    assert "line 7" in report.summary() and "line 12" in report.summary()
    with pytest.raises(ValueError, match="line 7"):
        load_records(f)


def test_empty_and_non_utf8_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    assert not validate_file(empty).ok and "empty" in validate_file(empty).summary()
    binary = tmp_path / "bin.jsonl"
    binary.write_bytes(b'{"text": "ok"}\n\xff\xfe\n')
    report = validate_file(binary)
    assert report.errors[0].line == 2 and "UTF-8" in report.errors[0].reason


def test_mixed_formats_report(tmp_path: Path) -> None:
    f = tmp_path / "mixed.jsonl"
    f.write_text(json.dumps({"text": "a"}) + "\n" + json.dumps({"prompt": "p", "completion": "c"}) + "\n")
    report = validate_file(f)
    assert report.ok and report.data_format == "prompt_completion+text"
