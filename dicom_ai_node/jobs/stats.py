"""Counts over the job log that the metrics, the API and the dashboard share."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

from pydantic import BaseModel
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from dicom_ai_node.jobs.models import (
    Delivery,
    DeliveryState,
    Feedback,
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


def feedback_counts(session: Session) -> list[tuple[str, str, bool, int]]:
    """(model, version, agree, count) of the radiologists' feedback."""
    rows = session.execute(
        select(Job.model, Job.model_version, Feedback.agree, func.count())
        .join(Job, Job.id == Feedback.job_id)
        .group_by(Job.model, Job.model_version, Feedback.agree)
    ).all()
    return [(str(m or ""), str(v or ""), bool(a), int(n)) for m, v, a, n in rows]


class DailyRate(BaseModel):
    """Finished jobs and positive findings of one model version on one UTC day."""

    model: str
    version: str
    day: date
    jobs: int
    positives: int

    @property
    def rate(self) -> float:
        return self.positives / self.jobs


def positive_rates(session: Session, days: int = 30) -> list[DailyRate]:
    """Positive rate per model version per UTC day over the last ``days`` days, newest first
    (grouped here, not in SQL: day functions differ between SQLite and PostgreSQL)."""
    since = datetime.now(UTC) - timedelta(days=days)
    rows = session.execute(
        select(Job.model, Job.model_version, Job.finished_at, Job.positive).where(
            Job.finished_at >= since, Job.positive.is_not(None), Job.model.is_not(None)
        )
    ).all()
    counts: dict[tuple[str, str, date], list[int]] = {}
    for model, version, finished, positive in rows:
        assert finished is not None  # the WHERE clause
        key = (str(model), str(version or ""), finished.astimezone(UTC).date())
        tally = counts.setdefault(key, [0, 0])
        tally[0] += 1
        tally[1] += int(bool(positive))
    return [
        DailyRate(model=m, version=v, day=d, jobs=n, positives=k)
        for (m, v, d), (n, k) in sorted(counts.items(), key=lambda item: item[0][2], reverse=True)
    ]
