"""Who may call what, and how the OpenAPI schema says so.

Control and upload always need the home's bearer token; reads need it only with
``server.read_requires_token``. The checks are FastAPI security dependencies (``HTTPBearer``, and
``APIKeyQuery`` for reads because a browser's EventSource cannot send headers), so the schema a
client or a fuzzer reads declares exactly the schemes the server enforces. The schemes only parse;
the comparison stays in ``token.bearer_matches`` (constant time).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import HTTPException, Security
from fastapi.params import Depends as DependsParam
from fastapi.security import APIKeyQuery, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field

from monitoring.state import State
from monitoring.token import bearer_matches

bearer_scheme = HTTPBearer(
    auto_error=False,
    scheme_name="bearer",
    description="The home's API token (`trainbox token`, or the file <home>/api-token).",
)
query_scheme = APIKeyQuery(
    name="token",
    auto_error=False,
    scheme_name="query-token",
    description="The same token as ?token=, for EventSource, which cannot send headers (reads only).",
)

Bearer = Annotated[HTTPAuthorizationCredentials | None, Security(bearer_scheme)]
QueryToken = Annotated[str | None, Security(query_scheme)]


class ErrorResponse(BaseModel):
    """The body of every error the handlers raise (FastAPI's ``HTTPException`` shape)."""

    detail: str = Field(description="what was wrong, for a person")


_WHY = {
    400: "the request is refused as given (the detail says why)",
    401: "a valid API token is required: Authorization: Bearer <token>",
    404: "no such job",
    409: "the job is not in a state that allows this (only waiting jobs can be changed)",
    413: "the upload is larger than server.max_upload_bytes",
    415: "the body must be the raw file, not multipart form data",
}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The ``responses=`` entries documenting the error codes a route can return (422 FastAPI adds)."""
    out: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        entry: dict[str, Any] = {"model": ErrorResponse, "description": _WHY[code]}
        if code == 401:
            entry["headers"] = {"WWW-Authenticate": {"description": "always Bearer", "schema": {"type": "string"}}}
        out[code] = entry
    return out


def unauthorized() -> HTTPException:
    return HTTPException(
        401,
        "a valid API token is required: Authorization: Bearer <token> (see `trainbox token`)",
        headers={"WWW-Authenticate": "Bearer"},
    )


def _carries(expected: str, creds: HTTPAuthorizationCredentials | None) -> bool:
    return creds is not None and bearer_matches(expected, f"Bearer {creds.credentials}")


def require_token(st: State, creds: Bearer) -> None:
    if not _carries(st.token, creds):
        raise unauthorized()


def require_read_token(st: State, creds: Bearer, token: QueryToken) -> None:
    """The header, or ``?token=``, must carry the token."""
    if _carries(st.token, creds):
        return
    if token is not None and bearer_matches(st.token, f"Bearer {token}"):
        return
    raise unauthorized()


def read_guard(read_requires_token: bool) -> tuple[list[DependsParam], tuple[int, ...]]:
    """Dependencies and error codes for the read routes: none when reads are open, so the schema
    does not claim a security requirement the server never checks."""
    if not read_requires_token:
        return [], ()
    return [Security(require_read_token)], (401,)
