"""Uploads: a JSONL sent over HTTP lands in ``inbox/<priority>/`` exactly as if dropped there by hand.

Written under a dot-name (which intake ignores), then renamed to its final name, so the daemon never
sees half a file and admits it through the normal path. The name must be a plain file name ending
in ``.jsonl``: anything that names a folder (``../x.jsonl``, ``/etc/x.jsonl``, ``..\\x.jsonl``) is
refused rather than silently flattened, because a client that sends one is confused or hostile.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

from trainbox.atomic import fsync_dir
from trainbox.spool import JOB_SUFFIX, sanitize


class UploadError(ValueError):
    """A refused upload; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def checked_name(raw: str | None) -> str:
    """The name the file gets in the inbox, or UploadError(400) saying why the given one is refused."""
    if not raw or not raw.strip():
        raise UploadError(400, "a file name is required (the filename parameter)")
    if "\x00" in raw or any(ord(c) < 32 for c in raw):
        raise UploadError(400, "the file name contains control characters")
    if "/" in raw or "\\" in raw or raw in (".", "..") or raw.startswith("~"):
        raise UploadError(400, f"the file name must not name a folder: {raw!r}")
    safe = sanitize(raw)
    if not safe.endswith(JOB_SUFFIX) or safe == JOB_SUFFIX:
        raise UploadError(400, f"only .jsonl files are accepted, got {raw!r}")
    return safe


def _free_name(folder: Path, name: str) -> Path:
    """``name`` in ``folder``, or ``stem.N.jsonl`` when taken: an upload never replaces a file."""
    target = folder / name
    stem, suffix = target.stem, target.suffix
    n = 1
    while target.exists():
        target = folder / f"{stem}.{n}{suffix}"
        n += 1
    return target


async def receive(chunks: AsyncIterator[bytes], folder: Path, name: str, max_bytes: int) -> tuple[Path, int]:
    """Stream ``chunks`` into ``folder/name``; on any refusal nothing is left behind."""
    folder = folder.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".upload-{secrets.token_hex(8)}.part"
    size = 0
    try:
        with open(tmp, "xb") as f:
            async for chunk in chunks:
                size += len(chunk)
                if size > max_bytes:
                    raise UploadError(413, f"upload larger than the limit of {max_bytes} bytes")
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        if size == 0:
            raise UploadError(400, "the upload is empty")
        target = _free_name(folder, name)
        if target.resolve().parent != folder:  # belt and braces: checked_name already refused folders
            raise UploadError(400, "the file name escapes the inbox")
        os.rename(tmp, target)  # a rename, not a link: intake sees a moved-in file, complete at once
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_dir(folder)
    return target, size
