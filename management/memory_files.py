"""A memory set's file (``memory/<sha256>.jsonl``, ``management/memory.py``): written, located and read
without the DB, so the eval gate's child, which only reads sets, does not import SQLAlchemy (a third of
a CPU second of every gate's cold start)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from trainbox.atomic import atomic_write_bytes
from trainbox.records import Record, parse_record


def record_json(rec: Record) -> dict[str, Any]:
    """A record as the JSON object it was read from (the shape admission validates)."""
    if rec.kind == "messages":
        return {"messages": [{"role": r, "content": c} for r, c in rec.messages]}
    if rec.kind == "prompt_completion":
        return {"prompt": rec.prompt, "completion": rec.completion}
    return {"text": rec.text}


def record_line(rec: Record) -> bytes:
    return (json.dumps(record_json(rec), ensure_ascii=False) + "\n").encode("utf-8")


def set_path(memory_dir: Path, sha256: str) -> Path:
    return Path(memory_dir) / f"{sha256}.jsonl"


def write_set(memory_dir: Path, lines: Sequence[bytes]) -> tuple[str, int]:
    """Store ``lines`` as one content-addressed file (atomically; nothing written when it exists)."""
    import hashlib

    data = b"".join(lines)
    sha = hashlib.sha256(data).hexdigest()
    path = set_path(memory_dir, sha)
    if not path.is_file():
        Path(memory_dir).mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, data)
    return sha, len(data)


def read_lines(memory_dir: Path, sha256: str, n: int | None = None) -> list[bytes]:
    """The first ``n`` lines (all with None) of a stored set: any prefix is a seeded sample of it."""
    with open(set_path(memory_dir, sha256), "rb") as f:
        lines = f.read().splitlines(keepends=True)
    return lines if n is None else lines[:n]


def read_set(memory_dir: Path, sha256: str, n: int | None = None) -> list[Record]:
    return [parse_record(json.loads(line)) for line in read_lines(memory_dir, sha256, n)]
