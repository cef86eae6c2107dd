"""The dashboard: server-rendered pages for the radiologists' triage and the operators.

Jinja2 templates shipped in the package (``templates/``), inline CSS, no script beyond a
meta refresh: it works offline, behind any proxy, in any browser a hospital has.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any
from urllib.parse import parse_qs, urlencode

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from jinja2 import Environment, PackageLoader, select_autoescape
from sqlalchemy.orm import Session

from dicom_ai_node.infer.prediction import percent
from dicom_ai_node.jobs import stats
from dicom_ai_node.jobs.models import JobState
from dicom_ai_node.jobs.nodes import cluster_nodes
from dicom_ai_node.jobs.queue import add_feedback, retry_job
from dicom_ai_node.web import queries
from dicom_ai_node.web.api import WebContext

PAGE_SIZE = 50
WORKLIST_HOURS = (12, 24, 72, 168)


def when(moment: datetime | None) -> str:
    """A timestamp in the server's local time, to the second."""
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S") if moment else ""


def ago(moment: datetime | None) -> str:
    """How long ago, compactly: ``45 s``, ``12 min``, ``3 h 05``, ``2 d``."""
    if moment is None:
        return ""
    seconds = int((datetime.now(UTC) - moment).total_seconds())
    if seconds < 60:
        return f"{max(seconds, 0)} s"
    if seconds < 3600:
        return f"{seconds // 60} min"
    if seconds < 86400:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d}"
    return f"{seconds // 86400} d"


def percent_or_blank(probability: float | None) -> str:
    return "" if probability is None else percent(probability)


def templates() -> Jinja2Templates:
    env = Environment(
        loader=PackageLoader("dicom_ai_node.web", "templates"),
        autoescape=select_autoescape(["html"]),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(when=when, ago=ago, percent=percent_or_blank)
    env.globals["timezone"] = datetime.now().astimezone().tzname()
    return Jinja2Templates(env=env)


@dataclass(frozen=True)
class PullChoices:
    """What the job list's pull form offers: the routes and the configured sources."""

    routes: list[str]
    sources: list[str]


def dashboard_router(
    ctx: WebContext, refresh_seconds: int, csrf_token: str, pull: PullChoices | None = None
) -> APIRouter:
    """The HTML pages (the caller adds the token check); ``csrf_token`` goes in their forms
    that change state (see ``auth.py``); with ``pull``, the job list has a form that pulls
    studies from a source (posted to ``/jobs/pull``, see ``pull.py``)."""
    router = APIRouter(include_in_schema=False)
    pages = templates()

    def render(request: Request, name: str, refresh: bool, **values: Any) -> HTMLResponse:
        with ctx.reads() as session:
            depth = stats.queue_depth(session)
        return pages.TemplateResponse(
            request,
            name,
            {
                "node_name": ctx.node_name,
                "depth": depth,
                "refresh": refresh_seconds if refresh else None,
                "now": datetime.now(UTC),
                "csrf": csrf_token,
                **values,
            },
        )

    @router.get("/", response_class=HTMLResponse)
    def worklist_page(request: Request, hours: int = 24) -> HTMLResponse:
        since = datetime.now(UTC) - timedelta(hours=hours)
        with ctx.reads() as session:
            items = queries.worklist(session, since, limit=200)
            destinations = ctx.destination_status(session)
        return render(
            request,
            "worklist.html",
            True,
            items=items,
            destinations=destinations,
            hours=hours,
            choices=WORKLIST_HOURS,
            counts={t: sum(i.triage == t for i in items) for t in queries.TRIAGE_ORDER},
        )

    @router.get("/jobs", response_class=HTMLResponse)
    def jobs_page(
        request: Request,
        state: str = "",
        model: str = "",
        label: str = "",
        since: str = "",
        page: Annotated[int, Query(ge=1)] = 1,
        pulled: str = "",
    ) -> HTMLResponse:
        start = _parse_date(since)
        where = queries.JobFilter(
            states=[state] if state else None,
            model=model or None,
            label=label or None,
            since=start,
        )
        with ctx.reads() as session:
            found = queries.list_jobs(session, where, PAGE_SIZE, (page - 1) * PAGE_SIZE)
            models = queries.distinct_values(session, "model")
            labels = queries.distinct_values(session, "label")
        filters = {"state": state, "model": model, "label": label, "since": since}

        def page_link(number: int) -> str:
            return "/jobs?" + urlencode({**filters, "page": number}, doseq=True)

        return render(
            request,
            "jobs.html",
            True,
            found=found,
            filters=filters,
            states=[s.value for s in JobState],
            models=models,
            labels=labels,
            page=page,
            pages=max(1, -(-found.total // PAGE_SIZE)),
            page_link=page_link,
            bad_since=bool(since) and start is None,
            pull=pull,
            pulled=pulled,
        )

    @router.get("/jobs/{job_id}", response_class=HTMLResponse)
    def job_page(request: Request, job_id: int, retried: str = "") -> Response:
        with ctx.reads() as session:
            job = queries.get_job(session, job_id)
        if job is None:
            return render(request, "missing.html", False, what=f"job {job_id}")
        ctx.accessed(request, job)
        return render(
            request,
            "job.html",
            job.state in stats.PENDING_STATES or job.state == JobState.DELIVERING.value,
            job=job,
            sc=[r for r in job.results if r.kind == "sc"],
            retryable=job.state not in (*stats.PENDING_STATES, JobState.SKIPPED.value),
            retried=retried,
        )

    @router.post("/jobs/{job_id}/feedback")
    async def feedback_form(request: Request, job_id: int) -> RedirectResponse:
        # An urlencoded form, parsed here: FastAPI's Form() needs python-multipart.
        form = {k: v[0] for k, v in parse_qs((await request.body()).decode()).items()}
        author = form.get("author", "").strip()[:128]

        def give(session: Session) -> str:
            if not author:
                raise ValueError("give your name with the feedback")
            agree, comment = form.get("agree") == "yes", form.get("comment", "")[:2000]
            add_feedback(session, job_id, agree, comment, author)
            return "feedback recorded"

        return _job_form(ctx, job_id, give)

    @router.get("/drift", response_class=HTMLResponse)
    def drift_page(request: Request) -> HTMLResponse:
        with ctx.reads() as session:
            rates = stats.positive_rates(session, days=30)
        expected = ctx.metrics.expected
        rows = [
            (r, e if (e := expected.get(r.model)) and e.version == r.version else None)
            for r in rates
        ]
        return render(request, "drift.html", False, rows=rows)

    @router.post("/jobs/{job_id}/retry")
    def retry_form(job_id: int) -> RedirectResponse:
        def run_again(session: Session) -> str:
            outcome = retry_job(session, job_id)
            if outcome.action == "resend":
                return f"{outcome.deliveries} deliveries queued again"
            return "queued again"

        return _job_form(ctx, job_id, run_again)

    @router.get("/destinations", response_class=HTMLResponse)
    def destinations_page(request: Request) -> HTMLResponse:
        with ctx.reads() as session:
            destinations = ctx.destination_status(session)
            refused = queries.refused_sources(session)
            nodes = cluster_nodes(session, ctx.node_timeout_seconds)
        return render(
            request,
            "destinations.html",
            True,
            destinations=destinations,
            refused=refused,
            nodes=nodes,
            problems=ctx.problems(),
        )

    return router


def _job_form(ctx: WebContext, job_id: int, action: Callable[[Session], str]) -> RedirectResponse:
    """Run a job page form's ``action`` in one transaction, then back to the page (303, PRG)
    with its outcome, or its ``LookupError``/``ValueError``, as a notice."""
    try:
        with ctx.sessions.begin() as session:
            message = action(session)
    except (LookupError, ValueError) as exc:
        message = str(exc)
    return RedirectResponse(f"/jobs/{job_id}?{urlencode({'retried': message})}", status_code=303)


def login_page(reason: str, status: int) -> HTMLResponse:
    """The page a browser without a valid token sees: a token field, no patient data."""
    page = templates().get_template("login.html").render(reason=reason)
    return HTMLResponse(page, status_code=status)


def _parse_date(text: str) -> datetime | None:
    """``YYYY-MM-DD`` or an ISO timestamp, in local time unless it names a zone."""
    try:
        moment = datetime.fromisoformat(text) if text else None
    except ValueError:
        return None
    if moment is not None and moment.tzinfo is None:
        moment = moment.astimezone()
    return moment
