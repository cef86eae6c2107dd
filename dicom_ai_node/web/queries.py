"""What the API and the dashboard show, read from the job log as typed values.

Every function takes an open session and returns pydantic models, so the JSON API, the
HTML pages and the tests see the same data. Study attributes (patient ID, accession
number) come from a join with ``studies``; delivery status is summarised per destination.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, Literal, TypeVarTuple

from pydantic import BaseModel
from sqlalchemy import Select, case, func, select
from sqlalchemy.orm import Session

from dicom_ai_node.jobs.models import (
    Association,
    Delivery,
    DeliveryState,
    Event,
    Feedback,
    Instance,
    Job,
    JobState,
    Notification,
    Result,
    Series,
    Study,
)
from dicom_ai_node.jobs.queue import versions
from dicom_ai_node.jobs.stats import PENDING_STATES

# States in which a job's label and probability are known (inference finished).
ANSWERED_STATES = (
    JobState.DELIVERING.value,
    JobState.DONE.value,
    JobState.FAILED_TO_DELIVER.value,
)
Columns = TypeVarTuple("Columns")
Triage = Literal["positive", "pending", "failed", "negative"]
TRIAGE_ORDER: tuple[Triage, ...] = ("positive", "pending", "failed", "negative")


_STORED = (DeliveryState.SENT.value, DeliveryState.DONE.value)


class DeliveryStatus(BaseModel):
    """A job's results to one destination: the worst state of its deliveries."""

    destination: str
    state: str
    delivered: int
    committed: int  # confirmed by the peer's storage commitment (PS3.4 Annex J)
    total: int
    attempts: int
    last_error: str | None
    sent_by: list[str]  # the nodes whose dispatchers had these results stored


class JobSummary(BaseModel):
    id: int
    study_instance_uid: str
    series_instance_uid: str | None
    patient_id: str
    accession_number: str
    modality: str
    route: str | None
    model: str | None
    model_version: str | None
    weights_sha256: str | None
    shadow: bool
    label: str | None
    probability: float | None
    positive: bool | None
    destinations: list[str]
    priority: int
    state: str
    attempts: int
    error: str | None
    received_by: list[str]  # the nodes whose DICOM associations brought its instances
    ran_by: str | None  # the node that claimed its latest attempt
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    deliveries: list[DeliveryStatus]


class JobPage(BaseModel):
    total: int
    limit: int
    offset: int
    items: list[JobSummary]


class EventOut(BaseModel):
    id: int
    at: datetime
    kind: str
    message: str
    data: dict[str, Any]


class ResultOut(BaseModel):
    sop_instance_uid: str
    kind: str
    sop_class_uid: str
    series_instance_uid: str
    created_at: datetime


class NotificationOut(BaseModel):
    id: int
    url: str
    trigger: str
    state: str
    attempts: int
    last_error: str | None
    sent_at: datetime | None


class FeedbackOut(BaseModel):
    agree: bool
    comment: str
    author: str
    at: datetime


class JobVersion(BaseModel):
    """One run of a job's series and route: a series reopened by late instances is run
    again (a new generation) and its SR amends the earlier one's."""

    id: int
    generation: int
    state: str
    label: str | None
    probability: float | None
    created_at: datetime
    sr_uid: str | None


class JobDetail(JobSummary):
    study_date: str
    study_description: str
    versions: list[JobVersion]  # every run of the series and route, oldest first
    results: list[ResultOut]
    events: list[EventOut]
    notifications: list[NotificationOut]
    feedback: list[FeedbackOut]


class WorklistItem(JobSummary):
    triage: Triage
    sc_result_uid: str | None


class DestinationStatus(BaseModel):
    """A destination's health as its deliveries tell it."""

    name: str
    address: str | None
    pending: int
    failed: int
    delivered: int
    sent: int  # stored by the peer (done, or awaiting its storage commitment)
    committed: int  # of those, confirmed by the peer's storage commitment
    last_success_at: datetime | None
    last_failure_at: datetime | None
    last_error: str | None
    health: Literal["ok", "failing", "unknown"]


class RefusedSource(BaseModel):
    """A source address that the DICOM listener refused, by reason (``connection_refused``
    events: one per source and reason a minute at most, see ``receive/guard.py``)."""

    address: str
    reason: str
    minutes: int
    last_at: datetime
    last_message: str


class JobFilter(BaseModel):
    """The filters of the job list; ``None`` means any."""

    states: list[str] | None = None
    model: str | None = None
    label: str | None = None
    positive: bool | None = None
    since: datetime | None = None


def _joined() -> Select[Job, str, str, str, str]:
    return select(
        Job,
        Study.patient_id,
        Study.accession_number,
        Study.study_date,
        Study.study_description,
    ).outerjoin(Study, Study.study_instance_uid == Job.study_instance_uid)


def _filtered(query: Select[*Columns], where: JobFilter) -> Select[*Columns]:
    if where.states:
        query = query.where(Job.state.in_(where.states))
    if where.model:
        query = query.where(Job.model == where.model)
    if where.label:
        query = query.where(Job.label == where.label)
    if where.positive is not None:
        query = query.where(Job.positive.is_(where.positive))
    if where.since is not None:
        query = query.where(Job.created_at >= where.since)
    return query


def _delivery_status(session: Session, job_ids: Sequence[int]) -> dict[int, list[DeliveryStatus]]:
    """Per job and destination: failed if any failed, else pending if any pending, else sent
    (awaiting storage commitment) if any sent, else done."""
    found: dict[int, dict[str, list[Delivery]]] = {}
    if job_ids:
        for delivery in session.scalars(
            select(Delivery).where(Delivery.job_id.in_(job_ids)).order_by(Delivery.id)
        ):
            found.setdefault(delivery.job_id, {}).setdefault(delivery.destination, []).append(
                delivery
            )
    status: dict[int, list[DeliveryStatus]] = {}
    for job_id, by_destination in found.items():
        for destination, rows in sorted(by_destination.items()):
            states = {row.state for row in rows}
            state = next(
                s.value
                for s in (
                    DeliveryState.FAILED,
                    DeliveryState.PENDING,
                    DeliveryState.SENT,
                    DeliveryState.DONE,
                )
                if s.value in states
            )
            errors = [row.last_error for row in rows if row.last_error and row.state != "done"]
            status.setdefault(job_id, []).append(
                DeliveryStatus(
                    destination=destination,
                    state=state,
                    delivered=sum(row.state in _STORED for row in rows),
                    committed=sum(row.committed_at is not None for row in rows),
                    total=len(rows),
                    attempts=max(row.attempts for row in rows),
                    last_error=errors[-1] if errors else None,
                    sent_by=sorted({row.sent_by for row in rows if row.sent_by}),
                )
            )
    return status


def _received_by(session: Session, jobs: Sequence[Job]) -> dict[int, list[str]]:
    """Per job, the nodes whose associations brought the instances of its series (or study).
    Instances that came by STOW-RS or were pulled came in no association: they name none."""
    series = {job.series_instance_uid for job in jobs if job.series_instance_uid is not None}
    studies = {job.study_instance_uid for job in jobs if job.series_instance_uid is None}
    nodes: dict[str, set[str]] = {}
    by = (
        select(Instance.series_instance_uid, Instance.study_instance_uid, Association.node_name)
        .join(Association, Association.id == Instance.association_id)
        .distinct()
    )
    if series:
        for uid, _, node in session.execute(by.where(Instance.series_instance_uid.in_(series))):
            nodes.setdefault(uid, set()).add(node)
    if studies:
        in_studies = Series.study_instance_uid.in_(studies)
        joined = by.join(Series, Series.series_instance_uid == Instance.series_instance_uid)
        for _, uid, node in session.execute(joined.where(in_studies)):
            nodes.setdefault(uid, set()).add(node)
    return {
        job.id: sorted(nodes.get(job.series_instance_uid or job.study_instance_uid, ()))
        for job in jobs
    }


def _summary(
    row: Any,
    deliveries: dict[int, list[DeliveryStatus]],
    received: dict[int, list[str]],
    **extra: Any,
) -> dict[str, Any]:
    job: Job = row[0]
    return {
        "id": job.id,
        "study_instance_uid": job.study_instance_uid,
        "series_instance_uid": job.series_instance_uid,
        "patient_id": row[1] or "",
        "accession_number": row[2] or "",
        "modality": job.modality,
        "route": job.route,
        "model": job.model,
        "model_version": job.model_version,
        "weights_sha256": job.weights_sha256,
        "shadow": job.shadow,
        "label": job.label,
        "probability": job.probability,
        "positive": job.positive,
        "destinations": job.destinations,
        "priority": job.priority,
        "state": job.state,
        "attempts": job.attempts,
        "error": job.error,
        "received_by": received.get(job.id, []),
        "ran_by": job.ran_by,
        "created_at": job.created_at,
        "updated_at": job.updated_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "deliveries": deliveries.get(job.id, []),
        **extra,
    }


def list_jobs(session: Session, where: JobFilter, limit: int = 50, offset: int = 0) -> JobPage:
    """Jobs matching ``where``, newest first, one page."""
    total = session.scalar(_filtered(select(func.count(Job.id)), where)) or 0
    rows = session.execute(
        _filtered(_joined(), where).order_by(Job.id.desc()).limit(limit).offset(offset)
    ).all()
    deliveries = _delivery_status(session, [row[0].id for row in rows])
    received = _received_by(session, [row[0] for row in rows])
    return JobPage(
        total=total,
        limit=limit,
        offset=offset,
        items=[JobSummary(**_summary(row, deliveries, received)) for row in rows],
    )


def get_job(session: Session, job_id: int) -> JobDetail | None:
    """One job with its results, notifications and history (``None`` if unknown).

    The history includes the events of its series that name no job (the series being
    completed), so it reads from arrival to delivery.
    """
    row = session.execute(_joined().where(Job.id == job_id)).first()
    if row is None:
        return None
    job = row[0]
    belongs = Event.job_id == job_id
    if job.series_instance_uid is not None:
        belongs = belongs | (
            Event.job_id.is_(None) & (Event.series_instance_uid == job.series_instance_uid)
        )
    events = session.scalars(select(Event).where(belongs).order_by(Event.id)).all()
    results = session.scalars(
        select(Result).where(Result.job_id == job_id).order_by(Result.kind)
    ).all()
    notifications = session.scalars(
        select(Notification).where(Notification.job_id == job_id).order_by(Notification.id)
    ).all()
    runs = versions(session, job)
    srs = dict(
        session.execute(
            select(Result.job_id, Result.sop_instance_uid).where(
                Result.job_id.in_([run.id for run in runs]), Result.kind == "sr"
            )
        ).all()
    )
    return JobDetail(
        **_summary(row, _delivery_status(session, [job_id]), _received_by(session, [job])),
        study_date=row[3] or "",
        study_description=row[4] or "",
        versions=[
            JobVersion(
                id=run.id,
                generation=run.generation,
                state=run.state,
                label=run.label,
                probability=run.probability,
                created_at=run.created_at,
                sr_uid=srs.get(run.id),
            )
            for run in runs
        ],
        results=[ResultOut.model_validate(r, from_attributes=True) for r in results],
        events=[EventOut.model_validate(e, from_attributes=True) for e in events],
        notifications=[
            NotificationOut.model_validate(n, from_attributes=True) for n in notifications
        ],
        feedback=[
            FeedbackOut.model_validate(f, from_attributes=True)
            for f in session.scalars(
                select(Feedback).where(Feedback.job_id == job_id).order_by(Feedback.id)
            )
        ],
    )


def worklist(
    session: Session, since: datetime | None = None, limit: int = 100
) -> list[WorklistItem]:
    """The triage order: positive findings (most probable, then most urgent, first), then
    jobs still pending (most urgent, then oldest, first), then failed jobs (no AI result),
    then negative ones (newest first). Skipped series are not on it."""
    triage = case(
        (Job.state.in_(PENDING_STATES), 1),
        ((Job.state.in_(ANSWERED_STATES)) & Job.positive.is_(True), 0),
        (Job.state == JobState.FAILED.value, 2),
        else_=3,
    )
    is_positive = triage == 0
    is_pending = triage == 1
    query = (
        _joined()
        .add_columns(triage)
        .where(Job.state != JobState.SKIPPED.value)
        .order_by(
            triage,
            case((is_positive, -func.coalesce(Job.probability, 0)), else_=0),
            Job.priority.desc(),
            case((is_pending, Job.id), else_=-Job.id),
        )
        .limit(limit)
    )
    if since is not None:
        query = query.where(Job.created_at >= since)
    rows = session.execute(query).all()
    ids = [row[0].id for row in rows]
    deliveries = _delivery_status(session, ids)
    received = _received_by(session, [row[0] for row in rows])
    sc_results = (
        dict(
            session.execute(
                select(Result.job_id, Result.sop_instance_uid).where(
                    Result.job_id.in_(ids), Result.kind == "sc"
                )
            ).all()
        )
        if ids
        else {}
    )
    return [
        WorklistItem(
            **_summary(
                row,
                deliveries,
                received,
                triage=TRIAGE_ORDER[row[5]],
                sc_result_uid=sc_results.get(row[0].id),
            )
        )
        for row in rows
    ]


def destinations(
    session: Session, configured: Sequence[tuple[str, str | None]] = ()
) -> list[DestinationStatus]:
    """Health of each destination: the configured ones (name, address) and any other that
    deliveries name. Failures come from the ``delivery_retry``/``delivery_failed`` events,
    successes from the deliveries' ``delivered_at``."""
    addresses = dict(configured)
    counts: dict[str, dict[str, int]] = {}
    for name, state, count in session.execute(
        select(Delivery.destination, Delivery.state, func.count()).group_by(
            Delivery.destination, Delivery.state
        )
    ):
        counts.setdefault(name, {})[state] = count
    committed = dict(
        session.execute(
            select(Delivery.destination, func.count())
            .where(Delivery.committed_at.is_not(None))
            .group_by(Delivery.destination)
        ).all()
    )
    last_success = dict(
        session.execute(
            select(Delivery.destination, func.max(Delivery.delivered_at)).group_by(
                Delivery.destination
            )
        ).all()
    )
    statuses = []
    for name in [*addresses, *sorted(set(counts) - set(addresses))]:
        failure = session.scalars(
            select(Event)
            .where(
                Event.kind.in_(("delivery_retry", "delivery_failed")),
                Event.data["destination"].as_string() == name,
            )
            .order_by(Event.id.desc())
            .limit(1)
        ).first()
        success_at = last_success.get(name)
        failure_at = failure.at if failure else None
        if failure_at is not None and (success_at is None or failure_at > success_at):
            health: Literal["ok", "failing", "unknown"] = "failing"
        elif success_at is not None:
            health = "ok"
        else:
            health = "unknown"
        states = counts.get(name, {})
        statuses.append(
            DestinationStatus(
                name=name,
                address=addresses.get(name),
                pending=states.get(DeliveryState.PENDING.value, 0),
                failed=states.get(DeliveryState.FAILED.value, 0),
                delivered=states.get(DeliveryState.DONE.value, 0),
                sent=states.get(DeliveryState.DONE.value, 0)
                + states.get(DeliveryState.SENT.value, 0),
                committed=committed.get(name, 0),
                last_success_at=success_at,
                last_failure_at=failure_at,
                last_error=failure.message if failure else None,
                health=health,
            )
        )
    return statuses


def refused_sources(session: Session, limit: int = 50) -> list[RefusedSource]:
    """The sources most recently refused by the listener's limits, newest first."""
    address = Event.data["address"].as_string()
    reason = Event.data["reason"].as_string()
    rows = session.execute(
        select(address, reason, func.count(), func.max(Event.id))
        .where(Event.kind == "connection_refused")
        .group_by(address, reason)
        .order_by(func.max(Event.id).desc())
        .limit(limit)
    ).all()
    last = {
        e.id: e for e in session.scalars(select(Event).where(Event.id.in_([r[3] for r in rows])))
    }
    return [
        RefusedSource(
            address=row[0],
            reason=row[1],
            minutes=row[2],
            last_at=last[row[3]].at,
            last_message=last[row[3]].message,
        )
        for row in rows
    ]


def distinct_values(session: Session, column: Literal["model", "label"]) -> list[str]:
    """The models or labels that jobs name, for the filters of the job list."""
    attribute = Job.model if column == "model" else Job.label
    found = session.scalars(select(attribute).where(attribute.is_not(None)).distinct())
    return sorted(value for value in found if value)
