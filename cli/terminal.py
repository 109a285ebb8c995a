"""Text from the home made safe for a terminal: names and log lines come from files other people dropped,
and a terminal obeys control characters and escape sequences instead of showing them."""

from __future__ import annotations

import unicodedata

UNSHOWABLE = ("Cc", "Cf", "Cs", "Zl", "Zp")  # control, format (bidi overrides), surrogates, separators
KEPT = "\n\t"


def showable(text: str) -> str:
    """``text`` with every character a terminal would obey written as ``\\uXXXX`` (newlines and tabs kept)."""
    return "".join(c if c in KEPT or unicodedata.category(c) not in UNSHOWABLE else f"\\u{ord(c):04x}" for c in text)
