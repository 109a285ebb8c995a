"""Reading a W&B offline run's ``run-ID.wandb`` file in a test, without the network.

wandb 0.31 has no Python reader for it any more (its Go core reads it for ``wandb sync``), so this follows the
file's published framing, LevelDB's log format (32 KiB blocks; records of a 7-byte header: CRC-32 of the type
byte and the data, length, type FULL/FIRST/MIDDLE/LAST) after a 7-byte file header (``:W&B``, magic 0xBEE1,
version 0), checks every record's CRC, and parses each with wandb's own protobuf ``Record``.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from typing import Any

BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list[Any]:
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), (ident, magic, version)
    out, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue  # zero padding
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"bad CRC at {pos}"
        pending += chunk
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


def history(path: Path) -> dict[str, list[tuple[int, float]]]:
    """Logged scalars by name: (step, value), in logging order."""
    out: dict[str, list[tuple[int, float]]] = {}
    for r in records(path):
        if r.WhichOneof("record_type") != "history":
            continue
        items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
        for key, value in items.items():
            if not key.startswith("_"):
                out.setdefault(key, []).append((int(items["_step"]), float(value)))
    return out


def config(path: Path) -> dict[str, Any]:
    """The run's config as its run record carries it."""
    for r in records(path):
        if r.WhichOneof("record_type") == "run":
            return {i.key: json.loads(i.value_json) for i in r.run.config.update}
    return {}


def run_files(run_dir: Path, run_id: str) -> list[Path]:
    """The run's offline files, oldest first (a resumed run, or the report's, adds a folder).

    A folder is ``offline-run-<second>-<id>``; a second folder of the same run started within the same second
    gets ``-1``, ``-2``... after the id (so the order is the second, then that counter, not the name)."""

    def started(path: Path) -> tuple[str, int]:
        second, _, rest = path.parent.name.removeprefix("offline-run-").partition("-")
        counter = rest.removeprefix(run_id).removeprefix("-")
        return second, int(counter or 0)

    return sorted((run_dir / "wandb").glob(f"offline-run-*/run-{run_id}.wandb"), key=started)
