"""The API token that guards control and upload: one secret per home, readable only by its owner.

Generated at the server's first start into ``<home>/api-token`` (mode 0600) and reused after, so a
browser that stored it keeps working across restarts and ``trainbox token`` can print it.
"""

from __future__ import annotations

import contextlib
import hmac
import os
import secrets
from pathlib import Path

from trainbox.home import Home

TOKEN_FILE = "api-token"
TOKEN_BYTES = 32


def token_path(home: Home) -> Path:
    return home.root / TOKEN_FILE


def read_token(home: Home) -> str | None:
    """The token, or None when the server has never started in this home."""
    try:
        token = token_path(home).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    return token or None


def load_or_create_token(home: Home) -> str:
    """The home's token, creating it (mode 0600 from the first byte) when there is none.

    ``O_EXCL`` makes two servers starting at once agree on one token: the loser reads the winner's.
    """
    existing = read_token(home)
    if existing:
        return existing
    path = token_path(home)
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(TOKEN_BYTES)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        again = read_token(home)
        if again:
            return again
        # an empty file left by a crash mid-write: replace it
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return load_or_create_token(home)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(token + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.chmod(path, 0o600)  # a umask cannot widen it, but an existing ACL default could: be explicit
    return token


def bearer_matches(expected: str, authorization: str | None) -> bool:
    """Whether an ``Authorization`` header carries the token; constant-time, so timing leaks nothing."""
    if not authorization:
        return False
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(value.strip().encode("utf-8"), expected.encode("utf-8"))
