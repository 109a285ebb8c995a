"""The FastAPI app: the read routes (``read_routes.py``), the token-guarded control and upload routes
(``control_routes.py``), and the dashboard's static files.

Read-only towards training state: it reads status files, spool folders, run folders and the model
DB, and steers only through ``trainbox.control.submit`` (as the CLI does) and the inbox (uploads).
The DB engine lives in the lifespan, so each server process opens it once and closes it on exit.
``/docs`` and ``/redoc`` are off: FastAPI builds them from CDN scripts, which a machine without
internet cannot load, so they would be blank pages; ``/openapi.json`` is the description.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from management.db import ModelDB
from monitoring import control_routes, read_routes, report_routes
from monitoring.state import ServerState
from monitoring.system import Gpus, prime_cpu_percent
from monitoring.token import load_or_create_token
from trainbox.config import Settings
from trainbox.home import Home
from trainbox.spool import Spool

STATIC = Path(__file__).parent / "static"


def create_app(
    home: Home,
    settings: Settings,
    stopping: Callable[[], bool] | None = None,
    max_upload_bytes: int | None = None,
) -> FastAPI:
    """The app for one home; ``stopping`` tells open streams the server is shutting down."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        gpus = Gpus()
        gpus.start()
        prime_cpu_percent()
        db = ModelDB(settings.db.url_for(home.db_url))
        app.state.server = ServerState(
            home=home,
            settings=settings,
            spool=Spool(home),
            db=db,
            token=load_or_create_token(home),
            gpus=gpus,
            stopping=stopping or (lambda: False),
            upload_limit=max_upload_bytes,
        )
        try:
            yield
        finally:
            db.close()
            gpus.stop()

    app = FastAPI(
        title="trainbox status server",
        version="1",
        summary="Watch and steer one trainbox home: status, queue, jobs, metrics, models, system; control and upload.",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.include_router(read_routes.router(settings.server.read_requires_token))
    app.include_router(control_routes.router)
    app.include_router(report_routes.router(settings.server.read_requires_token))  # /jobs/{id}/report pages

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
