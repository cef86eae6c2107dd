"""Retention: delete the received files of series that are processed and old enough.

Only the spool's ``incoming`` files go; the result objects in the outbox and every row of
the job log stay, so what was received, decided and sent remains on record. A series is
pruned when it is complete, quiet for ``retention_days``, and no job of it (or of its study)
is still queued, running or delivering.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import exists, or_, select
from sqlalchemy.orm import Session

from dicom_ai_node.jobs.models import Job, JobState, Series, SeriesState
from dicom_ai_node.jobs.store import add_event
from dicom_ai_node.spool import Spool

_ACTIVE = (JobState.QUEUED.value, JobState.RUNNING.value, JobState.DELIVERING.value)


def prune(session: Session, spool: Spool, now: datetime, retention_days: float) -> int:
    """Delete the files of the series due for pruning (in the caller's transaction)."""
    cutoff = now - timedelta(days=retention_days)
    busy = exists().where(
        Job.study_instance_uid == Series.study_instance_uid,
        or_(
            Job.series_instance_uid == Series.series_instance_uid,
            Job.series_instance_uid.is_(None),
        ),
        Job.state.in_(_ACTIVE),
    )
    due = session.scalars(
        select(Series).where(
            Series.state == SeriesState.COMPLETE.value,
            Series.pruned_at.is_(None),
            Series.last_received_at < cutoff,
            ~busy,
        )
    ).all()
    for series in due:
        spool.remove_series(series.study_instance_uid, series.series_instance_uid)
        series.pruned_at = now
        add_event(
            session,
            "series_pruned",
            f"received files deleted after {retention_days:g} days (retention)",
            study=series.study_instance_uid,
            series=series.series_instance_uid,
        )
    return len(due)
