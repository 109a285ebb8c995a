"""The job report as a page: ``/jobs/{id}/report`` (its Markdown as HTML) and ``/jobs/{id}/report/{png}``.

Read-only: the server shows ``runs/job-N/report.md`` as the report child wrote it and never writes
one (``trainbox report N`` does). Pages for people, like the dashboard's ``/``, so they stay out of
the OpenAPI schema, but they take the same read guard as every read. The Markdown is rendered with
raw HTML off (a name in a report cannot inject markup), and only the report's own plots are served:
a plot name must be one ``management/report_plots.py`` writes, so no path reaches another file.
"""

from __future__ import annotations

from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, HTTPException, Path, Request
from fastapi.responses import FileResponse, HTMLResponse
from markdown_it import MarkdownIt

from management.job_report import REPORT
from management.report_plots import PLOT_NAMES
from monitoring.auth import read_guard
from monitoring.params import JobIdPath
from monitoring.state import State

PlotName = Annotated[str, Path(pattern=r"^[a-z_]{1,40}\.png$", description="a plot of the report")]

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font: 15px/1.45 system-ui, sans-serif; max-width: 60rem; margin: 1.5rem auto; padding: 0 1rem; color: #222; }}
table {{ border-collapse: collapse; margin: .5rem 0; }}
td, th {{ border: 1px solid #ccc; padding: .2rem .5rem; text-align: left; vertical-align: top; }}
img {{ max-width: 100%; }}
code {{ background: #f2f2f2; padding: 0 .2rem; }}
</style></head>
<body><p><a href="/">dashboard</a></p>
{body}
</body></html>
"""


def render_report(markdown: str, job_id: int, token: str | None) -> str:
    """The report's HTML; each image's source is pointed at this server's plot route (with the
    ``?token=`` the page was opened with, since an ``<img>`` cannot send a header); an image naming
    anything but one of the report's plots is dropped."""
    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    tokens = md.parse(markdown)
    query = f"?token={quote(token, safe='')}" if token else ""
    for block in tokens:
        for child in block.children or []:
            if child.type != "image":
                continue
            name = str(child.attrGet("src") or "").rsplit("/", 1)[-1]
            if name in PLOT_NAMES:
                child.attrSet("src", f"/jobs/{job_id}/report/{name}{query}")
            else:
                child.type, child.content, child.attrs = "text", "", {}
    body = md.renderer.render(tokens, md.options, {})
    return PAGE.format(title=f"job {job_id} report", body=body)


def get_report(request: Request, st: State, job_id: JobIdPath) -> HTMLResponse:
    path = st.home.run_dir(job_id) / REPORT
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        raise HTTPException(404, f"job {job_id} has no report (yet): `trainbox report {job_id}` writes it") from None
    return HTMLResponse(render_report(text, job_id, request.query_params.get("token")))


def get_plot(st: State, job_id: JobIdPath, name: PlotName) -> FileResponse:
    path = st.home.run_dir(job_id) / name
    if name not in PLOT_NAMES or not path.is_file():
        raise HTTPException(404, f"job {job_id} has no plot {name}")
    return FileResponse(path, media_type="image/png", headers={"Cache-Control": "no-cache"})


def router(read_requires_token: bool) -> APIRouter:
    guard, _ = read_guard(read_requires_token)
    r = APIRouter(dependencies=guard)
    r.add_api_route("/jobs/{job_id}/report", get_report, methods=["GET"], include_in_schema=False)
    r.add_api_route("/jobs/{job_id}/report/{name}", get_plot, methods=["GET"], include_in_schema=False)
    return r
