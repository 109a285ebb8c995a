"""Is the model DB at the newest revision? Answered without importing Alembic (a fifth of a second per process).

Revisions are named ``NNNN_<slug>.py`` with revision id ``NNNN`` (``python -m management.migrate revision``
names them so), so the newest is the highest number among the files; ``tests/test_db_backends.py`` checks
that this agrees with Alembic's own reading of the scripts.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

VERSIONS = Path(__file__).with_name("migrations") / "versions"
REVISION_FILE = re.compile(r"^(\d{4})_\w+\.py$")


@cache
def newest_revision() -> str:
    return max(m.group(1) for p in VERSIONS.iterdir() if (m := REVISION_FILE.match(p.name)))


def at_newest(engine: Engine) -> bool:
    """True when the DB is stamped with the newest revision; False otherwise, or when it has no stamp yet."""
    try:
        with engine.connect() as conn:
            stamped = conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
    except SQLAlchemyError:  # no alembic_version table: a new DB, or one from before migrations
        return False
    return stamped == [newest_revision()]
