"""The JSONL job format: what one line may be, and a streaming validator that names every bad line.

Pure (no side effects beyond reading the file), shared by the daemon's admission and the worker's
data loading so both apply exactly the same rules.

A line is one JSON object of one of three shapes:
  {"text": str}
  {"prompt": str, "completion": str}
  {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...]}  (>= 1 assistant)
Blank lines are skipped. Other keys on a line are allowed and ignored (datasets often carry ids).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROLES = ("system", "user", "assistant", "tool")
MAX_ERRORS_LISTED = 50


@dataclass(frozen=True)
class Record:
    kind: str  # "text" | "prompt_completion" | "messages"
    text: str = ""
    prompt: str = ""
    completion: str = ""
    messages: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class LineError:
    line: int
    field: str
    reason: str

    def __str__(self) -> str:
        where = f"line {self.line}" + (f", field '{self.field}'" if self.field else "")
        return f"{where}: {self.reason}"


class RecordError(ValueError):
    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}" if field else reason)
        self.field = field
        self.reason = reason


def _need_str(obj: dict[str, Any], key: str, where: str | None = None) -> str:
    name = where or key
    if key not in obj:
        raise RecordError(name, "missing (expected a string)")
    value = obj[key]
    if not isinstance(value, str):
        raise RecordError(name, f"expected a string, got {type(value).__name__}")
    return value


def parse_record(obj: Any) -> Record:
    """One parsed JSON value to a Record, or RecordError naming the field and what was expected."""
    if not isinstance(obj, dict):
        raise RecordError("", f"expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise RecordError("messages", "expected a non-empty list of {role, content} objects")
        out = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict):
                raise RecordError(f"messages[{i}]", "expected an object with 'role' and 'content'")
            role = _need_str(m, "role", f"messages[{i}].role")
            if role not in ROLES:
                raise RecordError(f"messages[{i}].role", f"expected one of {', '.join(ROLES)}, got {role!r}")
            out.append((role, _need_str(m, "content", f"messages[{i}].content")))
        if not any(r == "assistant" for r, _ in out):
            raise RecordError("messages", "no assistant message: nothing to train on")
        return Record(kind="messages", messages=tuple(out))
    if "prompt" in obj or "completion" in obj:
        prompt = _need_str(obj, "prompt")
        completion = _need_str(obj, "completion")
        if not completion.strip():
            raise RecordError("completion", "empty: nothing to train on")
        return Record(kind="prompt_completion", prompt=prompt, completion=completion)
    if "text" in obj:
        text = _need_str(obj, "text")
        if not text.strip():
            raise RecordError("text", "empty: nothing to train on")
        return Record(kind="text", text=text)
    raise RecordError("", "expected one of: 'text'; 'prompt' and 'completion'; 'messages'")


def iter_lines(path: Path) -> Iterator[tuple[int, Record | LineError]]:
    """(line number, Record or LineError) for every non-blank line, streaming."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield n, LineError(n, "", f"not UTF-8 ({e.reason} at byte {e.start})")
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                yield n, LineError(n, "", f"invalid JSON: {e.msg} at column {e.colno}")
                continue
            try:
                yield n, parse_record(obj)
            except RecordError as e:
                yield n, LineError(n, e.field, e.reason)


@dataclass
class ValidationReport:
    path: str
    n_records: int = 0
    n_errors: int = 0
    errors: list[LineError] = field(default_factory=list)
    formats: Counter[str] = field(default_factory=Counter)

    @property
    def ok(self) -> bool:
        return self.n_errors == 0 and self.n_records > 0

    @property
    def data_format(self) -> str:
        return "+".join(sorted(self.formats)) or "none"

    def summary(self) -> str:
        if self.ok:
            return f"{self.n_records} records ({self.data_format})"
        if self.n_errors == 0:
            return "no records: the file is empty"
        listed = "; ".join(str(e) for e in self.errors[:10])
        tail = f" (and {self.n_errors - 10} more)" if self.n_errors > 10 else ""
        return f"{self.n_errors} invalid line(s): {listed}{tail}"

    def to_json(self) -> dict[str, Any]:
        return {
            "file": self.path,
            "records": self.n_records,
            "invalid_lines": self.n_errors,
            "errors": [{"line": e.line, "field": e.field, "reason": e.reason} for e in self.errors],
            "errors_listed": len(self.errors),
        }


def validate_file(path: Path, max_listed: int = MAX_ERRORS_LISTED) -> ValidationReport:
    """Read the whole file once; every invalid line counts, the first ``max_listed`` are named."""
    report = ValidationReport(path=Path(path).name)
    for _n, item in iter_lines(path):
        if isinstance(item, LineError):
            report.n_errors += 1
            if len(report.errors) < max_listed:
                report.errors.append(item)
        else:
            report.n_records += 1
            report.formats[item.kind] += 1
    return report


def load_records(path: Path) -> list[Record]:
    """All records of a file that must be valid (the worker's streaming re-check): first error raises."""
    out = []
    for _n, item in iter_lines(path):
        if isinstance(item, LineError):
            raise ValueError(f"{Path(path).name}: {item}")
        out.append(item)
    return out
