"""The JSON API: jobs, the triage worklist, destinations, the cluster's nodes, result
images, health, metrics.

Every ``/api`` route needs the token (see :mod:`.auth`); ``/healthz`` and ``/metrics`` are
open, for load balancers and Prometheus, and carry no patient data.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Query, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, Field
from sqlalchemy.orm import Session, sessionmaker

from dicom_ai_node.audit.messages import accessed_event
from dicom_ai_node.audit.trail import AuditTrail
from dicom_ai_node.config import ClusterSettings, DestinationSettings
from dicom_ai_node.jobs import stats
from dicom_ai_node.jobs.models import Result, utcnow
from dicom_ai_node.jobs.nodes import NodeHealth, cluster_nodes
from dicom_ai_node.jobs.queue import RetryOutcome, add_feedback, retry_job
from dicom_ai_node.metrics import NodeMetrics
from dicom_ai_node.web import queries
from dicom_ai_node.web.auth import client_address
from dicom_ai_node.web.images import dicom_to_png

StateName = Literal[
    "queued", "running", "delivering", "done", "failed", "failed_to_deliver", "skipped"
]


@dataclass(frozen=True)
class WebContext:
    """What the routes use: the job log (``reads`` for reading, ``sessions`` for the
    operators' writes), the node's health and metrics, its destinations, and the heartbeat
    age after which a node of the cluster is dead (``[cluster] node_timeout_seconds``)."""

    sessions: sessionmaker[Session]
    reads: sessionmaker[Session]
    health: Callable[[], list[str]]
    metrics: NodeMetrics
    destinations: Sequence[DestinationSettings]
    node_name: str
    data_dir: Path  # the spool's root: the job log's paths are relative to it
    audit: AuditTrail | None = None
    identity: str = ""
    node_timeout_seconds: float = ClusterSettings().node_timeout_seconds

    def accessed(self, request: Request, job: queries.JobDetail) -> None:
        """Audit that this request's user read ``job`` (PS3.15 A.5.3.2)."""
        if self.audit is not None:
            self.audit.record(
                accessed_event(
                    self.identity,
                    client_address(request),
                    str(request.url.path),
                    job.study_instance_uid,
                    job.patient_id or "",
                    utcnow(),
                )
            )

    def destination_status(self, session: Session) -> list[queries.DestinationStatus]:
        configured = [(d.name, d.address) for d in self.destinations]
        return queries.destinations(session, configured)

    def problems(self) -> list[str]:
        """The health check's problems; a check that raises is a problem too."""
        try:
            return self.health()
        except Exception as exc:
            return [f"health check failed: {type(exc).__name__}: {exc}"]


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    problems: list[str]


class FeedbackIn(BaseModel):
    """A radiologist's opinion of a job's finding."""

    agree: bool
    comment: str = Field(default="", max_length=2000)
    author: str = Field(min_length=1, max_length=128, description="Who gives the feedback")


def as_utc(moment: datetime | None) -> datetime | None:
    """A query's timestamp; one without a zone is taken as UTC."""
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=UTC)


def api_router(ctx: WebContext) -> APIRouter:
    """The ``/api`` routes (the caller adds the token check)."""
    router = APIRouter(prefix="/api", tags=["api"])

    @router.get("/jobs", response_model=queries.JobPage)
    def list_jobs(
        state: Annotated[list[StateName] | None, Query(description="Any of these states")] = None,
        model: str | None = None,
        label: str | None = None,
        positive: bool | None = None,
        since: Annotated[datetime | None, Query(description="Created at or after")] = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        offset: Annotated[int, Query(ge=0)] = 0,
    ) -> queries.JobPage:
        """Jobs, newest first, filtered and paged; with patient ID, accession number and the
        delivery status per destination."""
        where = queries.JobFilter(
            states=list(state) if state else None,
            model=model,
            label=label,
            positive=positive,
            since=as_utc(since),
        )
        with ctx.reads() as session:
            return queries.list_jobs(session, where, limit, offset)

    @router.get("/jobs/{job_id}", response_model=queries.JobDetail)
    def get_job(request: Request, job_id: int) -> queries.JobDetail:
        """One job with its results, notifications and event history."""
        with ctx.reads() as session:
            job = queries.get_job(session, job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id}")
        ctx.accessed(request, job)
        return job

    @router.post(
        "/jobs/{job_id}/retry",
        response_model=RetryOutcome,
        responses={404: {"description": "No such job"}, 409: {"description": "Not retryable"}},
    )
    def retry_endpoint(job_id: int) -> RetryOutcome:
        """Re-send a job's failed deliveries (``failed_to_deliver``) or run it again."""
        try:
            with ctx.sessions.begin() as session:
                return retry_job(session, job_id)
        except LookupError as exc:
            raise HTTPException(404, str(exc)) from None
        except ValueError as exc:
            raise HTTPException(409, str(exc)) from None

    @router.post(
        "/jobs/{job_id}/feedback",
        response_model=queries.FeedbackOut,
        status_code=201,
        responses={404: {"description": "No such job"}, 409: {"description": "No finding"}},
    )
    def feedback_endpoint(job_id: int, given: FeedbackIn) -> queries.FeedbackOut:
        """Agree or disagree with a job's finding, with an optional comment."""
        try:
            with ctx.sessions.begin() as session:
                stored = add_feedback(session, job_id, given.agree, given.comment, given.author)
                return queries.FeedbackOut.model_validate(stored, from_attributes=True)
        except LookupError as exc:
            raise HTTPException(404, str(exc)) from None
        except ValueError as exc:
            raise HTTPException(409, str(exc)) from None

    @router.get("/worklist", response_model=list[queries.WorklistItem])
    def get_worklist(
        since: Annotated[datetime | None, Query(description="Created at or after")] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> list[queries.WorklistItem]:
        """Triage order: positive findings (most probable, most urgent first), then pending
        jobs, then failed ones, then negative ones; skipped series are left out."""
        with ctx.reads() as session:
            return queries.worklist(session, as_utc(since), limit)

    @router.get("/destinations", response_model=list[queries.DestinationStatus])
    def get_destinations() -> list[queries.DestinationStatus]:
        """Each destination with its deliveries and its last success and failure."""
        with ctx.reads() as session:
            return ctx.destination_status(session)

    @router.get("/nodes", response_model=list[NodeHealth])
    def get_nodes() -> list[NodeHealth]:
        """Every node sharing this job log (the whole cluster), with its version, when it
        started, its last heartbeat and whether it is live (``[cluster] node_timeout_seconds``).
        """
        with ctx.reads() as session:
            return cluster_nodes(session, ctx.node_timeout_seconds)

    @router.get("/refused-sources", response_model=list[queries.RefusedSource])
    def get_refused_sources() -> list[queries.RefusedSource]:
        """Source addresses the DICOM listener refused by a limit, by reason, newest first."""
        with ctx.reads() as session:
            return queries.refused_sources(session)

    @router.get("/queue", response_model=stats.QueueDepth)
    def get_queue() -> stats.QueueDepth:
        """Work waiting: jobs queued and running, deliveries and notifications pending."""
        with ctx.reads() as session:
            return stats.queue_depth(session)

    @router.get(
        "/results/{sop_instance_uid}/image.png",
        response_class=Response,
        responses={200: {"content": {"image/png": {}}}, 404: {"description": "No such image"}},
    )
    def result_image(sop_instance_uid: str) -> Response:
        """A result image (the Secondary Capture) rendered as PNG."""
        with ctx.reads() as session:
            result = session.get(Result, sop_instance_uid)
        if result is None or result.kind != "sc":
            raise HTTPException(404, f"no result image {sop_instance_uid}")
        try:
            png = dicom_to_png(ctx.data_dir / result.path)
        except FileNotFoundError:
            raise HTTPException(404, f"the file of {sop_instance_uid} is gone") from None
        return Response(png, media_type="image/png", headers={"Cache-Control": "private"})

    return router


def public_router(ctx: WebContext) -> APIRouter:
    """``/healthz`` and ``/metrics``: no token, no patient data."""
    router = APIRouter(tags=["operations"])

    @router.get(
        "/healthz",
        response_model=Health,
        responses={503: {"model": Health, "description": "Not ready, with the reasons"}},
    )
    def healthz() -> JSONResponse:
        """200 when the DICOM listener listens, the job log answers, the models are loaded
        and (under ``serve``'s supervisor) every process of the node is up and ready; 503
        with the problems otherwise."""
        problems = ctx.problems()
        health = Health(status="unavailable" if problems else "ok", problems=problems)
        return JSONResponse(health.model_dump(), status_code=503 if problems else 200)

    @router.get("/metrics", response_class=Response)
    def metrics() -> Response:
        """Prometheus metrics (text exposition format)."""
        return Response(ctx.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    return router
