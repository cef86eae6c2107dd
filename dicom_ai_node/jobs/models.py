"""The job log's tables: what arrived, how it was grouped, what was done with it.

``studies`` / ``series`` / ``instances`` index the spool; ``associations`` records each DICOM
association (a series is complete only once the associations that brought it are released);
``jobs`` is the queue; ``predictions``, ``results`` and ``deliveries`` are what the later
stages record; ``events`` is an append-only history of everything, for operators;
``notification_cursors`` and ``notifications`` are the webhook notifier's cursor over the
events and its outbox (the cursor moves in the transaction that fills the outbox, so each
event becomes its notifications exactly once); ``nodes`` holds each node's heartbeat.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    false,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    """The current time, timezone-aware UTC (all timestamps in the log are UTC)."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored as naive UTC and read back timezone-aware (SQLite keeps no zone)."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the job log; use utcnow()")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: UTCDateTime(),
        dict[str, Any]: JSON,
        list[str]: JSON,
    }


class SeriesState(StrEnum):
    RECEIVING = "receiving"
    COMPLETE = "complete"


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DELIVERING = "delivering"
    DONE = "done"
    FAILED = "failed"
    FAILED_TO_DELIVER = "failed_to_deliver"
    SKIPPED = "skipped"


class DeliveryState(StrEnum):
    PENDING = "pending"
    SENT = "sent"  # stored by the peer, its Storage Commitment awaited (PS3.4 Annex J)
    DONE = "done"
    FAILED = "failed"


class Study(Base):
    __tablename__ = "studies"

    study_instance_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    patient_id: Mapped[str] = mapped_column(String(64), default="")
    accession_number: Mapped[str] = mapped_column(String(64), default="")
    study_date: Mapped[str] = mapped_column(String(8), default="")
    study_description: Mapped[str] = mapped_column(String(64), default="")
    # Jobs are per study for routes with level = "study"; ``generation`` counts re-openings.
    state: Mapped[str] = mapped_column(String(16), default=SeriesState.RECEIVING)
    generation: Mapped[int] = mapped_column(Integer, default=0)
    first_received_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_received_at: Mapped[datetime] = mapped_column(default=utcnow)


class Series(Base):
    __tablename__ = "series"

    series_instance_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(
        ForeignKey("studies.study_instance_uid"), index=True
    )
    modality: Mapped[str] = mapped_column(String(16), default="")
    # The attributes routes look at, from the first instance of the series.
    attributes: Mapped[dict[str, Any]] = mapped_column(default=dict)
    calling_ae_title: Mapped[str] = mapped_column(String(16), default="")
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    state: Mapped[str] = mapped_column(String(16), default=SeriesState.RECEIVING)
    generation: Mapped[int] = mapped_column(Integer, default=0)
    first_received_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_received_at: Mapped[datetime] = mapped_column(default=utcnow)
    completed_at: Mapped[datetime | None] = mapped_column(default=None)
    # Set when retention deleted the series' files (its rows and results are kept).
    pruned_at: Mapped[datetime | None] = mapped_column(default=None)

    __table_args__ = (Index("ix_series_state_last", "state", "last_received_at"),)


class Association(Base):
    __tablename__ = "associations"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    node_name: Mapped[str] = mapped_column(String(64))
    # the receiving process (``<node>:<pid>``): its open associations close when it dies
    owner: Mapped[str | None] = mapped_column(String(128), default=None)
    calling_ae_title: Mapped[str] = mapped_column(String(16))
    called_ae_title: Mapped[str] = mapped_column(String(16))
    peer_address: Mapped[str] = mapped_column(String(64))
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    ended_at: Mapped[datetime | None] = mapped_column(default=None, index=True)
    outcome: Mapped[str] = mapped_column(String(16), default="open")
    instances: Mapped[int] = mapped_column(Integer, default=0)


class Instance(Base):
    __tablename__ = "instances"

    sop_instance_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(
        ForeignKey("series.series_instance_uid"), index=True
    )
    study_instance_uid: Mapped[str] = mapped_column(String(64))
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    instance_number: Mapped[int | None] = mapped_column(Integer, default=None)
    path: Mapped[str] = mapped_column(Text)  # relative to ``[storage] data_dir``
    size: Mapped[int] = mapped_column(Integer)
    association_id: Mapped[str | None] = mapped_column(
        ForeignKey("associations.id"), default=None, index=True
    )
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    # The series generation this instance arrived in (a late instance belongs to a new one).
    generation: Mapped[int] = mapped_column(Integer, default=0)


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    level: Mapped[str] = mapped_column(String(8), default="series")
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    series_instance_uid: Mapped[str | None] = mapped_column(String(64), default=None, index=True)
    generation: Mapped[int] = mapped_column(Integer, default=0)
    modality: Mapped[str] = mapped_column(String(16), default="")
    route: Mapped[str | None] = mapped_column(String(64), default=None)
    model: Mapped[str | None] = mapped_column(String(64), default=None)
    model_version: Mapped[str | None] = mapped_column(String(32), default=None)
    #: SHA-256 of the weights that ran the job: with model and version, the model's identity.
    weights_sha256: Mapped[str | None] = mapped_column(String(64), default=None)
    #: Shadow mode (the route's ``shadow``): results recorded, never delivered nor notified.
    shadow: Mapped[bool] = mapped_column(default=False, server_default=false())
    outputs: Mapped[list[str]] = mapped_column(default=list)
    destinations: Mapped[list[str]] = mapped_column(default=list)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    state: Mapped[str] = mapped_column(String(20), default=JobState.QUEUED)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # attempts ended from outside (kill, lost host, expired lease): not counted against the job
    interruptions: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    lease_owner: Mapped[str | None] = mapped_column(String(128), default=None)
    lease_expires_at: Mapped[datetime | None] = mapped_column(default=None)
    #: The node that claimed the latest attempt (kept once the lease is released), so any
    #: node of a cluster can tell which one ran the job.
    ran_by: Mapped[str | None] = mapped_column(String(64), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    label: Mapped[str | None] = mapped_column(String(64), default=None)
    probability: Mapped[float | None] = mapped_column(Float, default=None)
    positive: Mapped[bool | None] = mapped_column(default=None)
    # ``<level>:<series or study UID>:<generation>:<route>`` (route empty when skipped):
    # unique, so assemblers of several nodes racing on one series queue one job between them.
    unique_key: Mapped[str | None] = mapped_column(String(200), default=None)

    __table_args__ = (
        Index("ix_jobs_claim", "state", "priority", "created_at"),
        UniqueConstraint("unique_key", name="uq_jobs_unique_key"),
    )


class Feedback(Base):
    """A radiologist's opinion of a job's finding: agree or not, a comment, who and when."""

    __tablename__ = "feedback"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    agree: Mapped[bool]
    comment: Mapped[str] = mapped_column(Text, default="")
    author: Mapped[str] = mapped_column(String(128))
    at: Mapped[datetime] = mapped_column(default=utcnow)


class Prediction(Base):
    """One image's (or frame's) model output for a job."""

    __tablename__ = "predictions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    frame_number: Mapped[int | None] = mapped_column(Integer, default=None)
    label: Mapped[str] = mapped_column(String(64))
    probability: Mapped[float] = mapped_column(Float)
    probabilities: Mapped[dict[str, Any]] = mapped_column(default=dict)


class Result(Base):
    """A DICOM object the node produced for a job, written to the outbox before sending."""

    __tablename__ = "results"

    sop_instance_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    kind: Mapped[str] = mapped_column(String(8))
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    series_instance_uid: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)  # relative to ``[storage] data_dir``
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Delivery(Base):
    """Sending one result to one destination, with its retry state."""

    __tablename__ = "deliveries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    result_uid: Mapped[str] = mapped_column(ForeignKey("results.sop_instance_uid"))
    destination: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), default=DeliveryState.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_status: Mapped[int | None] = mapped_column(Integer, default=None)
    last_error: Mapped[str | None] = mapped_column(Text, default=None)
    lease_owner: Mapped[str | None] = mapped_column(String(128), default=None)
    lease_expires_at: Mapped[datetime | None] = mapped_column(default=None)
    delivered_at: Mapped[datetime | None] = mapped_column(default=None)
    #: The node whose dispatcher had the result stored by the destination.
    sent_by: Mapped[str | None] = mapped_column(String(64), default=None)
    # Storage Commitment (PS3.4 Annex J): the request's Transaction UID, when it was asked,
    # and when the peer confirmed it kept the instance.
    transaction_uid: Mapped[str | None] = mapped_column(String(64), default=None, index=True)
    commitment_requested_at: Mapped[datetime | None] = mapped_column(default=None)
    committed_at: Mapped[datetime | None] = mapped_column(default=None)

    __table_args__ = (
        Index("ix_deliveries_due", "state", "next_attempt_at"),
        # One delivery per result and destination, whichever worker plans it.
        UniqueConstraint("result_uid", "destination", name="uq_deliveries_result_destination"),
    )


class NodeRecord(Base):
    """A node of the cluster and its last heartbeat: a node silent for longer than
    ``[cluster] node_timeout_seconds`` is dead, and the others clean up after it."""

    __tablename__ = "nodes"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(default=utcnow)
    version: Mapped[str] = mapped_column(String(32), default="")


class Event(Base):
    """An append-only record of something that happened (never updated or deleted)."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    kind: Mapped[str] = mapped_column(String(32))
    job_id: Mapped[int | None] = mapped_column(Integer, default=None, index=True)
    study_instance_uid: Mapped[str | None] = mapped_column(String(64), default=None)
    series_instance_uid: Mapped[str | None] = mapped_column(String(64), default=None)
    association_id: Mapped[str | None] = mapped_column(String(36), default=None)
    message: Mapped[str] = mapped_column(Text, default="")
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)


class NotificationState(StrEnum):
    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"


class NotificationCursor(Base):
    """How far the notifier has read the event log, per webhook."""

    __tablename__ = "notification_cursors"

    url: Mapped[str] = mapped_column(String(512), primary_key=True)
    event_id: Mapped[int] = mapped_column(Integer)


class Notification(Base):
    """One webhook message (its body fixed when it was queued) and its delivery attempts.

    ``key`` makes a message unique per webhook: ``positive:job:<id>`` for a finding
    (announced once per job), ``failed:event:<id>`` for a failure (announced each time).
    """

    __tablename__ = "notifications"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    url: Mapped[str] = mapped_column(String(512))
    key: Mapped[str] = mapped_column(String(64))
    trigger: Mapped[str] = mapped_column(String(16))
    job_id: Mapped[int | None] = mapped_column(Integer, default=None, index=True)
    payload: Mapped[dict[str, Any]] = mapped_column(default=dict)
    state: Mapped[str] = mapped_column(String(16), default=NotificationState.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_error: Mapped[str | None] = mapped_column(Text, default=None)
    lease_owner: Mapped[str | None] = mapped_column(String(128), default=None)
    lease_expires_at: Mapped[datetime | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    sent_at: Mapped[datetime | None] = mapped_column(default=None)

    __table_args__ = (
        UniqueConstraint("url", "key", name="uq_notifications_url_key"),
        Index("ix_notifications_due", "state", "next_attempt_at"),
    )


class AuditRecord(Base):
    """One DICOM audit message (PS3.15 A.5), append-only: never updated or deleted.

    ``message`` is the XML as sent to the audit repository; ``event_id`` its EventID code
    (``110104``...) and ``outcome`` its EventOutcomeIndicator, for querying.
    """

    __tablename__ = "audit_records"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    event_id: Mapped[str] = mapped_column(String(16), index=True)
    outcome: Mapped[int] = mapped_column(Integer)
    message: Mapped[str] = mapped_column(Text)


class PerformedStep(Base):
    """A Modality Performed Procedure Step the node was told of (PS3.4 Annex F): N-CREATE
    makes it ``IN PROGRESS``, N-SET ends it ``COMPLETED`` or ``DISCONTINUED``."""

    __tablename__ = "performed_steps"

    sop_instance_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    status: Mapped[str] = mapped_column(String(16))
    calling_ae_title: Mapped[str] = mapped_column(String(16), default="")
    study_instance_uid: Mapped[str | None] = mapped_column(String(64), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class PerformedSeries(Base):
    """A series a performed step lists (its Performed Series Sequence) with the instances
    the step says it holds; ``completed_generation`` is the generation this listing completed
    (it completes a series once: later instances fall back to the stable time)."""

    __tablename__ = "performed_series"

    step_uid: Mapped[str] = mapped_column(
        ForeignKey("performed_steps.sop_instance_uid"), primary_key=True
    )
    series_instance_uid: Mapped[str] = mapped_column(String(64), primary_key=True, index=True)
    sop_instance_uids: Mapped[list[str]] = mapped_column(default=list)
    completed_generation: Mapped[int | None] = mapped_column(Integer, default=None)


class Pseudonym(Base):
    """What a de-identified export replaced an original with (PS3.15 Annex E): ``uid``
    pseudonyms are new UIDs, ``patient`` ones stand for a Patient ID. Kept here, never in
    the export, so that exports agree and an authorised user can re-identify."""

    __tablename__ = "pseudonyms"

    kind: Mapped[str] = mapped_column(String(16), primary_key=True)
    original: Mapped[str] = mapped_column(String(64), primary_key=True)
    pseudonym: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class RequestedRoute(Base):
    """A study pulled for one route (``dicom-ai-node run --route``): its series are routed
    by the requested routes only, not by every configured one."""

    __tablename__ = "requested_routes"

    study_instance_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    route: Mapped[str] = mapped_column(String(64), primary_key=True)
    requested_at: Mapped[datetime] = mapped_column(default=utcnow)
