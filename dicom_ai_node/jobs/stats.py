"""Counts over the job log that the metrics, the API and the dashboard share."""

from __future__ import annotations

from pydantic import BaseModel
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from dicom_ai_node.jobs.models import (
    Delivery,
    DeliveryState,
    Job,
    JobState,
    Notification,
    NotificationState,
)

PENDING_STATES = (JobState.QUEUED.value, JobState.RUNNING.value)


class QueueDepth(BaseModel):
    queued: int
    running: int
    deliveries_pending: int
    notifications_pending: int


def queue_depth(session: Session) -> QueueDepth:
    """How much work is waiting: jobs, deliveries and notifications."""
    jobs = dict(
        session.execute(
            select(Job.state, func.count()).where(Job.state.in_(PENDING_STATES)).group_by(Job.state)
        ).all()
    )
    deliveries = session.scalar(
        select(func.count()).where(Delivery.state == DeliveryState.PENDING.value)
    )
    notifications = session.scalar(
        select(func.count()).where(Notification.state == NotificationState.PENDING.value)
    )
    return QueueDepth(
        queued=jobs.get(JobState.QUEUED.value, 0),
        running=jobs.get(JobState.RUNNING.value, 0),
        deliveries_pending=deliveries or 0,
        notifications_pending=notifications or 0,
    )


def jobs_by_state(session: Session) -> dict[str, int]:
    """How many jobs are in each state (every state named, zero included)."""
    counts = dict(session.execute(select(Job.state, func.count()).group_by(Job.state)).all())
    return {state.value: counts.get(state.value, 0) for state in JobState}
