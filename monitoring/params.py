"""Bounds for every integer the API takes from a URL, in one place.

SQLite stores integers in 64 bits: a larger id reaching a query is an ``OverflowError`` (a 500), not a
"no such job". Bounding each parameter where FastAPI parses it turns any out-of-range value into a
422 naming the parameter, before a handler runs. 2**62 leaves headroom below SQLite's limit for
``id + 1`` arithmetic and is still far above any id a home will ever hand out.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Path, Query

MAX_ID = 2**62
MAX_STEP = 2**62
MAX_PAGE = 1000

JobIdPath = Annotated[int, Path(ge=1, le=MAX_ID, description="a job id (see /api/jobs)")]
JobIdQuery = Annotated[int | None, Query(ge=1, le=MAX_ID, description="only this job's events")]
Limit = Annotated[int, Query(ge=1, le=MAX_PAGE, description=f"the most items in one page (1-{MAX_PAGE})")]
StepSince = Annotated[
    int, Query(ge=-1, le=MAX_STEP, description="only points with a step above this (-1: from the start)")
]
MaxPoints = Annotated[int, Query(ge=1, le=100_000, description="downsample each series to at most this many points")]
