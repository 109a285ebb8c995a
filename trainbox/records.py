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

import hashlib
import json
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from trainbox.safefs import open_regular

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


class _Readable(Protocol):
    def readline(self, size: int = -1, /) -> bytes: ...


@dataclass(frozen=True)
class Limits:
    """What one line may hold. A file from a stranger can be built to exhaust a parser (a 50 MB
    line, 100,000 nested brackets, a 5,000-digit number); past these it is a named bad line."""

    max_line_bytes: int = 16 * 1024 * 1024
    max_depth: int = 64


DEFAULT_LIMITS = Limits()
BOM = b"\xef\xbb\xbf"


def _depth(line: str, limit: int) -> int:
    """Bracket nesting of a JSON text, strings skipped; only run on lines with many brackets."""
    depth = deepest = 0
    in_str = escaped = False
    for c in line:
        if in_str:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_str = False
        elif c == '"':
            in_str = True
        elif c in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > limit:
                    return deepest
        elif c in "]}":
            depth -= 1
    return deepest


def _unencodable(obj: Any, where: str = "") -> tuple[str, str] | None:
    """(field, reason) of the first string of a parsed line that is not valid Unicode text (a
    ``\\ud800`` escape decodes to a lone surrogate, which no tokenizer can encode)."""
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError as e:
            return where, f"unpaired surrogate \\u{ord(obj[e.start]):04x} at character {e.start}"
        return None
    if isinstance(obj, dict):
        items: Any = ((f"{where}.{k}" if where else str(k), v) for k, v in obj.items())
    elif isinstance(obj, list):
        items = ((f"{where}[{i}]", v) for i, v in enumerate(obj))
    else:
        return None
    for key, value in items:
        if (bad := _unencodable(value, key)) is not None:
            return bad
    return None


def parse_line(n: int, raw: bytes, limits: Limits = DEFAULT_LIMITS) -> Record | LineError | None:
    """One raw line (its newline included or not) to a Record, a LineError, or None when blank."""
    if n == 1 and raw.startswith(BOM):
        raw = raw[len(BOM) :]
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return LineError(n, "", f"not UTF-8 ({e.reason} at byte {e.start})")
    if not line.strip():
        return None
    if line.count("[") + line.count("{") > limits.max_depth and _depth(line, limits.max_depth) > limits.max_depth:
        return LineError(n, "", f"JSON nested deeper than {limits.max_depth} levels")
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        return LineError(n, "", f"invalid JSON: {e.msg} at column {e.colno}")
    except (ValueError, RecursionError) as e:  # an integer of thousands of digits, or nesting
        return LineError(n, "", f"invalid JSON: {str(e).split(';')[0][:120]}")
    if "\\u" in line and (bad := _unencodable(obj)) is not None:
        return LineError(n, bad[0], f"{bad[1]}: not encodable text (expected valid Unicode)")
    try:
        return parse_record(obj)
    except RecordError as e:
        return LineError(n, e.field, e.reason)


def iter_raw_lines(f: _Readable, limits: Limits = DEFAULT_LIMITS) -> Iterator[tuple[int, bytes, bool]]:
    """(line number, bytes, too long) for every line, reading at most ``max_line_bytes`` + 1 bytes
    of one line into memory; a longer line is skipped to its end and reported as too long."""
    n = 0
    while True:
        raw = f.readline(limits.max_line_bytes + 1)
        if not raw:
            return
        n += 1
        if len(raw) > limits.max_line_bytes and not raw.endswith(b"\n"):
            while (rest := f.readline(1 << 20)) and not rest.endswith(b"\n"):
                pass
            yield n, b"", True
            continue
        yield n, raw, False


def iter_lines(path: Path, limits: Limits = DEFAULT_LIMITS) -> Iterator[tuple[int, Record | LineError]]:
    """(line number, Record or LineError) for every non-blank line, streaming; the file is opened
    without following a symlink and must be a regular file."""
    with open_regular(path) as f:
        for n, raw, too_long in iter_raw_lines(f, limits):
            if too_long:
                yield n, LineError(n, "", f"line longer than {limits.max_line_bytes} bytes")
                continue
            item = parse_line(n, raw, limits)
            if item is not None:
                yield n, item


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

    def add(self, item: Record | LineError, max_listed: int = MAX_ERRORS_LISTED) -> None:
        if isinstance(item, LineError):
            self.n_errors += 1
            if len(self.errors) < max_listed:
                self.errors.append(item)
        else:
            self.n_records += 1
            self.formats[item.kind] += 1


def validate_file(path: Path, max_listed: int = MAX_ERRORS_LISTED, limits: Limits = DEFAULT_LIMITS) -> ValidationReport:
    """Read the whole file once; every invalid line counts, the first ``max_listed`` are named."""
    report = ValidationReport(path=Path(path).name)
    for _n, item in iter_lines(path, limits):
        report.add(item, max_listed)
    return report


class Validation:
    """A validation that runs in slices: the daemon feeds it a time budget per tick, so a file of
    millions of lines never stops the loop's heartbeat. The sha256 of the bytes comes from the same
    single read."""

    def __init__(self, path: Path, limits: Limits = DEFAULT_LIMITS) -> None:
        self.report = ValidationReport(path=Path(path).name)
        self.limits = limits
        self._file = open_regular(path)
        self._hash = hashlib.sha256()
        self._lines = iter_raw_lines(self._HashingReader(self._file, self._hash), limits)
        self.done = False

    class _HashingReader:
        def __init__(self, f: BinaryIO, h: Any) -> None:
            self.f, self.h = f, h

        def readline(self, size: int = -1) -> bytes:
            data = self.f.readline(size)
            self.h.update(data)
            return data

    def feed(self, budget_s: float, clock: Any = time.monotonic) -> bool:
        """Validate lines for about ``budget_s`` seconds; True once the whole file is read."""
        deadline = clock() + budget_s
        for count, (n, raw, too_long) in enumerate(self._lines, start=1):
            if too_long:
                self.report.add(LineError(n, "", f"line longer than {self.limits.max_line_bytes} bytes"))
            elif (item := parse_line(n, raw, self.limits)) is not None:
                self.report.add(item)
            if count % 512 == 0 and clock() >= deadline:
                return False
        self.close()
        self.done = True
        return True

    def fileno(self) -> int:
        return self._file.fileno()

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    def close(self) -> None:
        self._file.close()


WIDEST_LIMITS = Limits(max_line_bytes=1024**3, max_depth=1000)  # the most trainbox.toml may allow


def load_records(path: Path, limits: Limits = WIDEST_LIMITS) -> list[Record]:
    """All records of a file that must be valid (the worker's streaming re-check): first error raises.
    The limits are admission's business; here they are the widest a config may set, so a file the
    daemon admitted under its configured limits is never refused for them later."""
    out = []
    for _n, item in iter_lines(path, limits):
        if isinstance(item, LineError):
            raise ValueError(f"{Path(path).name}: {item}")
        out.append(item)
    return out
