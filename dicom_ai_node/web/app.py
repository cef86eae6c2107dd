"""The FastAPI application: the JSON API, the dashboard, health and metrics, behind a token."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy.orm import Session, sessionmaker

from dicom_ai_node import __version__
from dicom_ai_node.config import DestinationSettings
from dicom_ai_node.metrics import NodeMetrics
from dicom_ai_node.web.api import WebContext, api_router, public_router
from dicom_ai_node.web.auth import AuthError, TokenAuth
from dicom_ai_node.web.dashboard import dashboard_router, login_page


def create_app(
    sessions: sessionmaker[Session],
    *,
    read_sessions: sessionmaker[Session] | None = None,
    token: str,
    health: Callable[[], list[str]],
    metrics: NodeMetrics,
    destinations: Sequence[DestinationSettings] = (),
    node_name: str = "",
    data_dir: Path = Path(),
    refresh_seconds: int = 15,
) -> FastAPI:
    """The app of one node. The OpenAPI schema is at ``/openapi.json``; the interactive
    docs are off, as they load scripts from a CDN that a hospital network may not reach.
    Pages and API reads use ``read_sessions`` (which on SQLite take no write lock) when
    given."""
    auth = TokenAuth(token)
    ctx = WebContext(
        sessions, read_sessions or sessions, health, metrics, destinations, node_name, data_dir
    )
    app = FastAPI(
        title="dicom-ai-node",
        version=__version__,
        summary="Jobs, triage worklist, destinations, results and health of a DICOM AI node.",
        docs_url=None,
        redoc_url=None,
    )

    def authenticated(request: Request) -> None:
        auth.check(request)

    @app.exception_handler(AuthError)
    def refuse(request: Request, exc: AuthError) -> Response:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else {}
        if request.url.path.startswith("/api/"):
            return JSONResponse({"detail": exc.reason}, exc.status, headers=headers)
        page = login_page(exc.reason, exc.status)
        page.headers.update(headers)
        return page

    app.middleware("http")(auth.middleware)
    app.include_router(public_router(ctx))
    app.include_router(api_router(ctx), dependencies=[Depends(authenticated)])
    app.include_router(
        dashboard_router(ctx, refresh_seconds), dependencies=[Depends(authenticated)]
    )
    return app
