"""The FastAPI application: the JSON API, the dashboard, health and metrics, behind a token."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy.orm import Session, sessionmaker

from dicom_ai_node import __version__
from dicom_ai_node.audit.messages import alert_event, login_event
from dicom_ai_node.audit.trail import AuditTrail
from dicom_ai_node.config import ClusterSettings, DestinationSettings
from dicom_ai_node.jobs.models import utcnow
from dicom_ai_node.metrics import NodeMetrics
from dicom_ai_node.receive.ingest import Ingest
from dicom_ai_node.retrieve import Sources
from dicom_ai_node.web.api import WebContext, api_router, public_router
from dicom_ai_node.web.auth import AuthError, TokenAuth
from dicom_ai_node.web.dashboard import PullChoices, dashboard_router, login_page
from dicom_ai_node.web.pull import pull_router
from dicom_ai_node.web.stow import stow_router

# Nothing external: the pages' own styles and inline handlers (the retry confirmation), images
# from the node, no frames (CSP Level 3 frame-ancestors, and X-Frame-Options for older browsers).
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'; "
    "script-src 'unsafe-inline'; connect-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}


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
    audit: AuditTrail | None = None,
    ingest: Ingest | None = None,
    stow_max_bytes: int = 2**31,
    sources: Sources | None = None,
    node_timeout_seconds: float = ClusterSettings().node_timeout_seconds,
) -> FastAPI:
    """The app of one node. The OpenAPI schema is at ``/openapi.json``; the interactive
    docs are off, as they load scripts from a CDN that a hospital network may not reach.
    Pages and API reads use ``read_sessions`` (which on SQLite take no write lock) when
    given. ``audit`` records logins, wrong tokens, rate limits and who read which study.
    With ``ingest``, ``/dicomweb/studies`` takes instances by STOW-RS into it; with
    ``sources``, ``/api/pull`` (and the job list's form) retrieves studies from them.
    ``node_timeout_seconds`` tells live nodes of the cluster from dead ones."""
    name = node_name or "dicom-ai-node"

    def audited(kind: str, address: str) -> None:
        if audit is None:
            return
        now = utcnow()
        if kind == "rate_limited":
            audit.record(
                alert_event(name, "unknown", address, "too many wrong tokens", now, network=False)
            )
        else:
            user = auth.identity if kind == "login" else "unknown"
            audit.record(login_event(user, address, kind == "login", name, now))

    auth = TokenAuth(token, on_event=audited)
    ctx = WebContext(
        sessions,
        read_sessions or sessions,
        health,
        metrics,
        destinations,
        node_name,
        data_dir,
        audit=audit,
        identity=auth.identity,
        node_timeout_seconds=node_timeout_seconds,
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
        if exc.retry_after is not None:
            headers["Retry-After"] = str(exc.retry_after)
        if request.url.path.startswith(("/api/", "/dicomweb/")):
            return JSONResponse({"detail": exc.reason}, exc.status, headers=headers)
        page = login_page(exc.reason, exc.status)
        page.headers.update(headers)
        return page

    app.middleware("http")(auth.middleware)

    @app.middleware("http")  # added last, so outermost: every answer gets the headers
    async def security_headers(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        return response

    app.include_router(public_router(ctx))
    app.include_router(api_router(ctx), dependencies=[Depends(authenticated)])
    app.include_router(
        dashboard_router(
            ctx,
            refresh_seconds,
            auth.csrf_token,
            PullChoices(sorted(sources.routes), [s.name for s in sources.sources])
            if sources is not None and sources.sources
            else None,
        ),
        dependencies=[Depends(authenticated)],
    )
    if ingest is not None:
        app.include_router(
            stow_router(ingest, ingest.engine, metrics, stow_max_bytes, audit, name),
            dependencies=[Depends(authenticated)],
        )
    if sources is not None:
        app.include_router(
            pull_router(sources, sources.ingest.engine), dependencies=[Depends(authenticated)]
        )
    return app
