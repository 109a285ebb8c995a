"""Model lineages: independent chains of model versions in one home (or one fleet).

Continual training makes one chain sequential: each job continues the version its predecessor left
current. A user with unrelated data (two products, two languages) wants two chains that do not share
a current version, a gate or memory sets. A job names its chain by a sidecar key ``lineage`` or by the
inbox folder it was dropped in (``inbox/<lineage>/`` or ``inbox/<lineage>/<priority>/``); a job that
names none belongs to ``main``, so a home that never heard of lineages is one chain, exactly as before.

The name becomes a folder name in the inbox and part of the pointer ``models/current@<lineage>``, so it
is kept to a small, safe alphabet; the priority folders' names are taken.
"""

from __future__ import annotations

import re

MAIN = "main"
NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
RESERVED = frozenset({"high", "normal", "low"})  # the inbox's priority folders
EXPECTED = "1-32 characters: lower-case letters, digits, '-' or '_', starting with a letter or digit"


class LineageError(ValueError):
    """A lineage name that cannot be used; the message says what was expected."""


def check_lineage(name: str) -> str:
    """``name`` if it can name a lineage, else ``LineageError`` saying why."""
    if not isinstance(name, str) or not NAME.match(name):
        raise LineageError(f"lineage {name!r} is not a valid name ({EXPECTED})")
    if name in RESERVED:
        raise LineageError(f"lineage {name!r} is taken: high, normal and low are the inbox's priority folders")
    return name


def is_lineage_name(name: str) -> bool:
    try:
        check_lineage(name)
    except LineageError:
        return False
    return True


def pointer_name(lineage: str) -> str:
    """The name of a lineage's current-version pointer under ``models/``: ``current`` for ``main`` (as
    it always was), ``current@<lineage>`` for the others."""
    return "current" if lineage == MAIN else f"current@{lineage}"


def lineage_of_pointer(name: str) -> str | None:
    """The lineage a pointer name under ``models/`` belongs to, or None when it is no pointer."""
    if name == "current":
        return MAIN
    if name.startswith("current@") and is_lineage_name(name[len("current@") :]):
        return name[len("current@") :]
    return None
